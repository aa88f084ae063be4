"""A GGUF checkpoint is converted once into a model folder in the cache and then loaded lean,
shard by shard, in the recipe's dtype (a QLoRA base quantized as it loads), the same weights and
tokenizer as transformers' own GGUF reader gives; with no room on disk it is read directly."""

import json
import os
import shutil

import pytest
import torch

from ecoadapt.cli import main
from ecoadapt.config import ModelConfig
from ecoadapt.core.storage import cache_root
from ecoadapt.model import gguf_cache, pretrained
from ecoadapt.model.load_spec import Recipe
from helpers.runs import write_config
from helpers.tiny_models import build_tiny_gguf

pytest.importorskip("gguf", reason="writing a GGUF file needs the gguf package")


def _direct(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": path.name, "local_files_only": True, "dtype": torch.float32}
    return AutoModelForCausalLM.from_pretrained(path.parent, **kwargs), AutoTokenizer.from_pretrained(
        path.parent, gguf_file=path.name
    )


def test_a_gguf_file_is_converted_once_and_loads_the_weights_and_tokenizer_the_gguf_reader_gives(tmp_path, capsys):
    path = build_tiny_gguf(tmp_path / "m")
    first = pretrained.load(ModelConfig(str(path)), 16)
    printed = capsys.readouterr()
    assert "converting tiny.gguf from GGUF" in printed.out + printed.err
    [folder] = (
        (cache_root() / "gguf").iterdir() if False else [p for p in (cache_root() / "gguf").iterdir() if p.is_dir()]
    )
    assert (folder / gguf_cache.MARKER).is_file() and list(folder.glob("*.safetensors"))
    assert first.source == str(path)  # the summary names the user's file, not the cache
    direct, tokenizer = _direct(path)
    for (name, a), (_, b) in zip(direct.state_dict().items(), first.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    text = "the photo of a red bottle"
    assert first.tokenizer(text).input_ids == tokenizer(text).input_ids
    stamp = (folder / gguf_cache.MARKER).stat().st_mtime_ns
    again = pretrained.load(ModelConfig(str(path)), 16, recipe=Recipe("bf16", frozen_base=True))
    printed = capsys.readouterr()
    assert "converting" not in printed.out + printed.err
    assert (folder / gguf_cache.MARKER).stat().st_mtime_ns == stamp
    assert {p.dtype for p in again.model.parameters()} == {torch.bfloat16}  # read lean, in the recipe's dtype


def test_a_replaced_gguf_file_is_converted_again(tmp_path):
    path = build_tiny_gguf(tmp_path / "m")
    before = pretrained.load(ModelConfig(str(path)), 16).model.lm_head.weight.clone()
    build_tiny_gguf(tmp_path / "m", seed=1)
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    after = pretrained.load(ModelConfig(str(path)), 16).model.lm_head.weight
    assert not torch.equal(before, after)
    assert len([p for p in (cache_root() / "gguf").iterdir() if p.is_dir()]) == 2


def test_without_room_on_disk_a_gguf_file_is_read_directly_and_the_log_says_so(tmp_path, monkeypatch, capsys):
    path = build_tiny_gguf(tmp_path / "m")
    real = shutil.disk_usage
    monkeypatch.setattr(gguf_cache.shutil, "disk_usage", lambda p: real(p)._replace(free=1024))
    loaded = pretrained.load(ModelConfig(str(path)), 16)
    printed = capsys.readouterr()
    assert "is read from GGUF at every load" in printed.out + printed.err
    assert not [p for p in (cache_root() / "gguf").iterdir() if p.is_dir()]
    direct, _ = _direct(path)
    assert torch.equal(direct.lm_head.weight, loaded.model.lm_head.weight)


@pytest.mark.slow
def test_a_qlora_run_on_a_gguf_base_quantizes_it_while_loading(tmp_path, corpus_jsonl):
    pytest.importorskip("bitsandbytes")
    path = build_tiny_gguf(tmp_path / "m")
    config = write_config(tmp_path, path, corpus_jsonl, lora={"enabled": True, "r": 4, "quantize": "int8"})
    assert main(["adapt", str(config)]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["model"]["source"] == str(path)
    assert summary["precision"]["quantized_base"]["modules"] > 0
    assert summary["precision"]["load"]["quantize"] == "int8"


def test_a_tied_head_converts_so_that_a_classifier_reads_the_same_embeddings(tmp_path):
    """A classifier has no LM head: the converted folder must hold the embedding under its own
    name (it once held only the head's, and the task's classifier got random embeddings)."""
    from transformers import AutoModelForSequenceClassification

    path = build_tiny_gguf(tmp_path / "m", tied=True)
    loaded = pretrained.load(ModelConfig(str(path)), 16)
    model = loaded.model
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()  # still tied
    direct, _ = _direct(path)
    assert torch.equal(direct.get_input_embeddings().weight, model.get_input_embeddings().weight)
    [folder] = [p for p in (cache_root() / "gguf").iterdir() if p.is_dir()]
    kwargs = {"num_labels": 2, "dtype": torch.float32}
    converted = AutoModelForSequenceClassification.from_pretrained(folder, **kwargs)
    gguf_read = AutoModelForSequenceClassification.from_pretrained(path.parent, gguf_file=path.name, **kwargs)
    assert torch.equal(converted.get_input_embeddings().weight, gguf_read.get_input_embeddings().weight)


def test_the_shapes_of_a_gguf_model_are_read_from_its_file_for_a_plan(tmp_path):
    """`plan` from the shapes alone (and bench/lean_load.py's planned column) reads a GGUF
    file's metadata as transformers does, not a hub id named like the file."""
    from ecoadapt.config import from_dict
    from ecoadapt.forecast import from_shapes

    path = build_tiny_gguf(tmp_path / "m")
    cfg = from_dict(
        {"model": {"name_or_path": str(path), "objective": "clm"}, "data": {"train": ["builtin:python-docstrings"]}}
    )
    config = from_shapes.model_config(cfg)
    direct, _ = _direct(path)
    assert config.hidden_size == direct.config.hidden_size
    assert config.num_hidden_layers == direct.config.num_hidden_layers
    probe = from_shapes.probe(cfg, device_type="cpu")
    weights = sum(p.numel() for p in direct.parameters()) * 4  # fp32 full: 4 bytes a weight
    assert probe["static_bytes"]["weights"] == pytest.approx(weights, rel=0.05)
