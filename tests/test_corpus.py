"""Splitting, packing, caching and masking."""

import collections
import json

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from ecoadapt.config import DataConfig
from ecoadapt.core.errors import UserError
from ecoadapt.data import corpus
from ecoadapt.data.batches import IGNORE, BlockLoader, MaskSpec, mask_tokens, target_count
from ecoadapt.data.store import MemmapBlocks


def blocks_of(tmp_path, stream, seq_len):
    path = tmp_path / "train.bin"
    path.write_bytes(np.asarray(stream, dtype=np.uint16).tobytes())
    return MemmapBlocks(path, np.dtype(np.uint16), seq_len)


def test_blocks_are_cut_from_the_stream_with_nothing_padded(tmp_path):
    # stream: 1 2 3 0 4 5 0 6 7 8 9 0 (documents with their separators) -> 3 full blocks of 4
    blocks = blocks_of(tmp_path, [1, 2, 3, 0, 4, 5, 0, 6, 7, 8, 9, 0], 4)
    assert blocks[:].tolist() == [[1, 2, 3, 0], [4, 5, 0, 6], [7, 8, 9, 0]]
    assert blocks.dropped_tokens == 0 and blocks.shape == (3, 4)
    assert blocks[torch.tensor([2, 0])].tolist() == [[7, 8, 9, 0], [1, 2, 3, 0]]
    assert blocks[1].dtype == torch.int64 and blocks[1].tolist() == [4, 5, 0, 6]
    tail = blocks_of(tmp_path, [1, 2, 3, 4, 5], 4)
    assert tail[:].tolist() == [[1, 2, 3, 4]] and tail.dropped_tokens == 1
    short = blocks_of(tmp_path, [1, 2, 3], 8)  # shorter than one block: one short block
    assert short[:].tolist() == [[1, 2, 3]] and len(short) == 1


def test_blocks_can_each_start_with_the_token_the_model_expects_first(tmp_path):
    path = tmp_path / "train.bin"
    path.write_bytes(np.asarray([1, 2, 3, 0, 4, 5, 0, 6, 7, 8], dtype=np.uint16).tobytes())
    blocks = MemmapBlocks(path, np.dtype(np.uint16), 4, first=99)  # 3 stream tokens after the BOS each
    assert blocks.shape == (3, 4) and blocks.dropped_tokens == 1
    assert blocks[:].tolist() == [[99, 1, 2, 3], [99, 0, 4, 5], [99, 0, 6, 7]]
    assert blocks[1].tolist() == [99, 0, 4, 5] and blocks[torch.tensor([2])].tolist() == [[99, 0, 6, 7]]


def test_a_causal_lm_whose_tokenizer_begins_texts_with_bos_gets_it_at_every_blocks_start(tmp_path):
    """Gemma and Llama read a window without their BOS badly (Gemma 3 270M: 5.28 nats on general
    English against 3.32 with it); models whose tokenizer adds none (GPT-2's way) keep plain cuts."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from ecoadapt.data.store import block_start

    vocab = {w: i for i, w in enumerate(["<unk>", "<bos>", "<eos>", "the", "a", "photo"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    plain = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>")
    assert block_start(plain, "clm") is None  # has a BOS token, never puts it first
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    leading = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>")
    assert block_start(leading, "clm") == 1 and block_start(leading, "mlm") is None
    corpus_file = tmp_path / "c.txt"
    corpus_file.write_text("".join(f"the photo {'a ' * (i % 5)}\n" for i in range(300)))
    cfg = DataConfig(train=[str(corpus_file)], max_seq_len=8, eval_fraction=0.2, cache_dir=str(tmp_path / "cache"))
    built = corpus.build(cfg, leading, "clm")
    assert built.stats["block_start"] == 1 and built.train.shape[1] == 8
    assert (built.train[:][:, 0] == 1).all() and (built.eval[:][:, 0] == 1).all()
    assert built.train[:][:, 1:].ne(1).all()  # the stream itself holds no BOS: EOS separates documents


def test_split_is_deterministic_and_keeps_duplicates_together():
    texts = [f"document number {i}" for i in range(2000)]
    held = [t for t in texts if corpus.is_held_out(t, 0.1)]
    assert 140 < len(held) < 260  # ~10%
    assert held == [t for t in texts if corpus.is_held_out(t, 0.1)]
    assert all(corpus.is_held_out(t, 0.1) for t in held)  # a duplicate of a held-out doc is held out


def test_build_clm_stores_once_and_separates_with_eos(tiny_llama, corpus_jsonl):
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    cfg = DataConfig(train=[str(corpus_jsonl)], text_field="caption", max_seq_len=16, eval_fraction=0.1)
    first = corpus.build(cfg, tok, "clm")
    assert first.stats["cache"] == "miss" and first.stats["token_dtype"] == "<u2"  # a small vocabulary: uint16
    assert first.train.shape[1] == 16 and first.eval.shape[1] == 16
    assert (first.train[:] == tok.eos_token_id).sum() > 0
    second = corpus.build(cfg, tok, "clm")
    assert second.stats["cache"] == "hit"
    assert torch.equal(first.train[:], second.train[:])
    # Another sequence length reuses the same store: blocks are cut when read.
    other = corpus.build(
        DataConfig(train=[str(corpus_jsonl)], text_field="caption", max_seq_len=8, eval_fraction=0.1), tok, "clm"
    )
    assert other.stats["cache"] == "hit" and other.train.shape[1] == 8
    assert torch.equal(other.train[:].reshape(-1)[: first.train[:].numel()], first.train[:].reshape(-1))
    # The documents and their order are those of a plain in-memory tokenization.
    docs = [json.loads(line)["caption"] for line in corpus_jsonl.read_text().splitlines()]
    train_docs = [d for d in docs if not corpus.is_held_out(d.strip(), 0.1)]
    stream = [t for d in train_docs for t in [*tok(d.strip(), add_special_tokens=False)["input_ids"], tok.eos_token_id]]
    assert first.train[:].reshape(-1).tolist() == stream[: first.stats["train_tokens"]]


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
    with pytest.raises(UserError, match=r"the corpus is one document \(1\).*split it into documents"):
        corpus.build(DataConfig(train=[str(p)], eval_fraction=0.5), tok, "clm")  # no fraction can help
    p.write_text("the photo\nthe cat\nthe dog\n")
    with pytest.raises(UserError, match="no document of 3 was held out"):
        corpus.build(DataConfig(train=[str(p)], eval_fraction=0.001), tok, "clm")


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


def test_epoch_order_of_one_window_is_the_plain_permutation():
    from ecoadapt.data.batches import EpochOrder, epoch_order

    order = EpochOrder(1000, seed=3, epoch=2)
    assert torch.equal(order[0:1000], epoch_order(1000, 3, 2))


def test_epoch_order_in_windows_is_a_permutation_read_in_any_slices(monkeypatch):
    from ecoadapt.data import batches

    monkeypatch.setattr(batches, "ORDER_WINDOW", 7)
    order = batches.EpochOrder(30, seed=1, epoch=0)  # windows of 7, 7, 7, 7 and 2 blocks
    whole = order[0:30]
    assert sorted(whole.tolist()) == list(range(30))
    pieces = torch.cat([order[a : a + 4] for a in range(0, 30, 4)])  # slices across window edges
    assert torch.equal(pieces, whole)
    assert torch.equal(batches.EpochOrder(30, seed=1, epoch=0)[0:30], whole)  # deterministic
    assert not torch.equal(batches.EpochOrder(30, seed=1, epoch=1)[0:30], whole)  # reshuffled each epoch
    # Each stretch of 7 positions that starts a window holds one window's blocks: bounded memory.
    assert order._cached is not None and len(order._cached[1]) <= 7
    loader = BlockLoader(torch.arange(30).view(30, 1), micro_batch_size=4, objective="clm", mask=None, seed=1)
    seen = torch.cat([next(loader)["input_ids"][:, 0] for _ in range(8)])[:30]
    assert sorted(seen.tolist()) == list(range(30))  # the loader covers every block once an epoch


def test_bad_corpus_records_stop_with_their_line_or_are_skipped_and_counted(tiny_llama, corpus_jsonl):
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    lines = corpus_jsonl.read_text().splitlines()
    lines[9] = '{"caption": "a torn line'  # not JSON
    lines[19] = '{"title": "no caption here"}'
    corpus_jsonl.write_text("\n".join(lines) + "\n")
    cfg = DataConfig(train=[str(corpus_jsonl)], text_field="caption", max_seq_len=16, eval_fraction=0.1)
    with pytest.raises(UserError, match=r"corpus\.jsonl:10: not valid JSON .*data\.bad_records: skip"):
        corpus.build(cfg, tok, "clm")
    cfg.bad_records = "skip"
    built = corpus.build(cfg, tok, "clm")
    assert built.stats["bad_records"]["skipped"] == 2 and built.stats["documents"] == 398
    assert "corpus.jsonl:20: no field 'caption'" in built.stats["bad_records"]["examples"][1]
    assert corpus.build(cfg, tok, "clm").stats["bad_records"]["skipped"] == 2  # kept with the store
