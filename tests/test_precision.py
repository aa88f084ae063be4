"""Precision modes, fp32 master weights, loss scaling, per-layer maps and the sensitivity search."""

import json

import pytest
import torch

from ecoadapt.config import ModelConfig, TrainConfig, load
from ecoadapt.core.errors import UserError
from ecoadapt.model import layerwise, pretrained
from ecoadapt.model.precision import Policy
from helpers.runs import fit_tiny, run_command

STEPS = TrainConfig(max_steps=20, lr=1e-2, micro_batch_size=4, log_every=5, warmup_ratio=0)


@pytest.mark.parametrize(("mode", "rel"), [("bf16", 0.03), ("fp16", 0.01), ("tf32", 1e-6), ("bf16-pure", 0.05)])
def test_loss_after_n_steps_matches_fp32(tiny_llama, mode, rel):
    reference, _, _ = fit_tiny(tiny_llama, STEPS, mode="fp32")
    result, _, policy = fit_tiny(tiny_llama, STEPS, mode=mode)
    assert result.logs[-1].loss == pytest.approx(reference.logs[-1].loss, rel=rel)
    assert result.logs[-1].loss < 0.8 * result.logs[0].loss  # and it learned
    if mode == "tf32":
        assert any("plain fp32" in n for n in policy.notes)  # no TF32 on a CPU, and it says so


def test_bf16_pure_stores_bf16_and_keeps_small_updates_in_fp32_masters(tiny_llama):
    cfg = TrainConfig(max_steps=3, lr=1e-5, micro_batch_size=4, warmup_ratio=0, max_grad_norm=None)
    _, model, policy = fit_tiny(tiny_llama, cfg, mode="bf16-pure")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert policy.master_bytes == 4 * sum(p.numel() for p in model.parameters())
    # Every stored weight is its master rounded to bf16 (the multi-tensor copy back).
    assert all(torch.equal(p, master.to(torch.bfloat16)) for p, master in policy._masters)
    # lr 1e-5 moves weights by ~1e-5, far below bf16's resolution near 1.0 (2^-8): the norm
    # weights (all 1.0) cannot show it, but their fp32 masters must have moved.
    for p, master in policy._masters:
        if p.ndim == 1 and torch.all(p == 1):
            assert not torch.all(master == 1.0)
            break
    else:
        pytest.fail("no norm weight found")


def test_fp16_overflow_skips_the_step_lowers_the_scale_and_training_goes_on(tiny_llama):
    model = pretrained.load(ModelConfig(str(tiny_llama)), 16).model
    policy = Policy("fp16", "cpu")
    groups = policy.optimizer_params([{"params": list(model.parameters())}])
    optimizer = torch.optim.AdamW(groups, lr=1e-3)
    params = list(model.parameters())
    ids = torch.randint(5, 30, (2, 16))
    before = [p.detach().clone() for p in params]
    scale0 = policy.loss_scale
    with policy.autocast():
        loss = model(input_ids=ids, labels=ids).loss
    policy.backward(loss * float("inf"))  # injected overflow
    assert policy.step(optimizer, params, 1.0) == "overflow"
    optimizer.zero_grad()
    assert policy.skipped_steps == 1 and policy.loss_scale < scale0
    assert all(torch.equal(a, b) for a, b in zip(before, params, strict=True))  # nothing applied
    with policy.autocast():
        loss = model(input_ids=ids, labels=ids).loss
    policy.backward(loss)
    assert policy.step(optimizer, params, 1.0) == "stepped"
    assert any(not torch.equal(a, b) for a, b in zip(before, params, strict=True))


def test_layer_map_sets_weights_and_computation(tiny_llama):
    model = pretrained.load(ModelConfig(str(tiny_llama)), 16).model
    fp32_bytes = layerwise.weight_bytes(model)
    applied = layerwise.apply_map(model, {"model.layers.1": "bf16", "*norm*": "fp32"}, "cpu")
    assert applied["model.layers.1"] == "bf16" and applied["model.layers.1.input_layernorm"] == "fp32"
    block = model.model.layers[1]
    assert block.mlp.down_proj.weight.dtype == torch.bfloat16
    assert block.input_layernorm.weight.dtype == torch.float32
    assert model.model.layers[0].mlp.down_proj.weight.dtype == torch.float32
    seen = {}
    for name in ("model.layers.0.mlp", "model.layers.1.mlp", "model.layers.1.post_attention_layernorm"):
        module = model.get_submodule(name)
        module.register_forward_hook(lambda m, i, o, n=name: seen.setdefault(n, o.dtype) and None)
    ids = torch.randint(5, 30, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the map wins over a global autocast too
        model(input_ids=ids)
    assert seen == {
        "model.layers.0.mlp": torch.bfloat16,  # not in the map: autocast decides
        "model.layers.1.mlp": torch.bfloat16,
        "model.layers.1.post_attention_layernorm": torch.float32,
    }
    model(input_ids=ids)  # and without autocast the fp32 block computes in fp32
    assert layerwise.weight_bytes(model) < fp32_bytes  # 16-bit storage really is smaller
    effective = layerwise.effective_dtypes(model)
    assert effective["model.layers.1.mlp.up_proj"] == "bfloat16" and effective["model.norm"] == "float32"


def test_layer_map_errors(tiny_llama):
    model = pretrained.load(ModelConfig(str(tiny_llama)), 16).model
    with pytest.raises(UserError, match="pattern 'encoder.*' matches no module"):
        layerwise.apply_map(model, {"encoder.*": "bf16"}, "cpu")
    with pytest.raises(UserError, match="dtype must be one of fp32, bf16, fp16"):
        layerwise.apply_map(model, {"model.norm": "int8"}, "cpu")


def test_auto_search_keeps_a_sensitive_block_in_fp32(tiny_llama):
    model = pretrained.load(ModelConfig(str(tiny_llama)), 16).model
    name, blocks = pretrained.transformer_blocks(model)

    # Block 1 made artificially sensitive: whenever its MLP computes in bf16, its output is way off.
    def sensitive(module, inputs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        if hidden.dtype == torch.bfloat16:  # a fixed, large perturbation (a norm follows: no scaling)
            noise = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(0))
            hidden = hidden + 3 * noise.to(hidden.dtype)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    blocks[1].mlp.down_proj.register_forward_hook(sensitive)
    with torch.no_grad():  # sharper logits, so that the loss reacts to what the blocks compute
        model.lm_head.weight.mul_(50)
    ids = torch.randint(5, 30, (8, 16), generator=torch.Generator().manual_seed(0))

    def loss():
        return model(input_ids=ids, labels=ids).loss.item()

    base = loss()
    found = layerwise.search(model, name, blocks, loss, "bf16", tolerance=0.01, device_type="cpu")
    assert found.chosen == {"model.layers.0": "bf16"}
    assert found.sensitivity["model.layers.1"] > 0.01 > found.sensitivity["model.layers.0"]
    assert found.predicted_weight_saving_bytes == 2 * sum(p.numel() for p in blocks[0].parameters())
    assert loss() == base  # the search left the model exactly as it found it
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_layers_config_accepts_a_map_or_auto(tmp_path):
    base = ["model.name_or_path=m", "data.train=x"]
    cfg = load(None, [*base, 'precision.layers={"*.layers.*": bf16, "*norm*": fp32}'])
    assert cfg.precision.layers == {"*.layers.*": "bf16", "*norm*": "fp32"}
    assert load(None, [*base, "precision.layers=auto"]).precision.layers == "auto"
    with pytest.raises(UserError, match="precision.layers"):
        load(None, [*base, "precision.layers=auto", "precision.mode=bf16-pure"])
    with pytest.raises(UserError, match=r"precision\.layers = \[1, 2\] is not valid"):
        load(None, [*base, "precision.layers=[1, 2]"])


def test_adapt_with_auto_layers_and_bf16_pure_lora(tmp_path, tiny_llama, corpus_jsonl):
    common = {
        "model.name_or_path": tiny_llama, "data.train": corpus_jsonl, "data.text_field": "caption",
        "data.max_seq_len": 16, "data.eval_fraction": 0.1, "train.max_steps": 4, "train.micro_batch_size": 2,
        "measure.energy": "estimate",
    }  # fmt: skip
    runs = {
        "auto": {"precision.layers": "auto", "precision.tolerance": 0.5},
        "pure": {"precision.mode": "bf16-pure", "lora.enabled": True},
    }
    for name, extra in runs.items():
        sets = {**common, **extra, "output.dir": tmp_path / name}
        assert run_command("adapt", tmp_path, sets) == 0
    auto = json.loads((tmp_path / "auto" / "summary.json").read_text())["precision"]
    assert len(auto["search"]["table"]) == 2 and auto["layers"]  # generous tolerance: something lowered
    assert auto["weight_bytes"] < auto["weight_bytes_before"]
    pure = json.loads((tmp_path / "pure" / "summary.json").read_text())["precision"]
    assert pure["mode"] == "bf16-pure" and pure["compute_dtype"] == "bfloat16"
    assert set(pure["layers_effective"].values()) == {"bfloat16"}
    # Read in bf16 from the start (no fp32 copy); only the fp32 adapters are cast down after
    assert pure["load"]["dtype"] == "bf16" and pure["weight_bytes"] < pure["weight_bytes_before"]
    assert "matmul_speedup_vs_fp32" in pure


def test_layer_map_without_autocast_reconciles_unmatched_modules(tiny_bert):
    from ecoadapt.data.batches import IGNORE
    from ecoadapt.model.losses import forward_logits

    model = pretrained.load(ModelConfig(str(tiny_bert)), 16).model
    layerwise.apply_map(model, {"bert.encoder.layer.*": "bf16"}, "cpu", default=torch.float32)
    ids = torch.randint(5, 30, (2, 16))
    labels = torch.where(torch.rand(ids.shape) < 0.3, ids, IGNORE)
    logits, _ = forward_logits(model, ids, labels, "mlm")  # the fp32 head receives bf16 hidden states
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


def test_mfu_above_one_is_not_reported():
    from ecoadapt.measure import flops

    report = flops.mfu_report(flops.FlopCount(6e6, 2e6, 4e6, 0), tokens_per_s=1e6, peak=1e10, peak_source="measured")
    assert report["mfu"] is None and "exceeds the probed peak" in report["note"]


def test_auto_search_on_an_encoder_without_autocast(tiny_bert):
    # BERT blocks end in a LayerNorm: a lowered block hands bf16 to the next, fp32 one.
    model = pretrained.load(ModelConfig(str(tiny_bert)), 16).model
    name, blocks = pretrained.transformer_blocks(model)
    ids = torch.randint(5, 30, (4, 16))

    def loss():
        return model(input_ids=ids, labels=ids).loss.item()

    base = loss()
    found = layerwise.search(model, name, blocks, loss, "bf16", 0.5, "cpu", default=torch.float32)
    assert set(found.sensitivity) == {"bert.encoder.layer.0", "bert.encoder.layer.1"}
    assert loss() == base
