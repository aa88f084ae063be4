"""``task.mode: probe``: a linear classifier on a frozen model's features.

Features are the mean of the last hidden state over each example's real tokens, computed once
per model (one forward pass over the task's examples, no backward). Each seed fits a
multinomial logistic regression (L2-regularised, full-batch L-BFGS: convex, so the fit itself
has no seed noise) to a bootstrap resample of the training examples drawn with that seed; the
same resample for the base and the adapted model, so the per-seed difference is paired. The
spread over seeds is then the training data's, which is what a verdict must be robust to.
"""

from __future__ import annotations

from typing import Any

import torch

from ecoadapt.data import labelled
from ecoadapt.model.precision import Policy
from ecoadapt.task.metrics import classification

L2 = 1e-3  # weight decay of the probe: features are standardised, so one value suits every model
MAX_ITER = 200  # L-BFGS iterations: the probe converges well before this on standardised features
BATCH = 64  # examples per forward pass when computing features


@torch.no_grad()
def features(model: Any, data: labelled.Encoded, pad_id: int, policy: Policy, device: Any) -> torch.Tensor:
    """Mean-pooled last hidden states of ``model`` (a transformers base model), (n, hidden), fp32,
    in the examples' order.

    The examples go through in batches of similar length (sorted by it): a batch is padded to its
    longest example, and in file order most of a batch of short texts is padding.
    """
    model.eval()
    order = sorted(range(len(data.ids)), key=lambda i: len(data.ids[i]))
    out: torch.Tensor | None = None
    for start in range(0, len(order), BATCH):
        rows = order[start : start + BATCH]
        input_ids, mask = labelled.pad_batch([data.ids[i] for i in rows], pad_id)
        input_ids, mask = input_ids.to(device), mask.to(device)
        with policy.autocast():
            hidden = model(input_ids=input_ids, attention_mask=mask).last_hidden_state
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = ((hidden * weights).sum(1) / weights.sum(1).clamp(min=1)).float().cpu()
        if out is None:
            out = torch.empty(len(order), pooled.shape[1])
        out[rows] = pooled
    return out if out is not None else torch.empty(0, 0)


def bootstrap(n: int, seed: int) -> torch.Tensor:
    """Indices of a resample with replacement of ``n`` examples, drawn with ``seed``."""
    return torch.randint(0, n, (n,), generator=torch.Generator().manual_seed(seed))


def fit(x: torch.Tensor, y: torch.Tensor, n_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression on standardised ``x``: (weight (classes, dim), bias)."""
    w = torch.zeros(n_classes, x.shape[1], requires_grad=True)
    b = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=MAX_ITER, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ w.T + b, y) + L2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def score(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    n_classes: int,
    seed: int,
) -> dict[str, Any]:
    """Fit a probe to the seed's bootstrap resample of the training features; test scores."""
    rows = bootstrap(len(train_y), seed)
    x, y = train_x[rows], train_y[rows]
    mean, std = x.mean(0), x.std(0).clamp(min=1e-6)  # standardised by the resample's own statistics
    w, b = fit((x - mean) / std, y, n_classes)
    preds = (((test_x - mean) / std) @ w.T + b).argmax(-1)
    return {**classification(preds, test_y, n_classes), "train_examples": len(rows)}
