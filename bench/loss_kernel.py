"""The loss's passes over the vocabulary: eager (before and now) against the compiled kernel.

SmolLM2's head at the peer job's shape (512 rows of d 576 against a 49,152-word vocabulary, in
bf16, chunked as the training loss chunks them): the vocabulary projection and the gradient
matmul alone, then with each way of computing the loss and ``softmax - one_hot`` per chunk:

- ``eager``: logsumexp, gather, subtract and exp in place, mask multiply (the eager default);
- ``log-softmax``: log-softmax into fp32 (one ATen kernel), exp in place, ignored rows by index
  (tried as the eager default; slower here, so not kept);
- ``compiled``: :func:`ecoadapt.model.losses.softmax_cross_entropy_grad` through torch.compile (one
  generated kernel per chunk; bf16 in, bf16 gradient out).

Best of 7 alternating repeats, one process; the element-wise cost is each minus the matmuls.

    python bench/loss_kernel.py        # about a minute on 2 CPU cores (compiling included)
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ecoadapt.data.batches import IGNORE
from ecoadapt.model import losses

HERE = Path(__file__).resolve().parent
V, D, ROWS = 49_152, 576, 512


def log_softmax_variant(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    valid = labels != IGNORE
    target = labels.clamp(min=0)
    logp = torch.log_softmax(logits, dim=-1, dtype=torch.float32)
    loss = -(logp.gather(1, target[:, None]).squeeze(1) * valid).sum()
    probs = logp.exp_()
    probs[torch.arange(len(labels)), target] -= 1.0
    if (ignored := (~valid).nonzero().squeeze(1)).numel():
        probs[ignored] = 0.0
    return loss, probs.to(logits.dtype)


def run(kernel: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None, h: torch.Tensor, w: torch.Tensor,
        y: torch.Tensor) -> float:  # fmt: skip
    chunk = losses.chunk_rows(V, "cpu")
    start = time.perf_counter()
    for s in range(0, ROWS, chunk):
        logits = h[s : s + chunk] @ w.T
        g = logits if kernel is None else kernel(logits, y[s : s + chunk])[1]
        _ = g @ w
    return time.perf_counter() - start


def main() -> None:
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(V, D, generator=g) * 0.02).to(torch.bfloat16)
    h = torch.randn(ROWS, D, generator=g).to(torch.bfloat16)
    y = torch.randint(0, V, (ROWS,), generator=g)
    y[-4:] = IGNORE
    compiled = torch.compile(losses.softmax_cross_entropy_grad, dynamic=True)
    t = time.perf_counter()
    run(compiled, h, w, y)
    compile_s = time.perf_counter() - t
    ways = {"matmuls only": None, "eager": losses.softmax_grad_inplace, "log-softmax": log_softmax_variant,
            "compiled": compiled}  # fmt: skip
    best = {name: float("inf") for name in ways}
    for _ in range(7):
        for name, kernel in ways.items():
            best[name] = min(best[name], run(kernel, h, w, y))
    base = best["matmuls only"]
    lines = [
        "| per 512 rows (bf16) | ms | element-wise ms | element-wise vs eager |",
        "| --- | --- | --- | --- |",
    ]
    for name, sec in best.items():
        extra = sec - base
        ratio = "-" if name == "matmuls only" else f"{extra / (best['eager'] - base):.2f}x"
        lines.append(f"| {name} | {sec * 1e3:.1f} | {extra * 1e3:.1f} | {ratio} |")
    lines.append(f"\ncompiling the kernel took {compile_s:.1f} s (first call, cold cache)")
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "loss_kernel.json").write_text(json.dumps({"best_s": best, "compile_s": compile_s}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
