"""Classification metrics: accuracy, macro-F1 and micro-F1 (single-label)."""

from __future__ import annotations

import torch


def classification(preds: torch.Tensor, labels: torch.Tensor, n_classes: int) -> dict[str, float]:
    """Accuracy, macro-F1 (mean of per-class F1, classes present in preds or labels) and
    micro-F1 (equal to accuracy for single-label classification).

    Args:
        preds: (n,) predicted class indices.
        labels: (n,) true class indices.
        n_classes: number of classes.
    """
    tp = torch.zeros(n_classes)
    fp = torch.zeros(n_classes)
    fn = torch.zeros(n_classes)
    for p, t in zip(preds.tolist(), labels.tolist(), strict=True):
        if p == t:
            tp[t] += 1
        else:
            fp[p] += 1
            fn[t] += 1
    present = (tp + fp + fn) > 0
    f1 = torch.where(present, 2 * tp / (2 * tp + fp + fn).clamp(min=1), torch.zeros(n_classes))
    micro = 2 * tp.sum() / (2 * tp.sum() + fp.sum() + fn.sum()).clamp(min=1)
    return {
        "accuracy": float((preds == labels).float().mean()) if len(labels) else 0.0,
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "micro_f1": float(micro),
    }
