"""train.compile: the fused loss kernel computes what the eager one does, compiling is timed and
reported, and a failed compile falls back (auto) or stops with a clear error (explicit)."""

from __future__ import annotations

import pytest
import torch

from ecoadapt.core.errors import UserError
from ecoadapt.data.batches import IGNORE
from ecoadapt.model import compiling, losses


def _chunk(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(9, 50, generator=g) * 3).to(dtype)
    labels = torch.randint(0, 50, (9,), generator=g)
    labels[[2, 7]] = IGNORE
    return logits, labels


@pytest.mark.parametrize("kernel", [losses.softmax_cross_entropy_grad, losses.softmax_grad_inplace])
def test_kernels_give_the_loss_and_its_gradient(kernel):
    logits, labels = _chunk(torch.float32)
    x = logits.clone().requires_grad_(True)
    expected = torch.nn.functional.cross_entropy(x, labels, ignore_index=IGNORE, reduction="sum")
    expected.backward()
    loss, grad = kernel(logits.clone(), labels)
    torch.testing.assert_close(loss, expected.detach())
    torch.testing.assert_close(grad, x.grad)
    assert grad[2].abs().sum() == 0 and grad[7].abs().sum() == 0  # ignored rows: no gradient


def test_the_compiled_kernel_matches_the_eager_one_in_bf16():
    logits, labels = _chunk(torch.bfloat16)
    clock = compiling.CompileClock(what="loss", setting="loss")
    fused = clock.timed(torch.compile(losses.softmax_cross_entropy_grad, dynamic=True), losses.softmax_grad_inplace)
    loss, grad = fused(logits, labels)
    eager_loss, eager_grad = losses.softmax_grad_inplace(logits, labels)
    assert grad.dtype == torch.bfloat16  # written in the matmuls' dtype: no fp32 copy of the chunk
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(grad.float(), eager_grad.float(), rtol=0.02, atol=0.01)
    assert clock.graphs >= 1 and clock.seconds > 0  # the compiling call was timed
    compiled_s = clock.seconds
    fused(*_chunk(torch.bfloat16))  # the same graph again: no compile, no time added
    assert clock.seconds == compiled_s
    report = clock.report()
    # dynamo's own account where it keeps one (it also sees backward graphs); never less than the timed calls
    assert report["compiled"] == "loss" and report["compile_s"] >= round(compiled_s, 3)
    assert report["compile_s"] < compiled_s + 5


def test_training_with_the_compiled_loss_equals_eager(tiny_llama):
    from ecoadapt.config import ModelConfig
    from ecoadapt.model import pretrained

    ids = torch.randint(5, 30, (3, 16), generator=torch.Generator().manual_seed(0))
    results = []
    for setting in (False, "loss"):
        loaded = pretrained.load(ModelConfig(str(tiny_llama)), 16, seed=0)
        module = losses.LossModule(loaded.model.eval(), "clm")
        _, blocks = pretrained.transformer_blocks(loaded.model)
        clock = compiling.apply(module, blocks, setting, "cpu")
        loss = module(ids, ids)
        loss.backward()
        grad = loaded.model.get_output_embeddings().weight.grad.clone()
        results.append((loss.detach(), grad, clock.report()))
    (eager_loss, eager_grad, off), (fused_loss, fused_grad, on) = results
    assert off["compiled"] == "off" and on["compiled"] == "loss" and on["graphs"] >= 1
    torch.testing.assert_close(fused_loss, eager_loss, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(fused_grad, eager_grad, rtol=1e-4, atol=1e-6)


def test_auto_compiles_long_cpu_runs_only():
    assert compiling.resolve("auto", "cpu", 100) == "blocks"  # a preset's length: compiling pays
    assert compiling.resolve("auto", "cpu", 40) == "off"  # the quickstart's: it does not
    assert compiling.resolve("auto", "cpu", None) == "off"
    assert compiling.resolve("auto", "cuda", 10_000) == "off"  # not measured on a GPU yet
    assert compiling.resolve(True, "cuda") == "blocks" and compiling.resolve(False, "cpu", 500) == "off"
    assert compiling.resolve("loss", "cpu", 1) == "loss"
    # Dropout: compiled blocks draw other masks and broke exact resume; auto leaves them eager.
    assert compiling.resolve("auto", "cpu", 300, dropout=True) == "off"
    assert compiling.resolve("blocks", "cpu", 300, dropout=True) == "blocks"  # asked for: done


def test_dropout_is_found_in_modules_and_in_the_attention_config(tiny_bert, tiny_llama):
    from ecoadapt.config import LoraConfig, ModelConfig, TrainConfig
    from ecoadapt.model import adapters, pretrained

    assert compiling.has_dropout(pretrained.load(ModelConfig(str(tiny_bert)), 16).model)  # BERT: 0.1
    llama = pretrained.load(ModelConfig(str(tiny_llama)), 16)
    assert not compiling.has_dropout(llama.model)
    with_lora, _ = adapters.prepare(llama, TrainConfig(), LoraConfig(enabled=True, r=4, dropout=0.05))
    assert compiling.has_dropout(with_lora)
    llama = pretrained.load(ModelConfig(str(tiny_llama)), 16)
    llama.model.config.attention_dropout = 0.1
    assert compiling.has_dropout(llama.model)


class _FakeBackendFailure(Exception):
    """What dynamo raises when the C++ compiler is missing (its module marks it as a compile failure)."""


_FakeBackendFailure.__module__ = "torch._dynamo.exc"


def _failing(*args: object) -> None:
    raise _FakeBackendFailure("InvalidCxxCompiler: No working C++ compiler found")


def test_a_failed_compile_falls_back_under_auto_and_stops_when_asked_for():
    logits, labels = _chunk(torch.float32)
    auto = compiling.CompileClock(what="loss", setting="auto")
    loss, _ = auto.timed(_failing, losses.softmax_grad_inplace)(logits, labels)
    assert torch.isfinite(loss) and auto.fallback is not None and "C++ compiler" in auto.fallback
    assert auto.report()["compiled"] == "off"
    explicit = compiling.CompileClock(what="loss", setting="loss")
    with pytest.raises(UserError, match="train.compile: compiling failed.*C\\+\\+ compiler"):
        explicit.timed(_failing, losses.softmax_grad_inplace)(logits, labels)


def test_compiled_blocks_are_not_offered_with_fsdp():
    from ecoadapt.config import from_dict

    with pytest.raises(UserError, match="train.compile"):
        from_dict(
            {
                "model": {"name_or_path": "some/model"},
                "data": {"train": ["corpus.txt"]},
                "train": {"compile": "blocks"},
                "parallel": {"strategy": "fsdp", "nproc": 2},
            }
        )


def test_a_run_reports_what_it_compiled_and_when(tmp_path, tiny_llama, corpus_jsonl):
    from ecoadapt.commands import adapt
    from ecoadapt.config import from_dict

    torch._dynamo.reset()  # an earlier test compiled the same kernel in this process: compile afresh
    cfg = from_dict(
        {
            "model": {"name_or_path": str(tiny_llama)},
            "data": {"train": [str(corpus_jsonl)], "text_field": "caption", "max_seq_len": 16},
            "train": {"micro_batch_size": 2, "max_steps": 3, "compile": "loss"},
            "measure": {"forecast": False},
            "output": {"dir": str(tmp_path / "run"), "save_model": False},
        }
    )
    c = adapt.adapt(cfg).compile
    assert c is not None and c["setting"] == "loss" and c["compiled"] == "loss" and c["graphs"] >= 1
    # The kernel is used by the training loss only: its compiling is training's, all of it.
    assert 0 < c["training_compile_s"] <= c["compile_s"] + 1e-6
