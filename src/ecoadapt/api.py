"""The public Python API: what the ``ecoadapt`` command calls, and what notebooks and scripts call.

    import ecoadapt

    summary = ecoadapt.adapt("minilm-mlm", overrides=["train.max_steps=20"])
    print(summary.eval.perplexity, summary.energy["joules"], summary.energy["method"])
    report = ecoadapt.report("runs/sweep")
    print(report.recommendation_text)

Every function takes a config as a :class:`~ecoadapt.config.RunConfig`, a plain mapping (the
YAML's sections), a YAML file's path or a shipped preset's name, plus ``section.key=value``
overrides (the CLI's ``--set``), and returns a typed result. Importing this module imports no
torch; each function loads what it needs when it runs.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ecoadapt.config import RunConfig, dump
from ecoadapt.config.presets import resolve_config
from ecoadapt.core import heap
from ecoadapt.core.errors import UserError
from ecoadapt.results.judged import Judgement
from ecoadapt.results.summary import FINISHED, RunSummary

ConfigLike = RunConfig | Mapping[str, Any] | str | os.PathLike[str]
"""What the API takes as a config: an object, a mapping of sections, a YAML path or a preset's name."""
Overrides = list[str] | tuple[str, ...]
"""``section.key=value`` overrides (the CLI's ``--set``)."""


class JobFailed(UserError):
    """A torchrun job ended before writing its summary; its ranks printed why."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        """The launcher's exit status (128 + the signal's number when one ended it)."""


@dataclass
class ResolvedConfig:
    """A config made ready to run: the checked config and where it came from."""

    cfg: RunConfig
    """The checked configuration, overrides applied."""
    path: Path | None = None
    """The YAML file it was read from (None for an object or a mapping)."""
    paths_from: Path | None = None
    """Where relative paths are looked up first, when not in the YAML's folder (a sweep point's
    config is a temp file: its paths are the sweep's)."""

    @property
    def base(self) -> Path | None:
        """The folder relative corpus and task paths are looked up in first: ``paths_from``,
        else the YAML's."""
        if self.paths_from is not None:
            return self.paths_from
        return self.path.parent if self.path is not None and self.path.exists() else None


@dataclass
class Report:
    """What ``ecoadapt report`` (and a sweep, and the demo) found; the files are in ``folder``."""

    folder: Path
    """Where report.md, report.html, results.csv, the plots and the compute statement are."""
    table: str
    """The table of every point (markdown)."""
    recommendation: dict[str, Any] | None
    """The recommended point (name, row, ratios against the baseline, text), or None if none completed."""
    verdict: list[str] = field(default_factory=list)
    """The verdict in words: its headline first, then one line per finding."""
    metric: str = "eval_loss"
    """What accuracy was judged by (the task's metric, or the held-out loss)."""
    front: list[str] = field(default_factory=list)
    """The names of the points on the Pareto front of energy vs accuracy."""
    notes: list[str] = field(default_factory=list)
    """How to read the figures: what was measured and what was estimated, tolerance, objective."""

    @property
    def recommendation_text(self) -> str:
        """The recommendation in one sentence."""
        return self.recommendation["text"] if self.recommendation else "no point completed"

    @classmethod
    def from_built(cls, folder: Path, built: dict[str, Any]) -> Report:
        """The report builder's result, typed."""
        fields = ("table", "recommendation", "verdict", "metric", "front", "notes")
        return cls(folder=folder, **{k: built[k] for k in fields if k in built})


@dataclass
class Plan:
    """``ecoadapt plan``'s forecast: one row per recipe (peak bytes, seconds, joules, fits)."""

    steps: int
    """The steps forecast (the config's, or those its budget allows)."""
    source: str
    """Where ``steps`` came from, in words."""
    recipes: list[dict[str, Any]]
    """One forecast per recipe, labelled as forecasts (never measurements)."""
    table: str
    """The forecasts as a table."""
    config: RunConfig
    """The config forecast (overrides applied)."""


@dataclass
class SweepResult:
    """A sweep's points (their results.jsonl records, summaries included) and its report."""

    results: list[dict[str, Any]]
    """One record per point: the sweep's own fields and the run's summary."""
    report: Report
    """The report written into the sweep's folder."""

    @property
    def any_completed(self) -> bool:
        """Whether at least one point did not fail."""
        return any(r.get("status") != "failed" for r in self.results)

    @property
    def all_finished(self) -> bool:
        """Whether every point finished (completed, or stopped by its budget): the sweep's exit 0."""
        return bool(self.results) and all(r.get("status") in FINISHED for r in self.results)


def resolve(config: ConfigLike, overrides: Overrides = ()) -> ResolvedConfig:
    """Any config form as a checked :class:`RunConfig` (with where it came from).

    Raises:
        UserError: no such file or preset, or a bad key or value (named).
    """
    overrides = tuple(overrides)
    if isinstance(config, RunConfig):
        return ResolvedConfig(RunConfig.from_mapping(config.to_dict(), overrides, "config object"))
    if isinstance(config, Mapping):
        return ResolvedConfig(RunConfig.from_mapping(dict(config), overrides, "config mapping"))
    if isinstance(config, (str, os.PathLike)):
        path = resolve_config(os.fspath(config))
        return ResolvedConfig(RunConfig.from_yaml(path, overrides), path)
    raise UserError(f"a config is a RunConfig, a mapping, a YAML path or a preset name, not {type(config).__name__}")


def adapt(
    config: ConfigLike, overrides: Overrides = (), resume: bool = False, paths_from: str | Path | None = None
) -> RunSummary:
    """Continued pre-training as the config says, then the downstream task if it names one.

    With ``parallel.nproc`` above 1 (and not already under torchrun) the same run is relaunched
    as that many processes through torchrun, and the job's summary is read back.

    Args:
        config: the run's config (object, mapping, YAML path or preset name).
        overrides: ``section.key=value`` overrides.
        resume: require a checkpoint in ``output.dir`` to resume from.
        paths_from: the folder relative corpus paths are looked up in first (default: the
            config file's folder, or none for an object or a mapping).

    Returns:
        The run's summary (also in ``output.dir``/summary.json).

    Raises:
        UserError: bad input, found before anything is written.
    """
    overrides = (*overrides, *(("output.resume=true",) if resume else ()))
    resolved = resolve(config, overrides)
    if resolved.cfg.lora.quantize:
        heap.huge_pages_for_torch()  # read once by torch's allocator: before anything imports torch

    from ecoadapt.commands import adapt as adapt_command
    from ecoadapt.model import parallel

    if paths_from is not None:
        resolved.paths_from = Path(paths_from).expanduser().resolve()
    if resolved.cfg.parallel.nproc > 1 and not parallel.under_torchrun():
        return _launch_adapt(resolved, overrides)
    return adapt_command.adapt(resolved.cfg, base=resolved.base)


def _launch_adapt(resolved: ResolvedConfig, overrides: tuple[str, ...]) -> RunSummary:
    """Relaunch ``adapt`` as ``parallel.nproc`` processes under torchrun; the job's summary."""
    from ecoadapt.model import parallel, precision_choice

    cfg, started = resolved.cfg, time.time()
    # Chosen once, here: ranks probing the same CPU at once would measure each other.
    if precision_choice.resolve(cfg, parallel.pick_device(cfg.train.device)) is not None:
        overrides = (*overrides, f"precision.mode={cfg.precision.mode}")
    with tempfile.TemporaryDirectory(prefix="ecoadapt-launch-") as tmp:
        if resolved.path is not None:
            argv = ["adapt", str(resolved.path), *(f"--set={s}" for s in overrides)]
        else:  # an object or a mapping: the ranks read the resolved config from a file
            written = Path(tmp) / "config.yaml"
            written.write_text(dump(cfg), encoding="utf-8")
            argv = ["adapt", str(written)]
        base = resolved.base
        # The ranks look relative paths up where this process would (never in the temp folder).
        argv += ["--paths-from", str(base.resolve() if base is not None else Path.cwd())]
        code = parallel.launch(cfg.parallel.nproc, argv)
    summary_path = Path(cfg.output.dir) / "summary.json"
    if not summary_path.is_file() or summary_path.stat().st_mtime < started:
        raise JobFailed(
            f"the {cfg.parallel.nproc}-process job ended with exit status {code} before writing "
            f"{summary_path}; its ranks' messages are above",
            code or 1,
        )
    return RunSummary.from_dir(cfg.output.dir)


def evaluate(config: ConfigLike, overrides: Overrides = ()) -> Judgement:
    """The judges alone (task.train, task.harness): base and adapted model (from ``output.dir``),
    the same seeds.

    Returns:
        ``task``: metric, base and adapted scores, the paired per-seed gains with their 95%
        interval and verdict in words, and its energy window (``energy``: joules, method);
        ``harness``: per harness task the same, paired by item. None where the config names no
        such judge.
    """
    from ecoadapt.commands import evaluate as evaluate_command

    resolved = resolve(config, overrides)
    return evaluate_command.judge(resolved.cfg, resolved.base)


def sweep(spec: str | os.PathLike[str], overrides: Overrides = ()) -> SweepResult:
    """A grid of adapt runs, one fresh process each, resumable; then its report.

    Args:
        spec: a sweep YAML (base config, grid and/or points, baseline, report settings).
        overrides: ``section.key=value`` overrides of the base config (so of every point).
    """
    from ecoadapt.commands import sweep as sweep_command
    from ecoadapt.reports import builder

    loaded = sweep_command.load(Path(spec), list(overrides))
    results = sweep_command.run_points(loaded)
    return SweepResult(results, Report.from_built(loaded.out, builder.build(loaded.out)))


def plan(
    config: ConfigLike,
    overrides: Overrides = (),
    memory_gb: float | None = None,
    energy_j: float | None = None,
    grid: bool = False,
    fresh: bool = False,
    device: str | None = None,
    mfu: float | None = None,
) -> Plan:
    """Forecast peak memory, time and energy of a recipe (or a grid of them) on this device.

    Each recipe is measured for a few trial steps in a child process; the forecasts are
    labelled as such. Given ``memory_gb`` or ``energy_j``, the grid is forecast and each recipe
    is marked as fitting or not. Given ``device`` (a GPU of
    :data:`ecoadapt.forecast.devices.DEVICES`, or ``cpu-<N>gb``: a CPU machine with N GiB of
    RAM), a projection onto it instead, at ``mfu`` (default
    :data:`ecoadapt.forecast.devices.DEFAULT_MFU`) where no trial steps measure the time,
    labelled as a projection.
    """
    from ecoadapt.core.progress import say
    from ecoadapt.forecast import planner

    resolved = resolve(config, overrides)
    steps, source = planner.planned_steps(resolved.cfg, resolved.base)
    if device is not None:
        from ecoadapt.forecast import devices

        rows, text = planner.on_device(resolved.cfg, steps, device, mfu or devices.DEFAULT_MFU, grid, fresh, say)
        return Plan(steps, source, rows, text, resolved.cfg)
    grid = grid or memory_gb is not None or energy_j is not None  # "which recipes fit"
    rows = planner.run(resolved.cfg, steps, memory_gb, energy_j, grid, fresh, say)
    return Plan(steps, source, rows, planner.table(rows, memory_gb, energy_j), resolved.cfg)


def report(
    folder: str | os.PathLike[str],
    more: Sequence[str | os.PathLike[str]] = (),
    tolerance: float | None = None,
    objective: str | None = None,
) -> Report:
    """Write report.md, report.html, results.csv, plots and a compute statement for a sweep or run.

    Args:
        folder: a sweep or run folder (the report goes there).
        more: more sweep or run folders whose points join the table.
        tolerance: how far from the best metric a recommended point may be (the sweep's setting
            by default).
        objective: what the recommendation minimises: energy, time or memory.
    """
    from ecoadapt.reports import builder

    path = Path(folder)
    return Report.from_built(path, builder.build(path, tolerance, objective, [Path(m) for m in more]))


def demo(out: str | os.PathLike[str] = "runs/demo", quick: bool = False) -> Report:
    """The whole job on the embedded default, offline: a short sweep and its report."""
    from ecoadapt.commands import demo as demo_command

    path = Path(out)
    return Report.from_built(path, demo_command.run_demo(path, quick=quick))
