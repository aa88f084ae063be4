"""`ecoadapt sweep`: a grid of adapt runs, one fresh process each, resumable.

A sweep file is a base config plus small overrides per point (as in PEFT's method comparison):

    base: configs/minilm.yaml          # or the sections inline
    grid:                              # every combination
      precision.mode: [fp32, bf16]
      lora.enabled: [false, true]
    points:                            # and/or explicit points
      - {name: frugal, set: {precision.mode: bf16-pure, lora.enabled: true, train.trainable_layers: 2}}
    baseline: {precision.mode: fp32, lora.enabled: false}   # default: fp32 full fine-tune
    report: {tolerance: 0.05, objective: energy}
    output: {dir: runs/sweep}

Each point's config is resolved and checked before anything runs. Results are appended to
``results.jsonl`` one line per point; running the sweep again skips every point whose resolved
config already completed, and retries those that failed.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ecoadapt.commands.isolated import run_adapt
from ecoadapt.config import RunConfig, from_dict, parse_override, schema
from ecoadapt.config.report import ReportSettings
from ecoadapt.core import locks, ownership, storage
from ecoadapt.core.errors import DISK_FULL, AlreadySaid, Interrupted, UserError, disk_full
from ecoadapt.core.progress import fmt_duration, say
from ecoadapt.results import rundir
from ecoadapt.results.summary import FINISHED, RunSummary
from ecoadapt.results.sweep_records import PointFields, PointRecord, latest_results

DEFAULT_BASELINE = {"precision.mode": "fp32", "precision.layers": None, "lora.enabled": False}


@dataclass
class SweepOutput:
    """Where the sweep's points and report go."""

    dir: str = "runs/sweep"
    """The sweep folder: points/, results.jsonl, sweep.json, the report."""


@dataclass
class SweepFile:
    """A sweep file: a base config plus small overrides per point."""

    base: str | dict[str, Any] = field(default_factory=dict)
    """The run config every point starts from: a YAML file (relative to the sweep file) or the
    sections inline."""
    grid: dict[str, list[Any]] = field(default_factory=dict)
    """section.key -> values: every combination is a point."""
    points: list[dict[str, Any]] = field(default_factory=list)
    """Explicit points, each {name: ..., set: {section.key: value}}."""
    baseline: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_BASELINE))
    """The overrides of the point every other is compared with (default: fp32 full fine-tune)."""
    report: ReportSettings = field(default_factory=ReportSettings)
    """How the report chooses its recommendation."""
    output: SweepOutput = field(default_factory=SweepOutput)
    """Where results go."""
    compare: Literal["equal_steps", "equal_loss"] = "equal_steps"
    """equal_steps: every point trains as its config says. equal_loss: the baseline runs first
    and its final held-out loss becomes every other point's train.target_loss (evaluated every
    train.eval_every steps, by default a tenth of the baseline's steps), each point capped at
    ``cap`` x the baseline's steps; the report ranks recipes by training joules to that loss
    and names those that never reached it."""
    cap: float = 4.0
    """With compare: equal_loss, the most steps a point may take, as a multiple of the baseline's."""


@dataclass
class Point:
    """One configuration of a sweep.

    Attributes:
        name: readable label (given, or made from the overrides).
        overrides: dotted key -> value, applied on top of the base.
        config: the resolved, checked run configuration.
        key: hash of the resolved config (output directory excluded): what "done" is keyed by.
        baseline: whether this is the sweep's baseline point.
    """

    name: str
    overrides: dict[str, Any]
    config: RunConfig
    key: str
    baseline: bool = False


@dataclass
class Sweep:
    """A parsed sweep: its points, where they go, and the report's settings."""

    points: list[Point]
    out: Path
    report: ReportSettings = field(default_factory=ReportSettings)
    compare: str = "equal_steps"
    cap: float = 4.0
    paths_from: Path | None = None
    """Where the points look relative corpus paths up: the base config file's folder, or the
    sweep file's when the base is inline (never the temp folder of a point's config)."""
    key: str = "output.dir"
    """What chose ``out``, for messages (the demo's --out)."""


SWEEP_LOCK = ".ecoadapt-sweep.lock"  # held (flock) while a sweep runs: a second one on the folder is refused
SWEEP_ENTRIES = ("sweep.json", "results.jsonl")  # what a sweep writes in its folder, beside points/ and the report
POINTS = "points"  # one run folder per point, each with a manifest of its own


def _set_dotted(raw: dict[str, Any], dotted: str, value: Any, where: str) -> None:
    parts = dotted.split(".")
    if len(parts) != 2:
        raise UserError(f"{where}: '{dotted}' must be section.key (for example precision.mode)")
    section = raw.setdefault(parts[0], {})
    if not isinstance(section, dict):
        raise UserError(f"{where}: section '{parts[0]}' must be a mapping")
    section[parts[1]] = value


def config_key(cfg: RunConfig) -> str:
    """Hash of a resolved config, its output directory left out."""
    data = cfg.to_dict()
    data["output"] = {k: v for k, v in data["output"].items() if k not in ("dir", "overwrite")}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _label(overrides: dict[str, Any]) -> str:
    if not overrides:
        return "base"
    return ",".join(f"{k.split('.')[-1]}={v}" for k, v in overrides.items())


def slug(name: str) -> str:
    """A folder name for a point."""
    keep = "".join(c if c.isalnum() or c in "-_." else "-" for c in name)
    return keep.strip("-")[:80] or "point"


def load(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Sweep:
    """Read a sweep file, expand its grid and points, and check every point's config.

    Args:
        path: the sweep YAML.
        overrides: ``section.key=value`` applied to the base (and so to every point).

    Raises:
        UserError: a bad sweep file, or a point whose config is invalid (named).
    """
    path = Path(path)
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise UserError(f"{path}: no such sweep file") from None
    except yaml.YAMLError as e:
        raise UserError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(spec, dict):
        raise UserError(f"{path}: expected a mapping with base, grid and/or points")
    parsed = schema.build(SweepFile, spec, str(path))
    base = _base_config(parsed.base, path)
    paths_from = (_base_path(parsed.base, path) if isinstance(parsed.base, str) else path).parent.resolve()
    for item in overrides:
        (section, key), value = parse_override(item)
        _set_dotted(base, f"{section}.{key}", value, "--set")
    wanted = _wanted_points(parsed, path)
    out = Path(parsed.output.dir).expanduser()
    points: list[Point] = []
    for name, point_overrides, is_baseline in wanted:
        raw = copy.deepcopy(base)
        for dotted, value in point_overrides.items():
            _set_dotted(raw, dotted, value, f"{path}: point '{name}'")
        cfg = from_dict(raw, f"{path}: point '{name}'")
        key = config_key(cfg)
        same = next((p for p in points if p.key == key), None)
        if same is not None:  # the baseline is often one of the grid points already
            same.baseline = same.baseline or is_baseline
            continue
        points.append(Point(name, point_overrides, cfg, key, is_baseline))
    if parsed.compare == "equal_loss" and parsed.cap < 1:
        raise UserError(f"{path}: cap = {parsed.cap}: with compare: equal_loss it must be at least 1")
    return Sweep(points, out, parsed.report, parsed.compare, parsed.cap, paths_from)


def _base_path(base: str, path: Path) -> Path:
    """The base config file a sweep file names (relative to the sweep file)."""
    named = Path(base).expanduser()
    return named if named.is_absolute() else path.parent / named


def _base_config(base: str | dict[str, Any], path: Path) -> dict[str, Any]:
    if isinstance(base, str):
        base_path = _base_path(base, path)
        loaded = yaml.safe_load(base_path.read_text(encoding="utf-8")) if base_path.exists() else None
        if not isinstance(loaded, dict):
            raise UserError(f"{path}: base config '{base}' not found (or not a mapping of sections)")
        base = loaded
    return copy.deepcopy(base)


def _wanted_points(spec: SweepFile, path: Path) -> list[tuple[str, dict[str, Any], bool]]:
    """(name, overrides, is the baseline) of every point the file asks for, baseline last."""
    wanted: list[tuple[str, dict[str, Any], bool]] = []
    if not all(values for values in spec.grid.values()):
        raise UserError(f"{path}: grid must map section.key to a non-empty list of values")
    if spec.grid:
        for values in itertools.product(*spec.grid.values()):
            overrides_ = dict(zip(spec.grid.keys(), values, strict=True))
            wanted.append((_label(overrides_), overrides_, False))
    for i, point in enumerate(spec.points):
        if not isinstance(point.get("set", {}), dict) or set(point) - {"name", "set"}:
            raise UserError(f"{path}: points[{i}] must be {{name: ..., set: {{section.key: value}}}}")
        overrides_ = dict(point.get("set") or {})
        wanted.append((str(point.get("name") or _label(overrides_)), overrides_, False))
    wanted.append(("baseline", dict(spec.baseline), True))
    if len(wanted) == 1:
        raise UserError(f"{path}: no points: give a grid or a list of points")
    return wanted


def run_points(sweep: Sweep, timeout_s: float | None = None) -> list[dict[str, Any]]:
    """Run every point not already completed, one fresh process each; return all results.

    Raises:
        UserError: the sweep folder is one no sweep may own, or holds files ecoadapt did not
            write (nothing is written then).
    """
    rundir.check_location(sweep.out, sweep.key)
    folder = ownership.Folder(sweep.out, sweep.key)
    folder.check_ours()
    folder.claim(SWEEP_LOCK, *SWEEP_ENTRIES, nested=(POINTS,))
    fix = "wait for it to end, or choose another folder"
    with locks.held(sweep.out / SWEEP_LOCK, f"{sweep.key}: {sweep.out}", fix=fix), folder.sealed_on_exit():
        return _run_points(sweep, timeout_s)


def _run_points(sweep: Sweep, timeout_s: float | None) -> list[dict[str, Any]]:
    results_path = sweep.out / "results.jsonl"
    manifest = {
        "report": dataclasses.asdict(sweep.report),
        "points": [{"name": p.name, "key": p.key, "baseline": p.baseline} for p in sweep.points],
    }
    storage.write_json(sweep.out / "sweep.json", manifest)
    done = {r["key"] for r in storage.read_jsonl(results_path) if r.get("status") in FINISHED}
    todo = [p for p in sweep.points if p.key not in done]
    if sweep.compare == "equal_loss":  # the baseline sets the target: it runs first
        todo.sort(key=lambda p: not p.baseline)
    if len(todo) < len(sweep.points):
        say(f"[sweep] {len(sweep.points) - len(todo)} of {len(sweep.points)} points already done: skipped")
    durations: list[float] = []
    for i, point in enumerate(todo, 1):
        eta = f", about {fmt_duration(sum(durations) / len(durations) * (len(todo) - i + 1))} left" if durations else ""
        say(f"[sweep] point {i}/{len(todo)}: {point.name}{eta}")
        run_dir = sweep.out / POINTS / f"{slug(point.name)}-{point.key[:6]}"
        # A retried point resumes what its earlier attempt finished (the trained model, the task
        # seeds, a checkpoint), or starts again where nothing was: its run folder decides.
        cfg: dict[str, Any] | None = point.config.to_dict()
        start = time.perf_counter()
        if sweep.compare == "equal_loss" and not point.baseline:
            cfg = _at_equal_loss(point.config.to_dict(), sweep, results_path)
        fields = PointFields(point.name, point.key, point.baseline, point.overrides, str(run_dir))
        if cfg is None:  # no target to train to: recorded as a failed point, as run_adapt records one
            error = "compare: equal_loss: the baseline has no finished result to set the target"
            record = PointRecord(fields, RunSummary(status="failed", config=point.config.to_dict(), error=error))
        else:
            ran = run_adapt(cfg, run_dir, timeout_s=timeout_s, stream_output=True, paths_from=sweep.paths_from)
            record = PointRecord.from_line({**dataclasses.asdict(fields), **ran}, str(results_path))
        durations.append(time.perf_counter() - start)
        _record(results_path, record)
        signal_name = record.point.interrupted_by
        if signal_name is not None:  # the signal reached the point, which kept its work: stop here
            raise Interrupted(
                signal_name,
                f"[sweep] {signal_name}: stopped at point {point.name} ({record.summary.status}); "
                "rerun the same command to resume it and the points after it",
            )
        if record.summary.status == "failed":
            say(f"[sweep] point {point.name} failed: {record.summary.error}; going on")
    latest = latest_results(sweep.out, {p.key for p in sweep.points})
    return [latest[p.key] for p in sweep.points if p.key in latest]


def _record(results_path: Path, record: PointRecord) -> None:
    """Append a point's line to results.jsonl. A point that stopped on a full disk has streamed its
    one error line already, and every point after it would meet the same disk: the sweep stops
    there, saying nothing more, whether or not its line could still be written (the same
    command, rerun, reruns the point, which resumes)."""
    if DISK_FULL not in (record.summary.error or ""):
        storage.append_jsonl(results_path, record.to_line())
        return
    try:
        storage.append_jsonl(results_path, record.to_line())
    except OSError as e:
        if disk_full(e) is None:
            raise
    raise AlreadySaid(2)


def _at_equal_loss(cfg: dict[str, Any], sweep: Sweep, results_path: Path) -> dict[str, Any] | None:
    """A point's config for an equal-quality comparison: trained until the baseline's final
    held-out loss, evaluated every train.eval_every steps, capped at ``sweep.cap`` x the
    baseline's steps; None when the baseline has no finished result to take the target from."""
    keys = {p.key for p in sweep.points if p.baseline}
    base = next((r for r in reversed(storage.read_jsonl(results_path)) if r.get("key") in keys), None)
    if base is None or base.get("status") not in FINISHED or not (base.get("eval") or {}).get("loss"):
        return None
    steps = int(base["steps"])
    train = cfg["train"]
    train["target_loss"] = float(base["eval"]["loss"])
    train["max_steps"] = math.ceil(sweep.cap * steps)
    train["eval_every"] = train.get("eval_every") or max(1, steps // 10)
    train["epochs"] = None
    return cfg
