"""One task fine-tune: a sequence classifier built from the base checkpoint (its backbone
optionally replaced by the adapted one), trained with one seed, scored on the test examples.

Encoders classify from their pooled [CLS] state, decoders from the last real token
(transformers' ``*ForSequenceClassification``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ecoadapt.config import LoraConfig, RunConfig, TrainConfig
from ecoadapt.core.errors import UserError
from ecoadapt.core.progress import Progress
from ecoadapt.data import labelled
from ecoadapt.model import pretrained
from ecoadapt.model.precision import Policy
from ecoadapt.task.metrics import classification
from ecoadapt.train.loop import Hooks, Loop, fit, total_steps

WARMUP_RATIO = 0.1  # of the fine-tune's steps: the usual recipe for classification fine-tunes
LOGS_PER_EPOCH = 2  # progress lines per pass over the task's training examples


@dataclass
class TaskData:
    """The task's examples, split, encoded and described."""

    labels: list[str]
    train: labelled.Encoded
    test: labelled.Encoded
    classes: dict[str, Any]
    pad_id: int
    bad_records: dict[str, Any]


def build_classifier(run: RunConfig, n_labels: int, pad_id: int, seed: int, backbone: dict[str, Any] | None) -> Any:
    """A sequence classifier from the base checkpoint, its backbone optionally replaced."""
    from transformers import AutoModelForSequenceClassification

    where, gguf_file, _ = pretrained.resolve_model(run.model)
    kwargs: dict[str, Any] = {"local_files_only": True, "num_labels": n_labels, "dtype": torch.float32}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    torch.manual_seed(seed)  # the new head starts the same for base and adapted
    with pretrained.offline():
        try:
            clf = AutoModelForSequenceClassification.from_pretrained(where, **kwargs)
        except ValueError as e:
            raise UserError(f"task: {run.model.name_or_path} has no sequence-classification form ({e})") from None
    clf.config.pad_token_id = pad_id  # decoders find the last real token by it
    if backbone is not None:
        prefix = f"{clf.base_model_prefix}."
        if any(k.startswith(prefix) for k in backbone):  # a whole LM's weights: its body is the backbone
            backbone = {k[len(prefix) :]: v for k, v in backbone.items() if k.startswith(prefix)}
        result = clf.base_model.load_state_dict(backbone, strict=False)
        stray = [k for k in result.missing_keys if not k.startswith("pooler.")]
        if stray:
            raise UserError(f"task: the adapted weights do not fit the classifier (missing {', '.join(stray[:3])})")
    return clf


@torch.no_grad()
def predict(
    model: Any, data: labelled.Encoded, pad_id: int, batch_size: int, policy: Policy, device: Any
) -> torch.Tensor:
    """Predicted class indices, (n,)."""
    model.eval()
    preds = []
    for i in range(0, len(data.ids), batch_size):
        input_ids, mask = labelled.pad_batch(data.ids[i : i + batch_size], pad_id)
        with policy.autocast():
            logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits
        preds.append(logits.argmax(-1).cpu())
    return torch.cat(preds)


def fine_tune(
    run: RunConfig,
    data: TaskData,
    seed: int,
    backbone: dict[str, Any] | None,
    device: Any,
    precision: str = "fp32",
    label: str = "task",
) -> dict[str, Any]:
    """Fine-tune one classifier with ``seed`` in ``precision`` and score it on the test examples.

    Progress (``label``, step, ETA) is shown twice per epoch.
    """
    task = run.task
    model = build_classifier(run, len(data.labels), data.pad_id, seed, backbone)
    if task.lora:
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model

        lora: LoraConfig = run.lora
        model = get_peft_model(
            model, PeftLoraConfig(task_type="SEQ_CLS", r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout)
        )
    model.to(device)
    policy = Policy(precision, device.type)
    policy.apply(model)
    steps = total_steps(
        TrainConfig(max_steps=None, epochs=task.epochs, micro_batch_size=task.micro_batch_size), len(data.train.ids)
    )
    per_epoch = max(1, len(data.train.ids) // task.micro_batch_size)
    cfg = TrainConfig(
        micro_batch_size=task.micro_batch_size,
        max_steps=steps,
        lr=task.lr,
        warmup_ratio=WARMUP_RATIO,
        seed=seed,
        log_every=max(1, min(steps, per_epoch // LOGS_PER_EPOCH)),
    )
    torch.manual_seed(seed)
    batches = labelled.batches(data.train, task.micro_batch_size, data.pad_id, seed)
    progress = Progress(steps, label)
    try:
        loop = Loop.create(model, steps, cfg, policy, "cls", device)
        hooks = Hooks(on_log=lambda r: progress.update(r.step, r.loss, r.tokens_per_s))
        result = fit(loop, batches, hooks)
        preds = predict(model, data.test, data.pad_id, task.micro_batch_size * 2, policy, device)
    finally:
        progress.close()
        policy.restore()
    scores = classification(preds, data.test.labels, len(data.labels))
    return {**scores, "steps": steps, "train_time_s": result.time_s, "train_loss": result.train_loss}
