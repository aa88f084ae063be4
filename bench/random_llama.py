"""A randomly initialised Llama of SmolLM2-135M's shape, saved like a hub model, for machines
without the pretrained model (the GPU machine) and for measurements that need only its shape.

Throughput, memory, energy and op counts are the architecture's; losses mean nothing (a
NOTE.txt in the folder says so). The tokenizer is a byte-level BPE trained on the built-in
Python docstrings.

    python bench/random_llama.py OUT                      # SmolLM2-135M's shape (30 blocks)
    python bench/random_llama.py OUT --layers 6           # shallower
    python bench/random_llama.py OUT --hidden 72 --intermediate 192 --vocab 512   # deep and thin
    python bench/random_llama.py OUT --layers 22 --hidden 2048 --intermediate 5632 --heads 32 \
        --kv-heads 4 --vocab 32000                        # TinyLlama-1.1B's shape (bench/gpu-qlora.sh)

An existing folder (its config.json) is kept as it is.
"""

from __future__ import annotations

import argparse
from pathlib import Path

SMOLLM2 = {"hidden": 576, "intermediate": 1536, "layers": 30, "heads": 9, "kv_heads": 3, "vocab": 49_152}


def build(
    out: Path,
    layers: int = SMOLLM2["layers"],
    hidden: int = SMOLLM2["hidden"],
    intermediate: int = SMOLLM2["intermediate"],
    vocab: int = SMOLLM2["vocab"],
    tokenizer_vocab: int = 8192,
    max_positions: int = 2048,
    heads: int = SMOLLM2["heads"],
    kv_heads: int = SMOLLM2["kv_heads"],
) -> Path:
    """Write the model and its tokenizer to ``out`` (kept when already there). ``vocab`` is the
    embedding's size (SmolLM2's 49,152 by default, whatever the tokenizer's)."""
    if (out / "config.json").exists():
        return out
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from ecoadapt.data import builtin

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    texts = list(builtin.documents("builtin:python-docstrings"))[:4000]
    special = ["<unk>", "<|endoftext|>"]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=min(tokenizer_vocab, vocab), special_tokens=special))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|endoftext|>")
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=max(vocab, len(fast)), hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions, tie_word_embeddings=True, eos_token_id=1, bos_token_id=None,
        rope_theta=100000.0,
    )  # fmt: skip
    LlamaForCausalLM(cfg).save_pretrained(out)
    fast.save_pretrained(out)
    (out / "NOTE.txt").write_text("Randomly initialised: speed, memory and energy only; losses mean nothing.\n")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--layers", type=int, default=SMOLLM2["layers"])
    parser.add_argument("--hidden", type=int, default=SMOLLM2["hidden"])
    parser.add_argument("--intermediate", type=int, default=SMOLLM2["intermediate"])
    parser.add_argument("--vocab", type=int, default=SMOLLM2["vocab"])
    parser.add_argument("--heads", type=int, default=SMOLLM2["heads"])
    parser.add_argument("--kv-heads", type=int, default=SMOLLM2["kv_heads"])
    args = parser.parse_args()
    build(args.out, args.layers, args.hidden, args.intermediate, args.vocab, heads=args.heads, kv_heads=args.kv_heads)
    print(f"model: {args.out} ({args.layers} Llama blocks of {args.hidden}, random weights: losses are not meaningful)")


if __name__ == "__main__":
    main()
