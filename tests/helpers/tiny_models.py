"""Tiny models and corpora that the tests build themselves: no downloads, no ../shared."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

WORDS = [
    "the",
    "a",
    "photo",
    "of",
    "can",
    "bottle",
    "label",
    "shows",
    "white",
    "black",
    "red",
    "blue",
    "table",
    "couch",
    "lamp",
    "hand",
    "holding",
    "screen",
    "computer",
    "box",
    "food",
    "package",
    "what",
    "is",
    "this",
    "color",
    "text",
    "on",
    "front",
    "back",
]


def sentences(n: int, seed: int = 0) -> list[str]:
    """``n`` short caption-like sentences from a small vocabulary (deterministic)."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) for _ in range(n)]


def _word_tokenizer(specials: dict[str, str], template: bool):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([*specials.values(), *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=specials["unk_token"]))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    if template:
        cls, sep = specials["cls_token"], specials["sep_token"]
        backend.post_processor = processors.TemplateProcessing(
            single=f"{cls} $A {sep}", special_tokens=[(cls, vocab[cls]), (sep, vocab[sep])]
        )
    return PreTrainedTokenizerFast(tokenizer_object=backend, **specials)


def build_tiny_bert(folder: Path) -> Path:
    """A 2-block BERT masked LM with a word-level tokenizer, saved like a hub model."""
    from transformers import BertConfig, BertForMaskedLM

    tok = _word_tokenizer(
        {
            "unk_token": "[UNK]",
            "pad_token": "[PAD]",
            "cls_token": "[CLS]",
            "sep_token": "[SEP]",
            "mask_token": "[MASK]",
        },
        template=True,
    )
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    BertForMaskedLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def build_tiny_llama(folder: Path, hidden: int = 32) -> Path:
    """A 2-block Llama causal LM with a word-level tokenizer, saved like a hub model (``hidden``:
    its width; 4-bit quantization needs at least 64, bitsandbytes' block of values per scale)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _word_tokenizer({"unk_token": "<unk>", "eos_token": "</s>", "pad_token": "<pad>"}, template=False)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        intermediate_size=2 * hidden, max_position_embeddings=64, eos_token_id=tok.eos_token_id, bos_token_id=None,
        pad_token_id=tok.pad_token_id, tie_word_embeddings=True,
    )  # fmt: skip
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def write_task(path, n=240, seed=0, extra=()):
    """A separable task: the label is the colour word the text ends with."""
    rng = random.Random(seed)
    lines = []
    for text in sentences(n, seed):
        label = rng.choice(["red", "blue"])
        lines.append(json.dumps({"text": f"{text} {label}", "label": label}))
    path.write_text("\n".join([*lines, *extra]) + "\n")
    return path


def _byte_symbols() -> dict[int, str]:
    """GPT-2's byte-to-symbol table (what byte-level BPE vocabularies are written in)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def build_tiny_gguf(folder: Path, seed: int = 0, tied: bool = False) -> Path:
    """A 2-block Llama as a GGUF file (fp32 tensors, a byte-level BPE tokenizer that knows
    WORDS), as llama.cpp writes them; with ``tied`` no output matrix (the head is the input
    embedding, as in Gemma); returns the file."""
    import gguf
    import numpy as np

    rng = np.random.default_rng(seed)
    tokens = ["<|endoftext|>", *_byte_symbols().values()]
    merges: list[str] = []
    for word in WORDS:
        piece = "Ġ" + word[0]
        merges.append(f"Ġ {word[0]}")
        tokens.append(piece) if piece not in tokens else None
        for ch in word[1:]:
            merges.append(f"{piece} {ch}")
            piece += ch
            tokens.append(piece) if piece not in tokens else None
    merges = list(dict.fromkeys(merges))
    vocab, dim, blocks, ff = len(tokens), 16, 2, 32
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tiny.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(64)
    w.add_embedding_length(dim)
    w.add_block_count(blocks)
    w.add_feed_forward_length(ff)
    w.add_head_count(2)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(dim // 2)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL] + [gguf.TokenType.NORMAL] * (vocab - 1))
    w.add_token_merges(merges)
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)

    def weight(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.1).astype(np.float32)

    w.add_tensor("token_embd.weight", weight(vocab, dim))
    for i in range(blocks):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(dim, np.float32))
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            w.add_tensor(f"blk.{i}.{name}.weight", weight(dim, dim))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(dim, np.float32))
        w.add_tensor(f"blk.{i}.ffn_gate.weight", weight(ff, dim))
        w.add_tensor(f"blk.{i}.ffn_up.weight", weight(ff, dim))
        w.add_tensor(f"blk.{i}.ffn_down.weight", weight(dim, ff))
    w.add_tensor("output_norm.weight", np.ones(dim, np.float32))
    if not tied:
        w.add_tensor("output.weight", weight(vocab, dim))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
