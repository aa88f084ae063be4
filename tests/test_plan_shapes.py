"""`plan --device` from a config.json alone: the recipe built on the meta device counts the same
weights, gradients and optimizer state as the recipe built from the real weights."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from ecoadapt.cli import main
from ecoadapt.config import from_dict
from ecoadapt.forecast import from_shapes
from ecoadapt.model import footprint, parallel
from ecoadapt.train import prepare
from helpers.tiny_models import build_tiny_llama


@pytest.fixture(scope="module")
def llama64(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("llama64"), hidden=64)


def _cfg(model: Path, corpus: Path, **sections):
    raw = {
        "model": {"name_or_path": str(model)},
        "data": {"train": [str(corpus)], "text_field": "caption", "max_seq_len": 16},
        "train": {"max_steps": 4, "micro_batch_size": 2, "gradient_checkpointing": True},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return from_dict(raw)


RECIPES = [
    {"precision": {"mode": "bf16"}, "lora": {"enabled": True, "r": 4}},
    {"precision": {"mode": "bf16-pure"}, "lora": {"enabled": True, "r": 4}},
    {"precision": {"mode": "bf16-pure"}},  # full: fp32 masters of every weight
    {"precision": {"mode": "fp32"}, "train": {"optimizer": "adamw8bit"}},
    {"precision": {"mode": "bf16"}, "lora": {"enabled": True, "r": 4, "quantize": "nf4"}},
]


@pytest.mark.parametrize("sections", RECIPES, ids=lambda s: str(s))
def test_the_shapes_count_what_the_real_recipe_stores(llama64, corpus_jsonl, sections):
    if sections.get("lora", {}).get("quantize") or sections.get("train", {}).get("optimizer"):
        pytest.importorskip("bitsandbytes")
    cfg = _cfg(llama64, corpus_jsonl, **sections)
    planned = from_shapes.probe(cfg)["static_bytes"]
    device = torch.device("cpu")
    loaded = prepare.load_model(cfg, device)
    blocks = torch.randint(0, 50, (8, 16))
    built = prepare.build(cfg, loaded, blocks, device, parallel.World(), lambda _: None)
    from ecoadapt.train.param_groups import adamw

    model = parallel.unwrap(built.model)
    groups = [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": 0.0}]
    adamw(built.policy.optimizer_params(groups), 1e-3, cfg.train.optimizer)  # bf16-pure's masters are made here
    real = footprint.static_bytes(model, built.policy, cfg.train.optimizer)
    for part in ("gradients", "optimizer"):
        assert planned[part] == real[part], part
    # NF4's scales are counted per block of values, bitsandbytes' own layout rounds them: within 3%
    assert planned["weights"] == pytest.approx(real["weights"], rel=0.03)


def test_a_model_with_no_weights_here_is_planned_for_a_gpu_from_its_config(tmp_path, llama64, corpus_jsonl, capsys):
    shapes_only = tmp_path / "config-only"
    shapes_only.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(llama64 / name, shapes_only / name)
    config = tmp_path / "plan.yaml"
    config.write_text(
        f"model: {{name_or_path: {shapes_only}}}\n"
        f"data: {{train: [{corpus_jsonl}], text_field: caption, max_seq_len: 16}}\n"
        "precision: {mode: bf16}\nlora: {enabled: true, r: 4}\ntrain: {max_steps: 10, gradient_checkpointing: true}\n"
    )
    assert main(["plan", str(config), "--device", "t4"]) == 0
    out = capsys.readouterr().out
    assert "from the model's shapes on the meta device" in out
    assert "recommended on NVIDIA T4: bf16 lora ckpt" in out
    # Without a device there is nothing to run trial steps on: the error says what works.
    assert main(["plan", str(config)]) == 2
    err = capsys.readouterr().err
    assert "holds a config.json and no weights" in err and "plan --device NAME" in err
