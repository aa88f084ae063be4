"""ecoadapt: adapt a pretrained language model to a new domain, and measure what it costs.

The public API (see README, "Python API")::

    import ecoadapt

    summary = ecoadapt.adapt("quickstart", overrides=["train.max_steps=20"])
    judged = ecoadapt.evaluate(config) # the judges alone, base vs adapted: judged.task, judged.harness
    ecoadapt.sweep("sweep.yaml")       # a grid of runs and its report
    ecoadapt.plan(config, grid=True)   # forecasts before training
    ecoadapt.report("runs/sweep")      # the report of a sweep or run
    cfg = ecoadapt.Config.from_yaml("run.yaml", ["train.lr=1e-4"])
    summary = ecoadapt.RunSummary.from_dir("runs/x")

Importing ecoadapt imports no torch: each function loads what it needs when it runs.
"""

from importlib import metadata

from ecoadapt.api import ConfigLike, Plan, Report, SweepResult, adapt, demo, evaluate, plan, report, resolve, sweep
from ecoadapt.config import RunConfig
from ecoadapt.results.judged import HarnessResult, Judgement, TaskResult
from ecoadapt.results.summary import RunSummary

Config = RunConfig  # the name users write: ecoadapt.Config.from_yaml(path)

try:
    __version__ = metadata.version("ecoadapt")  # one source: pyproject.toml
except metadata.PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "Config",
    "ConfigLike",
    "HarnessResult",
    "Judgement",
    "Plan",
    "Report",
    "RunConfig",
    "RunSummary",
    "SweepResult",
    "TaskResult",
    "__version__",
    "adapt",
    "demo",
    "evaluate",
    "plan",
    "report",
    "resolve",
    "sweep",
]
