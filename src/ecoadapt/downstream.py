"""The downstream task: fine-tune a classifier on the base and on the adapted model, same seeds.

Both start from the same classification model built from the base checkpoint (the head is
newly initialised with the seed); for the adapted model its backbone weights are replaced by
the adapted ones (a LoRA adapter is merged first). Both then get the same fine-tune budget,
seeds, precision and data order, so the difference is the adaptation's alone. Encoders
classify from their pooled [CLS] state, decoders from the last real token (transformers'
``*ForSequenceClassification``).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch

from ecoadapt import models
from ecoadapt import train as train_loop
from ecoadapt.config import LoraConfig, RunConfig, TaskConfig, TrainConfig
from ecoadapt.data import labelled
from ecoadapt.errors import UserError
from ecoadapt.metrics import classification
from ecoadapt.precision import Policy
from ecoadapt.progress import say


@dataclass
class TaskData:
    """The task's examples, split, encoded and described."""

    labels: list[str]
    train: labelled.Encoded
    test: labelled.Encoded
    classes: dict[str, Any]
    pad_id: int


def prepare(cfg: TaskConfig, tokenizer: Any) -> TaskData:
    """Read, split (when no test files), check and tokenize the task's examples."""
    train = labelled.read(cfg.train, cfg)
    if cfg.test:
        test = labelled.read(cfg.test, cfg)
    else:
        train, test = labelled.stratified_split(train, cfg.test_fraction)
    if cfg.max_train_examples is not None:
        train = labelled.subsample(train, cfg.max_train_examples)
    labels = labelled.check_labels(train, test)
    if len(labels) < 2:
        raise UserError(f"task: only one label ('{labels[0]}') in the training examples; a classifier needs two")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise UserError("task: the tokenizer has neither a pad nor an EOS token to pad batches with")
    return TaskData(
        labels,
        labelled.encode(train, tokenizer, labels, cfg.max_seq_len),
        labelled.encode(test, tokenizer, labels, cfg.max_seq_len),
        labelled.class_report(train, test),
        int(pad_id),
    )


def backbone_state(model: Any) -> dict[str, torch.Tensor]:
    """The adapted transformer's weights (LoRA merged), without any LM head."""
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    return {k: v.detach().float().cpu() for k, v in model.base_model.state_dict().items()}


def build_classifier(run: RunConfig, n_labels: int, pad_id: int, seed: int, backbone: dict[str, Any] | None) -> Any:
    """A sequence classifier from the base checkpoint, its backbone optionally replaced."""
    from transformers import AutoModelForSequenceClassification

    where, gguf_file, _ = models.resolve(run.model.name_or_path)
    kwargs: dict[str, Any] = {"local_files_only": True, "num_labels": n_labels, "dtype": torch.float32}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    torch.manual_seed(seed)  # the new head starts the same for base and adapted
    with models.offline():
        try:
            clf = AutoModelForSequenceClassification.from_pretrained(where, **kwargs)
        except ValueError as e:
            raise UserError(f"task: {run.model.name_or_path} has no sequence-classification form ({e})") from None
    clf.config.pad_token_id = pad_id  # decoders find the last real token by it
    if backbone is not None:
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
    run: RunConfig, data: TaskData, seed: int, backbone: dict[str, Any] | None, device: Any
) -> dict[str, Any]:
    """Fine-tune one classifier with ``seed`` and score it on the test examples."""
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
    policy = Policy(run.precision.mode, device.type)
    policy.apply(model)
    steps = train_loop.total_steps(
        TrainConfig(max_steps=None, epochs=task.epochs, micro_batch_size=task.micro_batch_size), len(data.train.ids)
    )
    cfg = TrainConfig(
        micro_batch_size=task.micro_batch_size,
        max_steps=steps,
        lr=task.lr,
        warmup_ratio=0.1,
        seed=seed,
        log_every=steps,
    )
    torch.manual_seed(seed)
    batches = labelled.batches(data.train, task.micro_batch_size, data.pad_id, seed)
    try:
        result = train_loop.run(model, batches, steps, cfg, "cls", policy, device)
        preds = predict(model, data.test, data.pad_id, task.micro_batch_size * 2, policy, device)
    finally:
        policy.restore()
    scores = classification(preds, data.test.labels, len(data.labels))
    return {**scores, "steps": steps, "train_time_s": result.time_s, "train_loss": result.train_loss}


def _stats(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def compare(run: RunConfig, tokenizer: Any, adapted: dict[str, Any] | None, device: Any) -> dict[str, Any]:
    """Fine-tune base and adapted classifiers for every seed; the summary's ``task`` part.

    Args:
        run: the run's config (task section, model, precision, lora).
        tokenizer: the model's tokenizer.
        adapted: the adapted backbone's weights (None: base only).
        device: where to train.
    """
    start = time.perf_counter()
    data = prepare(run.task, tokenizer)
    say(
        f"task: {len(data.train.ids)} train / {len(data.test.ids)} test examples, {len(data.labels)} labels "
        f"(majority class {data.classes['majority_class_accuracy']:.1%} of test, "
        f"imbalance {data.classes['imbalance_ratio']:.1f}:1)"
    )
    per_seed: list[dict[str, Any]] = []
    for seed in run.task.seeds:
        row: dict[str, Any] = {"seed": seed}
        for name, weights in (("base", None), ("adapted", adapted)):
            if name == "adapted" and adapted is None:
                continue
            scores = fine_tune(run, data, seed, weights, device)
            row[name] = scores
            say(f"task seed {seed} {name}: {run.task.metric} {scores[run.task.metric]:.4f}")
        per_seed.append(row)
    metric = run.task.metric
    out: dict[str, Any] = {"metric": metric, "labels": data.labels, "classes": data.classes, "per_seed": per_seed}
    base_mean, base_std = _stats([r["base"][metric] for r in per_seed])
    out.update({"base": base_mean, "base_std": base_std})
    if adapted is not None:
        adapted_mean, adapted_std = _stats([r["adapted"][metric] for r in per_seed])
        out.update({"adapted": adapted_mean, "adapted_std": adapted_std, "delta": adapted_mean - base_mean})
    else:
        out.update({"adapted": None, "adapted_std": None, "delta": None})
    out["time_s"] = time.perf_counter() - start
    return out


def adapted_backbone(run: RunConfig) -> dict[str, torch.Tensor]:
    """The adapted backbone saved in the run directory (adapter merged into the base, or model).

    Raises:
        UserError: the run directory holds neither (run ``ecoadapt adapt`` first).
    """
    from pathlib import Path

    from transformers import AutoModel

    folder = Path(run.output.dir)
    if (folder / "adapter").is_dir():
        from peft import PeftModel

        loaded = models.load(run.model, 8, run.train.seed)
        with models.offline():
            merged = PeftModel.from_pretrained(loaded.model, folder / "adapter")
        return backbone_state(merged)
    if (folder / "model").is_dir():
        with models.offline():
            model = AutoModel.from_pretrained(folder / "model", local_files_only=True, dtype=torch.float32)
        return {k: v.detach().float() for k, v in model.state_dict().items()}
    raise UserError(
        f"output.dir: {folder} holds no adapted model or adapter; run `ecoadapt adapt` with this config first"
    )
