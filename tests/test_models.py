"""Model resolution, objective detection, and what trains."""

import pytest
import torch

from ecoadapt.config import LoraConfig, ModelConfig, TrainConfig
from ecoadapt.core.errors import UserError
from ecoadapt.model import adapters, pretrained


def test_objective_is_detected_from_the_architecture(tiny_bert, tiny_llama):
    assert pretrained.load(ModelConfig(str(tiny_bert)), 32).objective == "mlm"
    assert pretrained.load(ModelConfig(str(tiny_llama)), 32).objective == "clm"


def test_objective_can_be_forced(tiny_bert):
    loaded = pretrained.load(ModelConfig(str(tiny_bert), objective="clm"), 32)
    assert loaded.objective == "clm"
    assert type(loaded.model).__name__ == "BertLMHeadModel"


def test_sequence_length_above_the_model_limit(tiny_bert):
    with pytest.raises(UserError, match="data.max_seq_len = 65 is above this model's limit of 64"):
        pretrained.load(ModelConfig(str(tiny_bert)), 65)


def test_missing_models_fail_at_once(tmp_path):
    with pytest.raises(UserError, match="no such folder"):
        pretrained.resolve(str(tmp_path / "nope"))
    with pytest.raises(UserError, match="no config.json"):
        pretrained.resolve(str(tmp_path))
    with pytest.raises(UserError, match="unknown packaged model"):
        pretrained.resolve("pkg:nope")
    with pytest.raises(UserError, match="not in the local Hugging Face cache.*HF_HUB_OFFLINE=1"):  # conftest: offline
        pretrained.load(ModelConfig("some-org/surely-not-cached-model"), 32)


def test_newly_initialised_head_is_reported(tiny_bert, tmp_path):
    from transformers import BertConfig, BertModel

    # An encoder saved without its MLM head (like the MiniLM package) gets a fresh head.
    bare = tmp_path / "bare"
    BertModel(BertConfig.from_pretrained(tiny_bert)).save_pretrained(bare)
    for f in tiny_bert.glob("tok*"):
        (bare / f.name).write_bytes(f.read_bytes())
    loaded = pretrained.load(ModelConfig(str(bare)), 32)
    assert loaded.fresh and all(n.startswith("cls.") for n in loaded.fresh)
    assert "cls.predictions.decoder.weight" not in loaded.fresh  # tied to the embeddings


def test_trainable_layers_stops_the_backward_pass(tiny_llama):
    loaded = pretrained.load(ModelConfig(str(tiny_llama)), 32)
    model, plan = adapters.prepare(loaded, TrainConfig(trainable_layers=1), LoraConfig())
    assert plan.blocks == [1] and plan.n_blocks == 2
    assert "model.norm" in plan.extra_trainable
    called = []
    model.model.layers[0].register_full_backward_hook(lambda *a: called.append("block0"))
    model.model.layers[1].register_full_backward_hook(lambda *a: called.append("block1"))
    ids = torch.randint(0, 30, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    assert called == ["block1"]  # block 0 never ran backward
    assert all(p.grad is None for p in model.model.layers[0].parameters())
    assert all(p.grad is not None for p in model.model.layers[1].parameters())
    assert model.model.embed_tokens.weight.grad is None  # the tied head stays frozen


def test_lora_trains_only_adapters_on_the_chosen_blocks(tiny_llama):
    loaded = pretrained.load(ModelConfig(str(tiny_llama)), 32)
    model, _ = adapters.prepare(loaded, TrainConfig(trainable_layers=1), LoraConfig(enabled=True, r=4))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert all(".layers.1." in n for n in trainable)
    assert pretrained.parameter_counts(model)["trainable"] < pretrained.parameter_counts(model)["total"] / 5


def test_lora_with_checkpointing_keeps_the_backward_above_the_adapters(tiny_llama):
    loaded = pretrained.load(ModelConfig(str(tiny_llama)), 32)
    train = TrainConfig(trainable_layers=1, gradient_checkpointing=True)
    model, _ = adapters.prepare(loaded, train, LoraConfig(enabled=True, r=4))
    model.train()
    inner = model.get_base_model()
    called = []
    inner.model.layers[0].register_full_backward_hook(lambda *a: called.append("block0"))
    ids = torch.randint(0, 30, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    assert called == []  # PEFT's input-grad hook would send the backward pass through block 0
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)


def test_lora_bad_target_modules(tiny_llama):
    loaded = pretrained.load(ModelConfig(str(tiny_llama)), 32)
    with pytest.raises(UserError, match="lora.target_modules"):
        adapters.prepare(loaded, TrainConfig(), LoraConfig(enabled=True, target_modules=["nope_proj"]))


def test_hub_id_loads_from_the_local_cache_only(tiny_llama, tmp_path, monkeypatch):
    # Lay the tiny model out as the Hugging Face cache does: models--ORG--NAME/snapshots/REV.
    repo = tmp_path / "hub" / "models--tiny-org--tiny-llama"
    snapshot = repo / "snapshots" / "0123456789abcdef"
    snapshot.mkdir(parents=True)
    for f in tiny_llama.iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123456789abcdef")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    loaded = pretrained.load(ModelConfig("tiny-org/tiny-llama"), 32)
    assert loaded.objective == "clm"
    assert loaded.source == "tiny-org/tiny-llama"
    with pytest.raises(UserError, match="not in the local Hugging Face cache"):
        pretrained.load(ModelConfig("tiny-org/other-model"), 32)


def test_models_load_with_sdpa_attention(tiny_llama, tiny_bert):
    """Fused attention kernels (flash or memory-efficient on GPUs): no (sequence x sequence)
    matrix kept, which the micro-batch choice's memory model counts on."""
    from ecoadapt.config import ModelConfig
    from ecoadapt.model import pretrained

    for folder in (tiny_llama, tiny_bert):
        assert pretrained.load(ModelConfig(str(folder)), 16, seed=0).model.config._attn_implementation == "sdpa"
