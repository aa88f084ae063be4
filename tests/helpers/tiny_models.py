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
