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
    python bench/random_llama.py OUT --shape tinyllama --dtype bf16 --shard-size 600MB   # as hubs ship it
    python bench/random_llama.py OUT --shape llama3.2-3b --dtype bf16                   # Llama 3.2 3B's shape

An existing folder (its config.json) is kept as it is.
"""

from __future__ import annotations

import argparse
from pathlib import Path

SMOLLM2 = {"hidden": 576, "intermediate": 1536, "layers": 30, "heads": 9, "kv_heads": 3, "vocab": 49_152}
# Shapes of public models (their config.json), for memory and speed only.
SHAPES = {
    "smollm2-135m": {**SMOLLM2, "tied": True},
    "tinyllama": {"hidden": 2048, "intermediate": 5632, "layers": 22, "heads": 32, "kv_heads": 4, "vocab": 32_000,
                  "tied": False},
    "llama3.2-3b": {"hidden": 3072, "intermediate": 8192, "layers": 28, "heads": 24, "kv_heads": 8, "vocab": 128_256,
                    "tied": True},
    "llama3.1-8b": {"hidden": 4096, "intermediate": 14336, "layers": 32, "heads": 32, "kv_heads": 8, "vocab": 128_256,
                    "tied": False},
}  # fmt: skip


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
    tied: bool = True,
    dtype: str = "fp32",
    shard_size: str = "5GB",
    config_only: bool = False,
) -> Path:
    """Write the model and its tokenizer to ``out`` (kept when already there). ``vocab`` is the
    embedding's size (SmolLM2's 49,152 by default, whatever the tokenizer's); ``dtype``: fp32 or
    bf16, the dtype the safetensors shards store (bf16 is built in bf16: it never holds fp32);
    ``shard_size``: the largest shard; ``config_only``: the config.json and tokenizer alone (a
    model to plan, not to load)."""
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
        max_position_embeddings=max_positions, tie_word_embeddings=tied, eos_token_id=1, bos_token_id=None,
        rope_theta=100000.0,
    )  # fmt: skip
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    if config_only:
        cfg.dtype = torch_dtype
        out.mkdir(parents=True, exist_ok=True)
        cfg.save_pretrained(out)
    else:
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch_dtype)  # initialised in the stored dtype: no fp32 copy
        try:
            model = LlamaForCausalLM(cfg)
        finally:
            torch.set_default_dtype(default)
        model.config.dtype = torch_dtype
        model.save_pretrained(out, max_shard_size=shard_size)
        del model
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
    parser.add_argument("--shape", choices=list(SHAPES), help="a public model's shape (overrides the sizes above)")
    parser.add_argument("--untied", action="store_true", help="an LM head of its own (the shapes set this)")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="what the shards store")
    parser.add_argument("--shard-size", default="5GB", help="the largest safetensors shard (e.g. 600MB)")
    parser.add_argument("--config-only", action="store_true", help="config.json and tokenizer only (for plan)")
    args = parser.parse_args()
    sizes = dict(
        layers=args.layers, hidden=args.hidden, intermediate=args.intermediate, vocab=args.vocab,
        heads=args.heads, kv_heads=args.kv_heads, tied=not args.untied,
    )  # fmt: skip
    if args.shape:
        sizes.update(SHAPES[args.shape])
    build(args.out, **sizes, dtype=args.dtype, shard_size=args.shard_size, config_only=args.config_only)
    shape = f"{sizes['layers']} Llama blocks of {sizes['hidden']}"
    print(f"model: {args.out} ({shape}, random weights: losses mean nothing)")


if __name__ == "__main__":
    main()
