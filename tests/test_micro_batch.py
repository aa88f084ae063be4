"""train.tokens_per_step and train.micro_batch_size: auto (issue 24): the effective batch is the
user's, the micro-batch is the run's, and choosing it never changes what a step computes."""

import pytest
import torch

from ecoadapt.config import RunConfig
from ecoadapt.core.errors import UserError
from ecoadapt.train import micro_batch
from ecoadapt.train.micro_batch import MicroBatchChoice, fitting_splits, splits_for
from helpers.runs import adapt_summary, fit_tiny

GIB = 2**30


def config(**train):
    raw = {
        "model": {"name_or_path": "m"},
        "data": {"train": ["c.txt"], "max_seq_len": 128},
        "train": train,
        "parallel": {"nproc": 1},
    }
    return RunConfig.from_mapping(raw)


def test_tokens_per_step_sets_the_accumulation_and_auto_draws_the_whole_step():
    t = config(tokens_per_step=4096, micro_batch_size=8).train
    assert (t.micro_batch_size, t.grad_accum, t.fill_micro_batch) == (8, 4, False)  # 32 blocks of 128
    t = config(tokens_per_step=4096, micro_batch_size="auto").train
    assert (t.micro_batch_size, t.grad_accum, t.fill_micro_batch) == (32, 1, True)
    t = config(micro_batch_size="auto", grad_accum=3).train  # no tokens_per_step: the default step, split
    assert (t.micro_batch_size, t.grad_accum, t.fill_micro_batch) == (24, 1, True)


def test_a_resolved_config_reads_back_to_itself():
    """config.yaml and summary.json hold the resolved numbers; rereading them is the same run."""
    for micro in (8, "auto"):
        cfg = config(tokens_per_step=4096, micro_batch_size=micro)
        assert RunConfig.from_mapping(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    ("train", "message"),
    [
        ({"tokens_per_step": 1000}, r"train.tokens_per_step = 1000 .* multiple of .* = 128 .* for example 1024"),
        ({"tokens_per_step": 4096, "micro_batch_size": 5}, r"32 blocks per process .* does not divide"),
        ({"tokens_per_step": 4096, "micro_batch_size": 8, "grad_accum": 2}, r"train.grad_accum = 2 .* makes it 4"),
        ({"tokens_per_step": 4096, "micro_batch_size": "auto", "grad_accum": 2}, r"auto chooses the accumulation"),
        ({"micro_batch_size": "big"}, r"train.micro_batch_size"),
        ({"micro_batch_size": 0}, r"at least 1, or auto"),
    ],
)
def test_a_batch_that_cannot_be_made_names_the_key_and_a_way_out(train, message):
    with pytest.raises(UserError, match=message):
        config(**train)


def test_splits_are_the_fewest_powers_of_two_that_fit():
    assert [splits_for(64, size) for size in (64, 32, 20, 8, 1)] == [1, 2, 4, 8, 64]
    assert splits_for(6, 4) == 2 and splits_for(6, 1) == 8  # parts of 1 row: split_micro_batches makes 6


def test_a_gpu_micro_batch_fills_the_free_memory_minus_what_the_step_will_allocate():
    # 10 GiB free, 2 GiB still to come (gradients, Adam), 100 MiB a block: 0.85 x 10 - 2 = 6.5 GiB, 66 blocks.
    assert fitting_splits(64, 10 * GIB, 2 * GIB, 100 * 2**20)[0] == 1
    # 4 GiB free: 1.4 GiB, 14 blocks: 64 in 8 micro-batches of 8.
    splits, how = fitting_splits(64, 4 * GIB, 2 * GIB, 100 * 2**20)
    assert splits == 8 and "4.0 GiB free" in how and "100 MiB of activations per block" in how
    splits, how = fitting_splits(64, 1 * GIB, 2 * GIB, 100 * 2**20)  # nothing fits: one block, the first step tells
    assert splits == 64 and "not even one block" in how


def test_the_gpu_choice_reads_the_devices_free_memory(monkeypatch, tiny_llama):
    """A fake of CUDA's free-memory query: the choice follows it, and 16-bit activations take half."""
    from ecoadapt.config import ModelConfig
    from ecoadapt.model import pretrained
    from ecoadapt.model.precision import Policy

    model = pretrained.load(ModelConfig(str(tiny_llama)), 16, seed=0).model
    cfg = config(tokens_per_step=64 * 128, micro_batch_size="auto")
    per_row = micro_batch.footprint.activation_bytes_per_row(model.config, 128, 4, False)
    fixed = sum(micro_batch.footprint.static_bytes(model, Policy("fp32", "cpu")).values())
    room = int((fixed + 16 * per_row) / micro_batch.GPU_HEADROOM) + 1  # room for 16 blocks in fp32
    monkeypatch.setattr(micro_batch, "cuda_free_bytes", lambda device, cap: room)
    cuda = torch.device("cuda")
    fp32 = micro_batch.choose(cfg, model, Policy("fp32", "cpu"), cuda, 100, False, 1)
    bf16 = micro_batch.choose(cfg, model, Policy("bf16", "cpu"), cuda, 100, False, 1)
    assert (fp32.splits, bf16.splits) == (4, 2)  # 16 blocks a micro-batch; 32 in bf16
    assert fp32.how.startswith("16 blocks, the largest that fits")


def run_steps(folder, choice, steps):
    """fit_tiny's model and blocks, trained with ``choice`` deciding each step's split."""
    from ecoadapt.config import TrainConfig
    from ecoadapt.train import loop as loop_module

    original = loop_module.fit

    def fit_with_choice(loop, batches, hooks=None):
        hooks = hooks or loop_module.Hooks()
        if choice is not None:
            hooks.before_step, hooks.after_step = choice.before_step, choice.after_step
        return original(loop, batches, hooks)

    cfg = TrainConfig(max_steps=steps, micro_batch_size=32, lr=5e-3, log_every=steps, seed=3)
    loop_module.fit = fit_with_choice
    try:
        return fit_tiny(folder, cfg)
    finally:
        loop_module.fit = original


def test_the_cpu_search_measures_each_size_once_and_changes_nothing_the_step_computes(tiny_llama):
    choice = MicroBatchChoice.on_cpu(32, steps_left=8, compiled=False, processes=1)
    assert choice.candidates == [8, 4, 2, 1] and choice.splits == 2  # 4, 8, 16, 32 blocks; warm-up at 16
    result, searched, _ = run_steps(tiny_llama, choice, 8)
    assert sorted(choice.measured) == [4, 8, 16, 32] and all(rate > 0 for rate in choice.measured.values())
    best = max(choice.measured, key=choice.measured.get)
    assert choice.how.startswith(f"{best} blocks, measured fastest")
    assert result.micro_batch_splits == splits_for(32, best)
    _, whole, _ = run_steps(tiny_llama, None, 8)  # every step in one micro-batch of 32
    for (name, a), b in zip(searched.named_parameters(), whole.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, msg=name)


def test_the_cpu_search_is_skipped_where_it_would_cost_more_than_it_saves():
    assert "compiled blocks" in MicroBatchChoice.on_cpu(32, 100, compiled=True, processes=1).how
    assert "several processes" in MicroBatchChoice.on_cpu(32, 100, compiled=False, processes=2).how
    short = MicroBatchChoice.on_cpu(32, 5, compiled=False, processes=1)
    assert "5 steps are too few" in short.how and short.splits == 4 and not short.candidates  # the default, 8 blocks
    assert MicroBatchChoice.on_cpu(3, 100, False, 1).how.startswith("3 blocks: the step holds no more")


def test_an_adapt_run_says_what_it_chose_and_why(tmp_path, tiny_llama, corpus_jsonl, capsys):
    sets = {
        "model.name_or_path": tiny_llama, "data.train": corpus_jsonl, "data.text_field": "caption",
        "data.max_seq_len": 16, "train.max_steps": 9, "train.tokens_per_step": 16 * 16,
        "train.micro_batch_size": "auto", "train.compile": False, "output.dir": tmp_path / "run",
    }  # fmt: skip
    summary = adapt_summary(tmp_path, sets)
    assert "micro-batch: " in capsys.readouterr().out  # the CLI's last lines say it too
    batch = summary["batch"]
    assert batch["tokens_per_step"] == 256 and batch["blocks_per_step"] == 16
    assert batch["micro_batch_size"] * batch["micro_batches"] == 16
    assert "measured fastest in the first steps" in batch["how"]
    assert sorted(int(k) for k in batch["measured_tokens_per_s"]) == [4, 8, 16]
    assert summary["config"]["train"]["micro_batch_size"] == 16 and summary["config"]["train"]["fill_micro_batch"]
    assert summary["tokens"] == 9 * 256
