"""`plan --device` from a config.json alone: the recipe built on the meta device counts the same
weights, gradients and optimizer state as the recipe built from the real weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from ecoadapt.cli import main
from ecoadapt.config import from_dict
from ecoadapt.forecast import from_shapes
from ecoadapt.model import footprint, parallel, pretrained, quantize
from ecoadapt.model.losses import chunk_rows
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
    {"precision": {"mode": "bf16"}, "lora": {"enabled": True, "r": 4, "quantize": "int8"}},
]


@pytest.mark.parametrize("sections", RECIPES, ids=lambda s: str(s))
def test_the_shapes_count_what_the_real_recipe_stores(llama64, corpus_jsonl, sections):
    if sections.get("lora", {}).get("quantize") or sections.get("train", {}).get("optimizer"):
        pytest.importorskip("bitsandbytes")
    cfg = _cfg(llama64, corpus_jsonl, **sections)
    planned = from_shapes.probe(cfg, device_type="cpu")["static_bytes"]  # as built here
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
    kind = sections.get("lora", {}).get("quantize")
    _, blocks = pretrained.transformer_blocks(model)
    linears = [m for m in blocks.modules() if quantize.is_quantized(m)]
    scales = 4 * sum(m.out_features for m in linears) if kind == "int8" else 0  # int8's fp32 row scales: no Parameter
    # NF4's scales are counted per block of values, bitsandbytes' own layout rounds them: within 3%
    assert planned["weights"] == pytest.approx(real["weights"] + scales, rel=0.03)
    if kind:  # the one weight dequantized at a time: NF4 in bf16; int8 in fp32 and autocast's bf16 copy
        largest = max(m.in_features * m.out_features for m in linears)
        assert planned["dequantized_weight"] == (2 if kind == "nf4" else 4 + 2) * largest
    else:
        assert "dequantized_weight" not in planned


def test_the_logits_chunk_is_one_chunk_of_the_micro_batchs_rows_at_the_losss_peak(llama64, corpus_jsonl):
    vocab = int(json.loads((llama64 / "config.json").read_text())["vocab_size"])
    for mode, per_value in (("bf16", 12), ("fp32", 8)):  # logits, fp32 copy, logsumexp's temporary, gradient
        cfg = _cfg(llama64, corpus_jsonl, lora={"enabled": True, "r": 4}, precision={"mode": mode})
        chunks = {d: from_shapes.probe(cfg, device_type=d)["static_bytes"]["logits_chunk"] for d in ("cpu", "cuda")}
        # 2 blocks of 16 tokens: fewer rows than either device's chunk, so the micro-batch's rows.
        assert chunk_rows(vocab, "cpu") > 32 and chunks == {
            "cpu": 32 * vocab * per_value,
            "cuda": 32 * vocab * per_value,
        }
    # Gemma's 262,144 words over 4 blocks of 1,024 tokens: a chunk is the device's own.
    long = _cfg(llama64, corpus_jsonl, data={"max_seq_len": 1024}, train={"micro_batch_size": 4})
    for device in ("cpu", "cuda"):
        assert from_shapes._logits_chunk_bytes(long, 262144, 2, device) == chunk_rows(262144, device) * 262144 * 12
    assert chunk_rows(262144, "cpu") > chunk_rows(262144, "cuda")  # 256 rows (wide) against 128


def test_a_tokenizer_held_by_the_run_is_counted_in_the_process(llama64, corpus_jsonl, monkeypatch):
    from ecoadapt.measure import memory

    held = 96 * 2**20

    def a_large_tokenizer(model_cfg):
        return torch.ones(held // 4)  # pages written: resident, as a 262k-word vocabulary's are

    monkeypatch.setattr(from_shapes, "_TOKENIZERS", {})
    monkeypatch.setattr(pretrained, "load_tokenizer", a_large_tokenizer)
    before = memory.rss_bytes()
    probe = from_shapes.probe(_cfg(llama64, corpus_jsonl, lora={"enabled": True, "r": 4}))
    assert probe["process_bytes"] >= before + held * 0.9
    # A model whose tokenizer is not here (a hub id's config alone) is planned without it.
    monkeypatch.setattr(from_shapes, "_TOKENIZERS", {})
    monkeypatch.setattr(pretrained, "load_tokenizer", lambda _: (_ for _ in ()).throw(OSError("no tokenizer.json")))
    assert from_shapes.probe(_cfg(llama64, corpus_jsonl))["process_bytes"] > 0
    assert {str(llama64): None} == from_shapes._TOKENIZERS


def _config_only(model: Path, folder: Path) -> Path:
    """A model folder as a hub id's config and tokenizer without its weights."""
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(model / name, folder / name)
    return folder


def _written(tmp_path: Path, cfg) -> Path:
    """``cfg`` as the config file `ecoadapt plan` reads (JSON is YAML)."""
    path = tmp_path / "plan.yaml"
    path.write_text(json.dumps(cfg.to_dict()))
    return path


def test_a_model_with_no_weights_here_is_planned_for_a_gpu_from_its_config(tmp_path, llama64, corpus_jsonl, capsys):
    shapes_only = _config_only(llama64, tmp_path / "config-only")
    config = _written(tmp_path, _cfg(shapes_only, corpus_jsonl, precision={"mode": "bf16"},
                                     lora={"enabled": True, "r": 4}, train={"max_steps": 10}))  # fmt: skip
    assert main(["plan", str(config), "--device", "t4"]) == 0
    out = capsys.readouterr().out
    assert "from the model's shapes on the meta device" in out
    assert "recommended on NVIDIA T4: bf16 lora ckpt" in out
    # Without a device there is nothing to run trial steps on: the error says what works.
    assert main(["plan", str(config)]) == 2
    err = capsys.readouterr().err
    assert "holds a config.json and no weights" in err and "plan --device NAME" in err


def test_a_model_with_no_weights_here_is_planned_for_a_cpu_machine_from_its_config(
    tmp_path, llama64, corpus_jsonl, capsys
):
    shapes_only = _config_only(llama64, tmp_path / "config-only")
    recipe = {"precision": {"mode": "bf16-pure"}, "lora": {"enabled": True, "r": 4}}
    no_ckpt = {"max_steps": 10, "gradient_checkpointing": False}
    config = _written(tmp_path, _cfg(shapes_only, corpus_jsonl, train=no_ckpt, **recipe))
    out_json = tmp_path / "plan.json"
    assert main(["plan", str(config), "--device", "cpu-16gb", "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert "projection for a CPU machine with 16 GiB of RAM (14.4 GiB usable)" in out
    assert "time at this machine's measured matmul rate" in out
    assert "recommended on a CPU machine with 16 GiB of RAM: bf16-pure lora" in out
    (row,) = json.loads(out_json.read_text())["recipes"]
    cpu = from_shapes.probe(_cfg(shapes_only, corpus_jsonl, train=no_ckpt, **recipe), device_type="cpu")
    # A CPU's logits chunk, not a GPU's, and the process's own resident set beside the shapes.
    assert row["parts_bytes"]["logits_chunk"] == cpu["static_bytes"]["logits_chunk"]
    assert row["peak_bytes"] == sum(row["parts_bytes"].values()) and row["parts_bytes"]["process"] > 0


def test_bitsandbytes_int8_layer_on_a_cpu_dequantizes_to_its_fp32_input_under_autocast(monkeypatch):
    """What the int8 count above rests on: under bf16 autocast, an fp32 input (the residual
    stream's) makes bitsandbytes' CPU int8 layer dequantize its weight to fp32, which autocast then
    copies to bf16 for the matmul. Should bitsandbytes change this, the count must change too."""
    bnb = pytest.importorskip("bitsandbytes")
    layer = bnb.nn.Linear8bitLt(64, 32, bias=False, has_fp16_weights=False)
    layer.weight = bnb.nn.Int8Params(torch.randn(32, 64), requires_grad=False, has_fp16_weights=False)
    layer = layer.to("cpu")
    layer.train()
    seen: list[torch.dtype] = []
    linear = torch.nn.functional.linear

    def recording(x, weight, bias=None):
        seen.append(weight.dtype)
        return linear(x, weight, bias)

    monkeypatch.setattr(torch.nn.functional, "linear", recording)
    x = torch.randn(3, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert seen == [torch.float32] and y.dtype == torch.bfloat16
