"""The chunked causal-LM loss equals the model's own head + cross-entropy, value and gradients."""

import pytest
import torch

from ecoadapt.config import LoraConfig, ModelConfig, TrainConfig
from ecoadapt.data.batches import IGNORE
from ecoadapt.model import adapters, losses, pretrained
from ecoadapt.model.losses import loss_sum


def chunks_of(monkeypatch, rows, vocab=40):
    """Chunks of ``rows`` rows for the tiny models' 40-word vocabulary (no widening)."""
    monkeypatch.setattr(losses, "CHUNK_ELEMENTS", {"cpu": rows * vocab})
    monkeypatch.setattr(losses, "SKINNY_ROWS", 1)


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("lora", [False, True])
def test_chunked_loss_matches_full_logits(tiny_llama, monkeypatch, lora):
    chunks_of(monkeypatch, 7)  # 7 rows a chunk: many, uneven chunks
    loaded = pretrained.load(ModelConfig(str(tiny_llama)), 16, seed=0)
    model, _ = adapters.prepare(loaded, TrainConfig(), LoraConfig(enabled=lora, r=4))
    ids = torch.randint(5, 30, (3, 16), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[0, :5] = IGNORE  # some positions without a target
    model.eval()  # no dropout: both passes see the same function

    full = loss_sum(model(input_ids=ids).logits, labels, "clm")
    full.backward()
    expected = grads(model)
    model.zero_grad()

    assert losses.lm_parts(model) is not None
    chunked = losses.training_loss_sum(model, ids, labels, "clm")
    chunked.backward()
    got = grads(model)
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-4)
    assert got.keys() == expected.keys() and expected  # the same parameters receive gradients
    if not lora:  # the tied head/embedding weight trains: its gradient has both parts
        assert any("embed" in n for n in got)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)


def test_chunked_loss_under_bf16_autocast_matches_the_models_head(tiny_llama):
    loaded = pretrained.load(ModelConfig(str(tiny_llama)), 16, seed=0)
    model = loaded.model.eval()
    ids = torch.randint(5, 30, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        full = loss_sum(model(input_ids=ids).logits, ids, "clm")
        chunked = losses.training_loss_sum(model, ids, ids, "clm")
    torch.testing.assert_close(chunked, full, rtol=1e-3, atol=1e-3)


def test_heads_that_are_not_plain_linear_use_the_models_forward(tiny_bert, tiny_llama):
    loaded = pretrained.load(ModelConfig(str(tiny_llama)), 16, seed=0)
    loaded.model.config.final_logit_softcapping = 30.0
    assert losses.lm_parts(loaded.model) is None
    assert losses.lm_parts(pretrained.load(ModelConfig(str(tiny_bert)), 16).model) is None  # BERT's head has a bias


@pytest.mark.parametrize("mode", ["fp32", "bf16"])
def test_masked_lm_chunked_head_matches_the_models_head(tiny_bert, monkeypatch, mode):
    from ecoadapt.model.losses import forward_logits, training_loss_sum

    chunks_of(monkeypatch, 5)  # several chunks
    loaded = pretrained.load(ModelConfig(str(tiny_bert)), 32, seed=0)
    model = loaded.model.eval()
    ids = torch.randint(5, 30, (3, 16), generator=torch.Generator().manual_seed(2))
    labels = torch.full_like(ids, IGNORE)
    labels[:, ::4] = ids[:, ::4]
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if mode == "bf16" else torch.autocast("cpu", enabled=False)
    with ctx:
        logits, lab = forward_logits(model, ids, labels, "mlm")
        full = loss_sum(logits, lab, "mlm")
    full.backward()
    expected = grads(model)
    model.zero_grad()
    with ctx:
        chunked = training_loss_sum(model, ids, labels, "mlm")
    chunked.backward()
    got = grads(model)
    tol = {"rtol": 1e-5, "atol": 1e-4} if mode == "fp32" else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(chunked, full, **tol)
    assert got.keys() == expected.keys()
    assert any(n.endswith("predictions.bias") or n.endswith("decoder.bias") for n in got)  # the bias trains
    for name in expected:
        torch.testing.assert_close(
            got[name], expected[name], msg=name, **({"rtol": 1e-4, "atol": 1e-6} if mode == "fp32" else tol)
        )


@pytest.mark.parametrize("objective", ["clm", "mlm"])
def test_chunked_held_out_scores_match_the_full_logits(tiny_llama, tiny_bert, monkeypatch, objective):
    chunks_of(monkeypatch, 3)  # many small chunks
    folder = tiny_llama if objective == "clm" else tiny_bert
    model = pretrained.load(ModelConfig(str(folder)), 16, seed=0).model.eval()
    ids = torch.randint(5, 30, (3, 16), generator=torch.Generator().manual_seed(3))
    labels = ids.clone() if objective == "clm" else torch.full_like(ids, IGNORE)
    if objective == "mlm":
        labels[:, ::3] = ids[:, ::3]
    assert losses.head_rows(model, ids, labels, objective) is not None  # the chunked path is the one tested
    total, hits, targets = losses.score_sums(model, ids, labels, objective)
    logits, lab = losses.forward_logits(model, ids, labels, objective)
    torch.testing.assert_close(total, loss_sum(logits, lab, objective), rtol=1e-5, atol=1e-4)
    if objective == "clm":
        logits, lab = logits[:, :-1], lab[:, 1:]
    keep = lab != IGNORE
    assert int(targets) == int(keep.sum())
    assert int(hits) == int((logits.argmax(-1)[keep] == lab[keep]).sum())


def test_chunks_are_sized_by_device_and_skinny_ones_widened():
    assert losses.chunk_rows(49_152, "cuda") == 2**25 // 49_152 > 600  # enough rows to keep a GPU busy
    assert losses.chunk_rows(49_152, "cpu") == 2**22 // 49_152 == 85  # SmolLM2: as the cap says
    assert losses.chunk_rows(262_144, "cpu") == 256  # Gemma 3: not 16, bound by reading the head
    assert losses.chunk_rows(262_144, "cuda") == 128  # the GPU cap already gives 128 (>= 64)
    assert losses.chunk_rows(2**20, "cpu") == 128  # a million words: the byte ceiling wins
    assert losses.chunk_rows(10**9, "cpu") == 1
