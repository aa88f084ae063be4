"""A large tensor converted as it loads is read a band of rows at a time into its destination:
the same values as converting it whole, without the whole tensor in its stored dtype."""

import pytest
import torch
from safetensors.torch import save_file

from ecoadapt.config import ModelConfig
from ecoadapt.model import pretrained, shard_reader
from ecoadapt.model.load_spec import Recipe
from helpers.tiny_models import build_tiny_llama

BAND = 4096  # bytes per band in these tests: a 64-wide fp32 row is 256 bytes, 16 rows a band


@pytest.fixture
def small_bands(monkeypatch):
    monkeypatch.setattr(shard_reader, "BAND_BYTES", BAND)


def test_a_band_by_band_read_gives_the_values_of_a_whole_conversion(tmp_path, small_bands):
    torch.manual_seed(0)
    tensors = {
        "embed": torch.randn(1000, 64),  # 62.5 bands: the last band is partial
        "small": torch.randn(8, 64),  # under two bands: read whole by the caller
        "ids": torch.arange(4096, dtype=torch.int64).reshape(64, 64),  # not float
        "half": torch.randn(1000, 64).to(torch.bfloat16),  # already the target dtype
    }
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path))
    banded = shard_reader.read_as(path, "embed", torch.bfloat16)
    assert banded is not None and banded.dtype == torch.bfloat16 and banded.shape == (1000, 64)
    assert torch.equal(banded, tensors["embed"].to(torch.bfloat16))
    assert torch.equal(shard_reader.read_as(path, "embed", torch.float16), tensors["embed"].to(torch.float16))
    for name in ("small", "ids", "half"):
        assert shard_reader.read_as(path, name, torch.bfloat16) is None, name
    assert shard_reader.read_as(path, "missing", torch.bfloat16) is None


def test_a_truncated_shard_is_an_error_not_silent_zeros(tmp_path, small_bands):
    path = tmp_path / "model.safetensors"
    save_file({"embed": torch.randn(1000, 64)}, str(path))
    data = path.read_bytes()
    assert shard_reader.read_as(path, "embed", torch.bfloat16) is not None  # its header is read (and kept)
    path.write_bytes(data[: len(data) - 10_000])  # saved again at the same path: read again
    with pytest.raises(OSError, match="ended early"):
        shard_reader.read_as(path, "embed", torch.bfloat16)


def test_a_model_stored_in_fp32_loads_in_bf16_band_by_band(tmp_path, small_bands, monkeypatch):
    folder = build_tiny_llama(tmp_path / "llama", hidden=64)  # fp32 shards, as a converted GGUF's
    reads: list[str] = []
    read_as = shard_reader.read_as

    def counted(path, name, dtype):
        out = read_as(path, name, dtype)
        if out is not None:
            reads.append(name)
        return out

    monkeypatch.setattr(shard_reader, "read_as", counted)
    full = pretrained.load(ModelConfig(str(folder)), 16)
    lean = pretrained.load(ModelConfig(str(folder)), 16, recipe=Recipe("bf16-pure"))
    assert "model.embed_tokens.weight" in reads  # the tied 64-wide embedding: more than two bands
    assert {p.dtype for p in lean.model.parameters()} == {torch.bfloat16}
    for (name, a), (_, b) in zip(full.model.named_parameters(), lean.model.named_parameters(), strict=True):
        assert torch.equal(a.to(torch.bfloat16), b), name


def test_a_shard_saved_again_at_the_same_path_is_read_from_its_new_header(tmp_path, small_bands):
    path = tmp_path / "model.safetensors"
    first, second = torch.randn(1000, 64), torch.randn(1000, 64)
    save_file({"embed": first}, str(path))
    assert torch.equal(shard_reader.read_as(path, "embed", torch.bfloat16), first.to(torch.bfloat16))
    save_file({"a_first": torch.randn(300, 64), "embed": second}, str(path))  # embed's bytes have moved
    assert torch.equal(shard_reader.read_as(path, "embed", torch.bfloat16), second.to(torch.bfloat16))
