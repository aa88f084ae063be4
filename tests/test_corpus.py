"""Splitting, packing, caching and masking."""

import collections

import pytest
import torch
from transformers import AutoTokenizer

from ecoadapt.config import DataConfig
from ecoadapt.data import corpus
from ecoadapt.data.batches import IGNORE, BlockLoader, MaskSpec, mask_tokens, target_count
from ecoadapt.errors import UserError


def test_pack_puts_separator_between_documents_and_never_pads():
    blocks, dropped = corpus.pack([[1, 2, 3], [4, 5], [6, 7, 8, 9]], block_len=4, separator=0)
    # stream: 1 2 3 0 4 5 0 6 7 8 9 0  -> 3 full blocks, nothing left over
    assert blocks.tolist() == [[1, 2, 3, 0], [4, 5, 0, 6], [7, 8, 9, 0]]
    assert dropped == 0
    blocks, dropped = corpus.pack([[1, 2, 3], [4, 5]], block_len=4, separator=None)
    assert blocks.tolist() == [[1, 2, 3, 4]] and dropped == 1


def test_split_is_deterministic_and_keeps_duplicates_together():
    texts = [f"document number {i}" for i in range(2000)]
    held = [t for t in texts if corpus.is_held_out(t, 0.1)]
    assert 140 < len(held) < 260  # ~10%
    assert held == [t for t in texts if corpus.is_held_out(t, 0.1)]
    assert all(corpus.is_held_out(t, 0.1) for t in held)  # a duplicate of a held-out doc is held out


def test_build_clm_caches_and_separates_with_eos(tiny_llama, corpus_jsonl):
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    cfg = DataConfig(train=[str(corpus_jsonl)], text_field="caption", max_seq_len=16, eval_fraction=0.1)
    first = corpus.build(cfg, tok, "clm")
    assert first.stats["cache"] == "miss"
    assert first.train.shape[1] == 16 and first.eval.shape[1] == 16
    assert (first.train == tok.eos_token_id).sum() > 0
    second = corpus.build(cfg, tok, "clm")
    assert second.stats["cache"] == "hit"
    assert torch.equal(first.train, second.train)
    # Another sequence length is another cache entry.
    other = corpus.build(DataConfig(train=[str(corpus_jsonl)], text_field="caption", max_seq_len=8), tok, "clm")
    assert other.stats["cache"] == "miss" and other.train.shape[1] == 8


def test_cache_key_follows_file_contents(tiny_llama, corpus_jsonl):
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    cfg = DataConfig(train=[str(corpus_jsonl)], text_field="caption", max_seq_len=16)
    corpus.build(cfg, tok, "clm")
    corpus_jsonl.write_text(corpus_jsonl.read_text() + '{"caption": "a new red lamp"}\n')
    assert corpus.build(cfg, tok, "clm").stats["cache"] == "miss"


def test_empty_split_is_an_error(tiny_llama, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    p = tmp_path / "one.txt"
    p.write_text("the photo\n")
    with pytest.raises(UserError, match="no document of 1 was held out"):
        corpus.build(DataConfig(train=[str(p)], eval_fraction=0.01), tok, "clm")


def test_mlm_masking_rates_and_specials():
    gen = torch.Generator().manual_seed(0)
    spec = MaskSpec(mask_id=3, vocab_size=100, special_ids=[0, 1, 2, 3], probability=0.15)
    ids = torch.randint(4, 100, (64, 128), generator=gen)
    ids[:, 0], ids[:, -1] = 1, 2  # [CLS] ... [SEP]
    inputs, labels = mask_tokens(ids, spec, gen)
    chosen = labels != IGNORE
    assert not chosen[:, 0].any() and not chosen[:, -1].any()  # special tokens never masked
    rate = chosen.float().mean().item()
    assert 0.13 < rate < 0.17
    assert torch.equal(labels[chosen], ids[chosen])
    kinds = collections.Counter(
        "mask" if i == 3 else ("same" if i == o else "random")
        for i, o in zip(inputs[chosen].tolist(), ids[chosen].tolist(), strict=True)
    )
    n = chosen.sum().item()
    assert abs(kinds["mask"] / n - 0.8) < 0.03
    assert abs(kinds["random"] / n - 0.1) < 0.03  # (a random draw can equal the original: ~1%)
    assert torch.equal(inputs[~chosen], ids[~chosen])


def test_target_count():
    labels = torch.tensor([[5, IGNORE, 7], [IGNORE, IGNORE, 9]])
    assert target_count(labels, "mlm") == 3
    assert target_count(labels, "clm") == 2  # position 0 is never a causal-LM target


def test_loader_reshuffles_each_epoch_and_covers_every_block():
    blocks = torch.arange(10).view(10, 1).repeat(1, 4)
    loader = BlockLoader(blocks, micro_batch_size=5, objective="clm", mask=None, seed=3)
    epoch1 = torch.cat([next(loader)["input_ids"][:, 0] for _ in range(2)])
    epoch2 = torch.cat([next(loader)["input_ids"][:, 0] for _ in range(2)])
    assert sorted(epoch1.tolist()) == list(range(10)) == sorted(epoch2.tolist())
    assert epoch1.tolist() != epoch2.tolist()
    assert loader.epochs_done == 2.0
