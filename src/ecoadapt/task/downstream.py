"""The downstream task: base vs adapted model, one protocol for every recipe, paired by seed.

Both models are judged the same way: the task's own precision (``task.precision``, not the
recipe's), the same seeds, data order and budget; for the adapted model the backbone weights
are replaced by the adapted ones (a LoRA adapter is merged first). ``task.mode`` is a full
fine-tune per seed (:mod:`ecoadapt.task.finetune`) or a linear probe on frozen features
(:mod:`ecoadapt.task.linear_probe`). The base model's results are cached (:mod:`ecoadapt.task.base_cache`), so
a sweep evaluates the base once. The summary gives the per-seed gain (adapted minus base), its
confidence interval and a verdict in words (:mod:`ecoadapt.task.stats`).
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ecoadapt.config import RunConfig, TaskConfig
from ecoadapt.core import storage
from ecoadapt.core.errors import UserError
from ecoadapt.core.progress import fmt_duration, say
from ecoadapt.data import labelled, readers
from ecoadapt.measure.energy import EnergyTracker
from ecoadapt.model.precision import Policy
from ecoadapt.results.judged import PairedGain, SeedScores, TaskResult
from ecoadapt.task import base_cache, finetune, linear_probe, stats
from ecoadapt.task.finetune import TaskData


def task_precision(setting: str, device: torch.device) -> str:
    """The precision mode ``task.precision`` means on ``device`` (auto: bf16 autocast on a GPU
    that runs bf16 natively, fp16 on older GPUs, fp32 on a CPU)."""
    if setting != "auto":
        return setting
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    return "fp32"


def read_examples(cfg: TaskConfig) -> tuple[list[labelled.Example], list[labelled.Example], list[str], dict[str, Any]]:
    """Read, split (when no test files) and check the task's examples.

    Returns:
        (train, test, sorted labels, the bad-records summary).

    Raises:
        UserError: a missing file or field, an empty text (unless task.bad_records: skip), a
            test label training never saw, fewer than two labels, or no test example.
    """
    bad = readers.BadRecords(cfg.bad_records, "task.bad_records")
    train = labelled.read(cfg.train, cfg, bad)
    if cfg.test:
        test = labelled.read(cfg.test, cfg, bad, "task.test")
    else:
        train, test = labelled.stratified_split(train, cfg.test_fraction)
    if cfg.max_train_examples is not None:
        train = labelled.subsample(train, cfg.max_train_examples)
    if cfg.max_test_examples is not None:
        test = labelled.subsample(test, cfg.max_test_examples)
    labels = labelled.check_labels(train, test)
    if len(labels) < 2:
        raise UserError(f"task: only one label ('{labels[0]}') in the training examples; a classifier needs two")
    if not test:
        where = (
            "task.test holds no examples"
            if cfg.test
            else (
                f"holding out task.test_fraction = {cfg.test_fraction:g} of each label left no test examples "
                f"(the most examples a label has is {max(Counter(e.label for e in train).values())})"
            )
        )
        raise UserError(f"task: {where}: nothing to score; give task.test files or more examples per label")
    if bad.skipped:
        say(f"task.bad_records: skipped {bad.skipped} records ({bad.examples[0]})")
    return train, test, labels, bad.summary()


def check(cfg: TaskConfig) -> None:
    """Check the task before an adaptation starts: its files, fields, every record, two labels."""
    train, test, labels, _ = read_examples(cfg)
    say(f"task checked: {len(train)} train / {len(test)} test examples, {len(labels)} labels")


def prepare(cfg: TaskConfig, tokenizer: Any) -> TaskData:
    """Read, split, check and tokenize the task's examples."""
    train, test, labels, bad = read_examples(cfg)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise UserError("task: the tokenizer has neither a pad nor an EOS token to pad batches with")
    return TaskData(
        labels,
        labelled.encode(train, tokenizer, labels, cfg.max_seq_len),
        labelled.encode(test, tokenizer, labels, cfg.max_seq_len),
        labelled.class_report(train, test),
        int(pad_id),
        bad,
    )


def backbone_state(model: Any, whole: bool = False) -> dict[str, torch.Tensor]:
    """The adapted transformer's weights (LoRA merged), in fp32 on the CPU: without any LM head
    (what a classifier's backbone takes), or with ``whole`` the whole language model's (what
    the harness scores; a probe reads its backbone from it). A quantized base (lora.quantize)
    dequantized, as it trained, with the adapter added in full precision."""
    from ecoadapt.model import quantize

    if quantize.has_quantized(model):
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        return quantize.full_precision_state(inner if whole else inner.base_model)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    part = model if whole else model.base_model
    return {k: v.detach().float().cpu() for k, v in part.state_dict().items()}


class _Judge:
    """Scores one model on one seed under the task's protocol (fine-tune or linear probe); a probe's
    features are computed once per model."""

    def __init__(self, run: RunConfig, data: TaskData, precision: str, device: torch.device) -> None:
        self.run, self.data, self.precision, self.device = run, data, precision, device
        self._features: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def score(self, name: str, weights: dict[str, Any] | None, seed: int, label: str) -> dict[str, Any]:
        if self.run.task.mode == "finetune":
            return finetune.fine_tune(self.run, self.data, seed, weights, self.device, self.precision, label)
        if name not in self._features:
            n = len(self.data.train.ids) + len(self.data.test.ids)
            say(f"[{label}] features of the {name} model ({n} examples)")
            clf = finetune.build_classifier(self.run, len(self.data.labels), self.data.pad_id, 0, weights)
            backbone = clf.base_model.to(self.device)
            policy = Policy(self.precision, self.device.type)
            try:
                self._features[name] = tuple(  # type: ignore[assignment]
                    linear_probe.features(backbone, split, self.data.pad_id, policy, self.device)
                    for split in (self.data.train, self.data.test)
                )
            finally:
                policy.restore()
        train_x, test_x = self._features[name]
        return linear_probe.score(
            train_x, self.data.train.labels, test_x, self.data.test.labels, len(self.data.labels), seed
        )


def _window(tracker: EnergyTracker | None) -> Callable[[], tuple[float, float]]:
    """A stopwatch of joules and seconds since now: call it for (joules, seconds) so far."""
    j0, t0 = (tracker.total_joules() if tracker else 0.0), time.perf_counter()
    return lambda: ((tracker.total_joules() if tracker else 0.0) - j0, time.perf_counter() - t0)


class TaskStopped(Exception):
    """A signal asked the task to stop between two seeds; what was scored is recorded."""

    def __init__(self, signal_name: str, scored: int) -> None:
        super().__init__(f"{signal_name}: the task stopped after {scored} scored this time")
        self.signal_name, self.scored = signal_name, scored


def compare(
    run: RunConfig,
    tokenizer: Any,
    adapted: dict[str, Any] | None,
    device: Any,
    tracker: EnergyTracker | None = None,
    seeds_file: Path | None = None,
    stop: Callable[[], str | None] | None = None,
) -> TaskResult:
    """Score base and adapted model on every seed; the summary's ``task`` part.

    Args:
        run: the run's config (task section, model, lora).
        tokenizer: the model's tokenizer.
        adapted: the adapted backbone's weights (None: base only).
        device: where to train.
        tracker: the run's energy tracker, to give each fine-tune's joules (None: no energy).
        seeds_file: a JSON-lines file where each scored (seed, model) is recorded as it ends;
            those already there are not scored again (a killed task resumes from the seed it
            was on). None: nothing recorded.
        stop: asked before each (seed, model): the name of a signal that asks the task to stop
            (the scored ones are recorded; the rerun goes on from there), or None.

    Raises:
        TaskStopped: ``stop`` named a signal.
    """
    start = time.perf_counter()
    data = prepare(run.task, tokenizer)
    precision = task_precision(run.task.precision, device)
    say(
        f"task ({run.task.mode}, {precision}): {len(data.train.ids)} train / {len(data.test.ids)} test examples, "
        f"{len(data.labels)} labels (majority class {data.classes['majority_class_accuracy']:.1%} of test, "
        f"imbalance {data.classes['imbalance_ratio']:.1f}:1)"
    )
    cache_key = base_cache.key(run, precision, device.type) if run.task.cache else None
    judge = _Judge(run, data, precision, device)
    jobs = [(seed, name, w) for seed in run.task.seeds for name, w in (("base", None), ("adapted", adapted))]
    jobs = [j for j in jobs if not (j[1] == "adapted" and adapted is None)]
    results = _cached_base_results(run, cache_key) if cache_key is not None else {}
    results.update(_recorded(seeds_file))
    todo = [j for j in jobs if (j[0], j[1]) not in results]
    results.update(_score(judge, todo, run.task.metric, tracker, cache_key, seeds_file, stop))
    per_seed = [
        {"seed": s, **{n: results[(s, n)] for n in ("base", "adapted") if (s, n) in results}} for s in run.task.seeds
    ]
    out = summarize(run.task.metric, per_seed, data.classes)
    out.mode, out.precision, out.labels = run.task.mode, precision, data.labels
    out.bad_records, out.time_s = data.bad_records, time.perf_counter() - start
    return out


def _score(
    judge: _Judge,
    todo: list[tuple[int, str, Any]],
    metric: str,
    tracker: EnergyTracker | None,
    cache_key: str | None,
    seeds_file: Path | None,
    stop: Callable[[], str | None] | None = None,
) -> dict[tuple[int, str], dict[str, Any]]:
    """Score each (seed, model, weights) of ``todo``, recording each as it ends (base results in
    the cache, every result in ``seeds_file``), with its joules and seconds."""
    results: dict[tuple[int, str], dict[str, Any]] = {}
    spent = 0.0
    for done, (seed, name, weights) in enumerate(todo):
        signal_name = stop() if stop is not None else None
        if signal_name is not None:
            raise TaskStopped(signal_name, done)
        label = f"task {name} seed {seed} ({done + 1}/{len(todo)})"
        elapsed = _window(tracker)
        scores = judge.score(name, weights, seed, label)
        scores["joules"], scores["seconds"] = elapsed()
        spent += scores["seconds"]
        if name == "base" and cache_key is not None:
            base_cache.store(cache_key, seed, scores)
        results[(seed, name)] = {**scores, "cached": False}
        if seeds_file is not None:
            storage.append_jsonl(seeds_file, {"seed": seed, "name": name, "scores": scores})
        left = len(todo) - done - 1
        eta = f"; {left} left, about {fmt_duration(spent / (done + 1) * left)}" if left else ""
        say(f"task seed {seed} {name}: {metric} {scores[metric]:.4f}{eta}")
    return results


def _recorded(seeds_file: Path | None) -> dict[tuple[int, str], dict[str, Any]]:
    """The (seed, model) scores recorded by an earlier attempt of this task."""
    if seeds_file is None:
        return {}
    records = storage.read_jsonl(seeds_file)
    if records:
        say(f"task: {len(records)} seed(s) scored before this attempt: kept, not scored again")
    return {(int(r["seed"]), str(r["name"])): {**r["scores"], "cached": False, "recorded": True} for r in records}


def _cached_base_results(run: RunConfig, cache_key: str) -> dict[tuple[int, str], dict[str, Any]]:
    """The base model's scores already computed for this task protocol, by (seed, "base")."""
    results: dict[tuple[int, str], dict[str, Any]] = {}
    for seed in run.task.seeds:
        cached = base_cache.load(cache_key, seed)
        if cached is not None:
            results[(seed, "base")] = {**cached, "cached": True}
            say(
                f"task seed {seed} base: {run.task.metric} {cached[run.task.metric]:.4f} "
                f"(cached: computed once before, {cached.get('joules', 0):,.0f} J then)"
            )
    return results


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(metric: str, per_seed: list[dict[str, Any]], classes: dict[str, Any]) -> TaskResult:
    """Means, the paired gain with its interval, the verdict, and where the joules went.

    Args:
        per_seed: each seed's ``{"seed": s, "base": scores, "adapted": scores}`` (adapted may be absent).
    """
    seeds = [SeedScores(int(r["seed"]), r.get("base"), r.get("adapted")) for r in per_seed]
    base = {s.seed: s.base[metric] for s in seeds if s.base is not None}
    base_mean, base_std = _mean_std(list(base.values()))
    computed = [x for s in seeds for x in (s.base, s.adapted) if x is not None and not x.get("cached")]
    out = TaskResult(
        metric=metric,
        classes=classes,
        per_seed=seeds,
        floor=stats.trivial_score(metric, classes["test_counts"]),
        base=base_mean,
        base_std=base_std,
        evaluation_joules=sum(x.get("joules", 0.0) for x in computed),
        base_cached=sum(1 for s in seeds if s.base is not None and s.base.get("cached")),
    )
    if all(s.adapted is not None for s in seeds):
        adapted = {s.seed: s.adapted[metric] for s in seeds if s.adapted is not None}
        out.adapted, out.adapted_std = _mean_std(list(adapted.values()))
        gain, by_seed = stats.paired_gain(base, adapted)
        word = stats.verdict(gain, base_mean, out.adapted, out.floor)
        out.delta = gain.mean
        out.gain = PairedGain(gain.mean, gain.low, gain.high, gain.n, {str(k): v for k, v in by_seed.items()})
        out.verdict, out.verdict_text = word.word, word.text
    return out


def adapted_backbone(run: RunConfig, whole: bool = False) -> dict[str, torch.Tensor]:
    """The adapted backbone saved in the run directory (adapter merged into the base, or model);
    with ``whole``, the whole language model's weights (see :func:`backbone_state`).

    Raises:
        UserError: the run directory holds neither (run ``ecoadapt adapt`` first).
    """
    from pathlib import Path

    from transformers import AutoModel, AutoModelForCausalLM

    from ecoadapt.model import pretrained

    folder = Path(run.output.dir)
    if (folder / "adapter").is_dir():
        from peft import PeftModel

        from ecoadapt.model.load_spec import Recipe

        # Judge the model as it trained: a quantized base read and quantized as the run's was
        # (the same codes), then dequantized with the adapter added in fp32 (backbone_state);
        # a full-precision base in fp32, so that merging keeps the adapter's small update.
        recipe = Recipe.of(run) if run.lora.quantize else None
        loaded = pretrained.load(run.model, 8, run.train.seed, recipe)
        if run.lora.quantize and loaded.quantized is None:  # a GGUF base: quantized after loading, as in the run
            from ecoadapt.model import quantize

            _, blocks = pretrained.transformer_blocks(loaded.model)
            quantize.frozen_base(loaded.model, blocks, run.lora.quantize, torch.float32, torch.device("cpu"))
        with pretrained.offline():
            merged = PeftModel.from_pretrained(loaded.model, folder / "adapter")
        return backbone_state(merged, whole)
    if (folder / "model").is_dir():
        auto: Any = AutoModelForCausalLM if whole else AutoModel
        with pretrained.offline():
            model, info = auto.from_pretrained(
                folder / "model", local_files_only=True, dtype=torch.float32, output_loading_info=True
            )
        # Only what the checkpoint holds: AutoModel adds parts the LM never had (BERT's pooler),
        # randomly initialised, which would replace the classifier's seeded ones.
        fresh = set(info.get("missing_keys", ()))
        return {k: v.detach().float() for k, v in model.state_dict().items() if k not in fresh}
    kept = folder / ".task-backbone" / "backbone.safetensors"  # a run's task resuming, nothing saved
    if kept.is_file():
        from safetensors.torch import load_file

        return load_file(kept)
    raise UserError(
        f"output.dir: {folder} holds no adapted model or adapter; run `ecoadapt adapt` with this config first"
    )
