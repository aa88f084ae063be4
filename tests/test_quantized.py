"""QLoRA (a frozen base in NF4 or int8 under LoRA) and 8-bit AdamW states, through bitsandbytes'
CPU backend: real runs on a tiny Llama wide enough for 4-bit blocks (64 values per scale)."""

import json

import pytest
import torch

from ecoadapt.cli import main
from ecoadapt.config import ModelConfig
from ecoadapt.config.run import from_dict
from ecoadapt.core.errors import UserError
from ecoadapt.model import footprint, pretrained, quantize
from ecoadapt.model.precision import Policy
from ecoadapt.train.param_groups import adamw
from helpers.runs import heldout_loss_of, write_config
from helpers.tiny_models import build_tiny_llama

pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def llama64(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("llama64"), hidden=64)


def qlora_run(tmp_path, model, corpus, kind, **precision):
    tmp_path.mkdir(exist_ok=True)
    config = write_config(
        tmp_path,
        model,
        corpus,
        lora={"enabled": True, "r": 4, "quantize": kind},
        train={"max_steps": 6, "lr": 5e-3},
        precision=precision,
    )
    assert main(["adapt", str(config)]) == 0
    return tmp_path / "run", json.loads((tmp_path / "run" / "summary.json").read_text())


@pytest.mark.parametrize(("kind", "smaller_by"), [("nf4", 6.0), ("int8", 3.0)])
def test_a_qlora_run_trains_adapters_on_a_quantized_base_and_saves_an_adapter_for_the_full_base(
    tmp_path, llama64, corpus_jsonl, kind, smaller_by
):
    run, summary = qlora_run(tmp_path, llama64, corpus_jsonl, kind)
    base = summary["precision"]["quantized_base"]
    assert base["kind"] == kind and base["backend"].startswith("bitsandbytes")
    assert base["modules"] == 2 * 7  # q, k, v, o, gate, up, down in each of the 2 blocks
    # fp32 weights stored in 4 bits (plus scales) or 8 bits (plus a scale per row)
    assert base["bytes_before"] / base["bytes_after"] > smaller_by
    counts = summary["model"]["parameters"]
    base_values = sum(p.numel() for p in pretrained.load(ModelConfig(str(llama64)), 16).model.parameters())
    assert counts["total"] == base_values + counts["trainable"]  # the base's values, not its packed bytes
    assert counts["trainable"] < counts["total"] / 10
    trained = summary["eval"]["loss"]
    assert trained < summary["eval"]["loss_before"] - 0.005  # the adapters learnt (a repacked base once froze them)

    from peft import PeftModel

    # The adapter on the full-precision base: close to what trained on the quantized one.
    full = pretrained.load(ModelConfig(str(llama64)), 16).model
    on_full = heldout_loss_of(PeftModel.from_pretrained(full, run / "adapter"), run, "clm")
    assert on_full == pytest.approx(trained, rel=0.03)
    # And on a quantized base, as it trained: the same numbers up to the summation order.
    quantized = pretrained.load(ModelConfig(str(llama64)), 16).model
    _, blocks = pretrained.transformer_blocks(quantized)
    quantize.frozen_base(quantized, blocks, kind, torch.float32, torch.device("cpu"))
    on_quantized = heldout_loss_of(PeftModel.from_pretrained(quantized, run / "adapter"), run, "clm")
    assert on_quantized == pytest.approx(trained, rel=1e-3)


@pytest.mark.slow
def test_qlora_computes_in_bf16_under_autocast_and_in_pure_bf16(tmp_path, llama64, corpus_jsonl):
    for mode in ("bf16", "bf16-pure"):
        _, summary = qlora_run(tmp_path / mode, llama64, corpus_jsonl, "nf4", mode=mode)
        assert summary["precision"]["quantized_base"]["compute_dtype"] == "bfloat16"
        assert summary["eval"]["loss"] < summary["eval"]["loss_before"]


@pytest.mark.parametrize(
    ("sets", "key"),
    [
        ({"lora": {"quantize": "nf4"}}, "lora.quantize"),
        ({"lora": {"enabled": True, "quantize": "nf4", "merge": True}}, "lora.merge"),
        ({"lora": {"enabled": True, "quantize": "int8"}, "train": {"compile": "blocks"}}, "train.compile"),
        ({"lora": {"enabled": True, "quantize": "nf4"}, "precision": {"layers": {"0": "bf16"}}}, "precision.layers"),
        ({"lora": {"enabled": True, "quantize": "nf4"}, "parallel": {"strategy": "fsdp"}}, "parallel.strategy"),
        ({"lora": {"enabled": True, "quantize": "nf5"}}, "lora.quantize"),
        ({"train": {"optimizer": "paged_adamw8bit", "device": "cpu"}}, "train.optimizer"),
        ({"train": {"optimizer": "adamw8bit"}, "parallel": {"strategy": "fsdp"}}, "train.optimizer"),
    ],
)
def test_settings_a_quantized_base_or_8_bit_optimizer_cannot_honour_are_refused_naming_the_key(tmp_path, sets, key):
    raw = {"model": {"name_or_path": "m"}, "data": {"train": ["c.jsonl"]}, "train": {"max_steps": 2}}
    for section, values in sets.items():
        raw.setdefault(section, {}).update(values)
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        from_dict(raw, "run.yaml")


def test_paged_8_bit_adamw_on_a_cpu_run_is_refused_before_anything_is_written(tmp_path, llama64, corpus_jsonl):
    config = write_config(tmp_path, llama64, corpus_jsonl, train={"optimizer": "paged_adamw8bit"})
    assert main(["adapt", str(config)]) != 0
    assert not (tmp_path / "run").exists()


def _step(optimizer, params, seed):
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    optimizer.step()


def test_8_bit_adamw_keeps_one_byte_moments_and_its_state_survives_a_checkpoint(tmp_path):
    big, small = torch.nn.Parameter(torch.randn(128, 64)), torch.nn.Parameter(torch.randn(64))
    optimizer = adamw([{"params": [big, small], "weight_decay": 0.0}], 1e-2, "adamw8bit")
    _step(optimizer, [big, small], 0)
    assert optimizer.state[big]["state1"].dtype == torch.uint8  # 8,192 values: 8-bit moments
    assert optimizer.state[small]["state1"].dtype == torch.float32  # under 4,096: 32-bit
    torch.save(optimizer.state_dict(), tmp_path / "opt.pt")

    twin = [torch.nn.Parameter(p.detach().clone()) for p in (big, small)]
    restored = adamw([{"params": twin, "weight_decay": 0.0}], 1e-2, "adamw8bit")
    restored.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))  # as checkpoint.load reads
    _step(optimizer, [big, small], 1)
    _step(restored, twin, 1)
    assert torch.equal(twin[0], big) and torch.equal(twin[1], small)


def test_the_footprint_counts_quantized_weights_and_8_bit_moments(llama64):
    model = pretrained.load(ModelConfig(str(llama64)), 16).model
    plain = footprint.static_bytes(model, Policy("fp32", "cpu"))
    eight_bit = footprint.static_bytes(model, Policy("fp32", "cpu"), "adamw8bit")
    assert plain["weights"] == eight_bit["weights"]
    # Each 64x128 matrix's moments: 8 bytes a value in fp32 AdamW, 2 (and a scale per 256) in 8 bits.
    assert 3.5 < plain["optimizer"] / eight_bit["optimizer"] < 4.0
    _, blocks = pretrained.transformer_blocks(model)
    done = quantize.frozen_base(model, blocks, "nf4", torch.float32, torch.device("cpu"))
    quantized = footprint.static_bytes(model, Policy("fp32", "cpu"))
    assert plain["weights"] - quantized["weights"] == pytest.approx(done.bytes_before - done.bytes_after, rel=0.05)


@pytest.mark.slow
def test_full_fine_tuning_with_8_bit_adamw_in_pure_bf16_learns_on_fp32_masters(tmp_path, llama64, corpus_jsonl):
    train = {"optimizer": "adamw8bit", "max_steps": 8}
    config = write_config(tmp_path, llama64, corpus_jsonl, train=train, precision={"mode": "bf16-pure"})
    assert main(["adapt", str(config)]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["config"]["train"]["optimizer"] == "adamw8bit"
    assert summary["eval"]["loss"] < summary["eval"]["loss_before"]


@pytest.mark.slow
def test_qlora_under_ddp_matches_one_process(tmp_path, llama64, corpus_jsonl):
    """Two gloo ranks of 2 blocks each train the same adapters as one process of 4."""
    from safetensors.torch import load_file

    from helpers.parallel_runs import config, losses, run

    sets = ("lora.enabled=true", "lora.quantize=nf4", "lora.dropout=0")  # dropout draws per-rank masks
    run(config(tmp_path, "one", llama64, corpus_jsonl, micro_batch_size=4, grad_accum=1), 1, *sets)
    run(config(tmp_path, "two", llama64, corpus_jsonl, micro_batch_size=2, grad_accum=1), 2, *sets)
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["parallel"] == {"world_size": 2, "strategy": "ddp"}
    torch.testing.assert_close(torch.tensor(losses(tmp_path / "two")), torch.tensor(losses(tmp_path / "one")))
    one = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    two = load_file(tmp_path / "two" / "adapter" / "adapter_model.safetensors")
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-6, msg=name)


def _projected_parts(tmp_path, name, model, corpus, **sections):
    folder = tmp_path / name
    folder.mkdir()
    config = write_config(folder, model, corpus, **sections)
    assert main(["plan", str(config), "--device", "A10", "--json", str(folder / "plan.json")]) == 0
    found = []

    def walk(node):
        if isinstance(node, dict):
            found.extend([node] if "parts_bytes" in node else [])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(json.loads((folder / "plan.json").read_text()))
    return found[0]["parts_bytes"]


@pytest.mark.slow
def test_plan_for_another_gpu_counts_the_quantized_base_and_8_bit_states_as_stored(tmp_path, llama64, corpus_jsonl):
    lora = {"enabled": True, "r": 4}
    plain = _projected_parts(tmp_path, "lora", llama64, corpus_jsonl, lora=lora)
    nf4 = _projected_parts(tmp_path, "nf4", llama64, corpus_jsonl, lora={**lora, "quantize": "nf4"})
    assert plain["weights"] / nf4["weights"] > 4  # block Linears in 4 bits; embeddings as loaded
    assert nf4["optimizer"] == plain["optimizer"]  # the same adapters train
    full = _projected_parts(tmp_path, "full", llama64, corpus_jsonl)
    eight = _projected_parts(tmp_path, "eight", llama64, corpus_jsonl, train={"optimizer": "adamw8bit"})
    assert 3 < full["optimizer"] / eight["optimizer"] < 4  # small tensors keep 32-bit states


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_the_task_judges_a_qlora_model_as_it_trained_in_memory_and_from_disk(tmp_path, llama64, corpus_jsonl, kind):
    """The backbone the task reads is the dequantized base plus the adapter, with the plain
    model's keys: the same from the run's memory and from its saved adapter (not the packed
    codes, which once reached the classifier as numbers)."""
    from ecoadapt.config import RunConfig
    from ecoadapt.model import parallel
    from ecoadapt.task import downstream
    from ecoadapt.train import prepare

    run, _ = qlora_run(tmp_path, llama64, corpus_jsonl, kind)
    cfg = RunConfig.from_yaml(run / "config.yaml")
    from_disk = downstream.adapted_backbone(cfg)
    plain = pretrained.load(ModelConfig(str(llama64)), 16).model.base_model.state_dict()
    assert set(from_disk) == set(plain)
    for name, value in plain.items():
        assert from_disk[name].shape == value.shape, name
    # A quantized weight without an adapter (LoRA's default targets are q and v): dequantized,
    # close to the original and not equal to it.
    up = "layers.0.mlp.up_proj.weight"
    error = (from_disk[up] - plain[up]).norm() / plain[up].norm()
    assert 0 < error < (0.15 if kind == "nf4" else 0.02)
    # In memory, after training, the same weights the saved adapter gives.
    loaded = pretrained.load(cfg.model, 16)
    built = prepare.build(
        cfg, loaded, torch.zeros((4, 16), dtype=torch.long), torch.device("cpu"), parallel.World(), print
    )
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    peft_model = parallel.unwrap(built.model).model
    set_peft_model_state_dict(peft_model, load_file(run / "adapter" / "adapter_model.safetensors"))
    in_memory = downstream.backbone_state(peft_model)
    for name in plain:
        torch.testing.assert_close(in_memory[name], from_disk[name], rtol=1e-4, atol=1e-5, msg=name)
