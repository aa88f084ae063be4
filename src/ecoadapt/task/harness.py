"""The evaluation harness as a judge (``task.harness``): a decoder judged the way its users judge it.

EleutherAI's lm-evaluation-harness scores a causal LM by the log-likelihoods it gives each
answer (zero- or few-shot), on tasks from its registry or from a YAML file over local data.
ecoadapt hands it the model object itself, in the task's own precision, once for the base model
(cached, as the probe's base results are) and once for the adapted one, with the same prompts
and the same few-shot examples; then pairs the two by item: each item's adapted-minus-base score,
their mean with a Student-t 95% interval, and a verdict in words (:mod:`ecoadapt.task.stats`).

Each model's results are recorded as they end (``harness.jsonl`` in the run folder), so a killed
judgement goes on from the model it was on. Loading a task reads its data: a task that cannot
load (an unreadable YAML, a file it names that is not there, a name the registry lacks, a hub
dataset that is not cached under HF_HUB_OFFLINE=1) is a one-line error before training starts.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import random
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ecoadapt.config import RunConfig, TaskConfig
from ecoadapt.core import storage
from ecoadapt.core.errors import UserError, first_line
from ecoadapt.core.progress import say
from ecoadapt.data import hub_datasets
from ecoadapt.measure.energy import EnergyTracker
from ecoadapt.measure.environment import package_version, source_revision
from ecoadapt.model import pretrained
from ecoadapt.model.precision import Policy
from ecoadapt.results.judged import HarnessResult, HarnessTask, PairedGain
from ecoadapt.task import base_cache, stats

INSTALL = "pip install 'ecoadapt[harness]' (lm-eval)"
YAML_SUFFIXES = (".yaml", ".yml")
MODELS = ("base", "adapted")


def lm_eval() -> Any:
    """The harness package, or a UserError that says how to install it."""
    try:
        import lm_eval as package
    except ImportError:
        raise UserError(f"task.harness: the evaluation harness is not installed; {INSTALL}") from None
    return package


@dataclass(frozen=True)
class Spec:
    """One entry of task.harness, ready for the harness.

    Attributes:
        entry: as the config gives it.
        config: the task's YAML as a mapping (data paths made absolute), or None for a
            registry name.
        digest: what identifies its contents: the YAML and every file it reads, or the name
            and the harness's version.
    """

    entry: str
    config: dict[str, Any] | None
    digest: str

    @property
    def load_as(self) -> str | dict[str, Any]:
        return self.config if self.config is not None else self.entry


def specs(cfg: TaskConfig) -> list[Spec]:
    """Every task.harness entry as a :class:`Spec`.

    Raises:
        UserError: a YAML file that is missing or unreadable, or that names no task or a data
            file that is not there.
    """
    return [_file_spec(Path(e)) if e.endswith(YAML_SUFFIXES) else _name_spec(e) for e in cfg.harness]


def _name_spec(name: str) -> Spec:
    return Spec(name, None, f"{name}@lm_eval-{package_version('lm_eval')}")


def _file_spec(path: Path) -> Spec:
    if not path.is_file():
        raise UserError(f"task.harness: {path}: no such task file (a harness task YAML, or a registry task's name)")
    lm_eval()
    from lm_eval.tasks._yaml_loader import load_yaml

    try:
        config = load_yaml(path)
    except Exception as e:  # yaml errors, !function targets that do not import, include cycles
        raise UserError(f"task.harness: {path}: cannot read it as a harness task ({first_line(e)})") from None
    if not isinstance(config.get("task"), str):
        raise UserError(f"task.harness: {path}: names no task (a harness task YAML has a 'task: NAME' line)")
    files = _anchor_data_files(config, path)
    h = hashlib.sha256(path.read_bytes())
    for file in files:
        h.update(base_cache.file_digest(file).encode())
    return Spec(str(path), config, h.hexdigest())


def _anchor_data_files(config: dict[str, Any], path: Path) -> list[Path]:
    """The YAML's ``dataset_kwargs.data_files`` looked up from the YAML's own folder first, then
    from the working folder (where the harness alone would look), in place; returns the files.

    Raises:
        UserError: a data file that is not there, naming it and the YAML.
    """
    kwargs = config.get("dataset_kwargs") or {}
    files = kwargs.get("data_files")
    if files is None:
        return []
    found: list[Path] = []

    def anchor(value: Any) -> Any:
        if isinstance(value, list):
            return [anchor(v) for v in value]
        if isinstance(value, dict):
            return {k: anchor(v) for k, v in value.items()}
        file = Path(value).expanduser()
        if not file.is_absolute():  # the YAML's folder first, then the working folder (as corpus paths)
            file = path.parent / file if (path.parent / file).is_file() or not file.is_file() else file.resolve()
        if not file.is_file():
            raise UserError(f"task.harness: {path}: its data file {value} is not there ({file})")
        found.append(file)
        return str(file)

    config["dataset_kwargs"] = {**kwargs, "data_files": anchor(files)}
    return found


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The harness's and datasets' logs and bars quietened for the body (ecoadapt says what runs)."""
    import logging

    import datasets

    loggers = [logging.getLogger(n) for n in ("lm_eval", "lm-eval", "datasets")]
    levels = [lg.level for lg in loggers]
    bars = datasets.utils.logging.is_progress_bar_enabled()
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    datasets.utils.logging.disable_progress_bar()
    from ecoadapt.model.voice import without_bars

    try:
        with without_bars("lm_eval.api.task", "lm_eval.api.model", "lm_eval.models.huggingface", "lm_eval.evaluator"):
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
        if bars:
            datasets.utils.logging.enable_progress_bar()


def load_tasks(cfg: TaskConfig, the_specs: list[Spec]) -> dict[str, Any]:
    """The harness's tasks, their data read, few-shot set as the config says.

    Returns:
        {task name: the harness's Task}.

    Raises:
        UserError: a task the harness cannot load (its first line), or a name the registry lacks.
    """
    lm_eval()
    from lm_eval.tasks import TaskManager

    registry = any(s.config is None for s in the_specs)  # indexing the registry takes seconds
    with _quiet():
        manager = TaskManager(include_defaults=registry)
        for s in the_specs:
            if s.config is None and s.entry not in manager.all_tasks:
                raise UserError(
                    f"task.harness: {s.entry!r} is neither a task YAML file nor a task of the harness's registry "
                    "(lm-eval --tasks list names them)"
                )
        loaded: dict[str, Any] = {}
        for s in the_specs:
            try:
                with hub_datasets.honour_offline():  # a registry task's data: from the cache alone, offline
                    tasks = manager.load([s.load_as])["tasks"]
            except Exception as e:  # a dataset not cached offline, a malformed config, a data file it rejects
                raise UserError(f"task.harness: {s.entry}: the harness cannot load it ({first_line(e)})") from None
            loaded.update(tasks)
    for task in loaded.values():
        task.set_config(key="num_fewshot", value=cfg.harness_fewshot)
    return loaded


def check(cfg: TaskConfig) -> None:
    """Check the harness's tasks before an adaptation starts: they load and their data reads."""
    tasks = load_tasks(cfg, specs(cfg))
    items = sum(len(_documents(t)) for t in tasks.values())
    limited = f", {cfg.harness_limit} at most each" if cfg.harness_limit else ""
    say(f"harness checked: {len(tasks)} task(s), {items:,} items{limited} (lm-eval {package_version('lm_eval')})")


def _documents(task: Any) -> list[Any]:
    docs = task.eval_docs
    return list(docs) if docs is not None else []


# -- scoring ---------------------------------------------------------------------------------


def _evaluate(cfg: TaskConfig, tasks: dict[str, Any], model: Any, tokenizer: Any, policy: Policy) -> dict[str, Any]:
    """Every task on ``model``: per task its headline metric and each item's score."""
    import numpy as np
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM

    seed = cfg.seeds[0]
    for task in tasks.values():  # the same few-shot draws for every model judged
        task.set_fewshot_seed(seed=seed)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    with _quiet():
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=cfg.harness_batch_size)
        with policy.autocast(), torch.no_grad():
            out = evaluate(
                lm=lm,
                task_dict={"tasks": tasks, "groups": {}, "group_map": {}},
                limit=cfg.harness_limit,
                bootstrap_iters=0,  # the standard errors come from the items, below
                log_samples=True,
                verbosity="ERROR",
            )
    return {name: _task_scores(task, out, name) for name, task in tasks.items()}


def _task_scores(task: Any, out: dict[str, Any], name: str) -> dict[str, Any]:
    """One task's headline metric: its aggregate and, when it is a mean of per-item numbers, each
    item's value (by document id) for pairing."""
    metric = next(iter(task.aggregation()))
    higher = bool(task.higher_is_better().get(metric, True))
    results = out["results"][name]
    key = next((k for k in results if k.split(",")[0] == metric), None)
    aggregate = results.get(key) if key is not None else None
    items: dict[str, float] = {}
    for sample in out.get("samples", {}).get(name, []):
        value = sample.get(metric)
        if isinstance(value, (int, float, bool)) and not isinstance(value, str):
            items[str(sample["doc_id"])] = float(value)
    paired = (
        bool(items)
        and isinstance(aggregate, (int, float))
        and math.isclose(float(aggregate), statistics.fmean(items.values()), rel_tol=1e-6, abs_tol=1e-9)
    )
    return {
        "metric": metric,
        "higher_is_better": higher,
        "value": float(aggregate) if isinstance(aggregate, (int, float)) else None,
        "items": items if paired else {},
    }


def _stderr(items: dict[str, float]) -> float | None:
    values = list(items.values())
    return statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None


def summarize(base: dict[str, Any], adapted: dict[str, Any] | None) -> list[HarnessTask]:
    """Per task: the metric for each model with its standard error, and the paired difference."""
    rows = []
    for name, b in base.items():
        row = HarnessTask(
            name=name,
            metric=b["metric"],
            higher_is_better=b["higher_is_better"],
            base=b["value"],
            base_stderr=_stderr(b["items"]),
            items=len(b["items"]) or None,
        )
        a = (adapted or {}).get(name)
        if a is not None:
            row.adapted, row.adapted_stderr = a["value"], _stderr(a["items"])
            shared = sorted(set(b["items"]) & set(a["items"]))
            if shared:
                sign = 1.0 if b["higher_is_better"] else -1.0  # a gain is an improvement either way
                diffs = [sign * (a["items"][i] - b["items"][i]) for i in shared]
                gain = stats.mean_interval(diffs, "item")
                word = stats.verdict(gain, sign * b["value"], sign * a["value"], None)
                row.gain = PairedGain(gain.mean, gain.low, gain.high, gain.n)
                row.verdict, row.verdict_text = word.word, word.text
            else:
                row.verdict_text = f"{b['metric']} is not a mean over items: not paired"
        rows.append(row)
    return rows


# -- the judge -------------------------------------------------------------------------------


class HarnessStopped(Exception):
    """A signal asked the judge to stop between two models; what was scored is recorded."""

    def __init__(self, signal_name: str) -> None:
        super().__init__(f"{signal_name}: the harness stopped between models")
        self.signal_name = signal_name


def cache_key(run: RunConfig, the_specs: list[Spec], precision: str, device_type: str) -> str:
    """The base model's harness results' key: its files, the tasks' contents, every setting that
    changes a score, and the versions of what scores."""
    t = run.task
    parts = {
        "model": base_cache.model_identity(run.model),
        "tasks": [s.digest for s in the_specs],
        "fewshot": t.harness_fewshot,
        "limit": t.harness_limit,
        "seed": t.seeds[0],
        "precision": precision,
        "device": device_type,
        "versions": [package_version(p) for p in (*base_cache.SCORING_PACKAGES, "lm_eval")],
        "source": source_revision(),
    }
    return "harness-" + hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def compare(
    run: RunConfig,
    tokenizer: Any,
    adapted: dict[str, torch.Tensor] | None,
    device: torch.device,
    tracker: EnergyTracker | None = None,
    record_file: Path | None = None,
    stop: Callable[[], str | None] | None = None,
) -> HarnessResult:
    """The harness's tasks on the base model and on ``adapted`` (the whole model's weights):
    the summary's ``harness`` part.

    Args:
        run: the run's config (task section, model).
        tokenizer: the model's tokenizer.
        adapted: the adapted model's weights, LM head included (None: base only).
        device: where to score.
        tracker: the energy tracker, for each model's joules (None: none).
        record_file: a JSON-lines file where each model's scores are recorded as they end;
            those already there are not scored again.
        stop: asked before each model: the name of a signal that asks the judge to stop.

    Raises:
        HarnessStopped: ``stop`` named a signal.
    """
    from ecoadapt.task.downstream import task_precision

    start = time.perf_counter()
    the_specs = specs(run.task)
    precision = task_precision(run.task.precision, device)
    key = cache_key(run, the_specs, precision, device.type) if run.task.cache else None
    done = _scored_before(record_file, key)
    todo = [m for m in MODELS if m not in done and (m == "base" or adapted is not None)]
    if todo:
        judge = _Judge(run, load_tasks(run.task, the_specs), tokenizer, precision, device, tracker)
        try:
            for name in todo:
                signal_name = stop() if stop is not None else None
                if signal_name is not None:
                    raise HarnessStopped(signal_name)
                done[name] = judge.score(name, adapted if name == "adapted" else None)
                if name == "base" and key is not None:
                    base_cache.store_named(key, done[name])
                if record_file is not None:
                    storage.append_jsonl(record_file, done[name])
        finally:
            judge.policy.restore()
    return _result(run.task, precision, done, time.perf_counter() - start)


def _scored_before(record_file: Path | None, key: str | None) -> dict[str, dict[str, Any]]:
    """The models scored by an earlier attempt of this judgement, and the base model's cached
    results, by model name."""
    records = storage.read_jsonl(record_file) if record_file is not None else []
    if records:
        say(f"harness: {len(records)} model(s) scored before this attempt: kept, not scored again")
    done: dict[str, dict[str, Any]] = {r["model"]: {**r, "recorded": True} for r in records}
    if "base" not in done and key is not None and (cached := base_cache.load_named(key)) is not None:
        done["base"] = {**cached, "cached": True}
        say(f"harness base: cached (computed once before, {cached.get('joules', 0):,.0f} J then)")
    return done


class _Judge:
    """Scores a model (the base, then with the adapted weights) on the loaded tasks."""

    def __init__(
        self,
        run: RunConfig,
        tasks: dict[str, Any],
        tokenizer: Any,
        precision: str,
        device: torch.device,
        tracker: EnergyTracker | None,
    ) -> None:
        self.run, self.tasks, self.tokenizer, self.tracker = run, tasks, tokenizer, tracker
        self.precision = precision
        self.model = _model(run, device)
        self.policy = Policy(precision, device.type)

    def score(self, name: str, weights: dict[str, torch.Tensor] | None) -> dict[str, Any]:
        """``name``'s record: per task its scores, and the joules and seconds they took."""
        if weights is not None:
            self.model.load_state_dict(weights, strict=False)
        cfg = self.run.task
        say(f"harness {name}: {', '.join(self.tasks)} ({self.precision}, {cfg.harness_fewshot}-shot)")
        j0, t0 = (self.tracker.total_joules() if self.tracker else 0.0), time.perf_counter()
        scores = _evaluate(cfg, self.tasks, self.model, self.tokenizer, self.policy)
        return {
            "model": name,
            "scores": scores,
            "joules": (self.tracker.total_joules() if self.tracker else 0.0) - j0,
            "seconds": time.perf_counter() - t0,
        }


def _result(cfg: TaskConfig, precision: str, done: dict[str, dict[str, Any]], seconds: float) -> HarnessResult:
    """The summary's ``harness`` part from the models' records."""
    computed = [r for r in done.values() if not r.get("cached")]
    return HarnessResult(
        harness_version=package_version("lm_eval"),
        precision=precision,
        fewshot=cfg.harness_fewshot,
        limit=cfg.harness_limit,
        seed=cfg.seeds[0],
        tasks=summarize(done["base"]["scores"], done["adapted"]["scores"] if "adapted" in done else None),
        base_cached=bool(done["base"].get("cached")),
        evaluation_joules=sum(r.get("joules", 0.0) for r in computed),
        # Scored by an earlier, killed attempt: their joules join this window's (finish adds them).
        resumed_records=[{"joules": r["joules"], "seconds": r["seconds"]} for r in done.values() if r.get("recorded")],
        time_s=seconds,
    )


def _model(run: RunConfig, device: torch.device) -> Any:
    """The base model as a causal LM in fp32 (the task's precision is applied by autocast), on
    ``device``: the object the harness scores, base first, then with the adapted weights."""
    loaded = pretrained.load(run.model, run.data.max_seq_len, run.train.seed)
    if loaded.objective != "clm":
        raise UserError("task.harness: the harness judges causal LMs; this model is a masked LM")
    return loaded.model.to(device).eval()
