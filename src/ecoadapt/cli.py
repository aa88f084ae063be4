"""The `ecoadapt` command: parse, call, print. No logic lives here."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import textwrap
import warnings
from importlib import resources
from pathlib import Path
from typing import Any

from ecoadapt import __version__
from ecoadapt.config import all_keys
from ecoadapt.errors import UserError


def preset_names() -> list[str]:
    """The presets shipped with the package (YAML files in ecoadapt/presets)."""
    folder = resources.files("ecoadapt") / "presets"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def resolve_config(name: str) -> Path:
    """A config file path, or the path of the shipped preset of that name."""
    path = Path(name)
    if path.exists() or name.endswith((".yaml", ".yml")):
        return path
    if name in preset_names():
        return Path(str(resources.files("ecoadapt") / "presets" / f"{name}.yaml"))
    raise UserError(f"{name}: no such config file or preset (presets: {', '.join(preset_names())})")


def keys_help(rows: list[tuple[str, str, Any, str]] | None = None, defaults: bool = True) -> str:
    """Keys with their type, default and help, generated from a schema (the config's by default)."""
    lines = []
    for key, type_name, default, doc in rows if rows is not None else all_keys():
        lines.append(f"  {key}  ({type_name}" + (f", default {default!r})" if defaults else ")"))
        lines.extend(textwrap.wrap(doc, 92, initial_indent="      ", subsequent_indent="      "))
    return "\n".join(lines)


def _cmd_adapt(args: argparse.Namespace) -> int:
    from ecoadapt import adapt, config, parallel

    path = resolve_config(args.config)
    overrides = [*args.set, *(["output.resume=true"] if args.resume else [])]
    cfg = config.load(path, overrides)
    if cfg.parallel.nproc > 1 and not parallel.under_torchrun():
        # Relaunch this very command as nproc processes under torchrun.
        return parallel.launch(cfg.parallel.nproc, ["adapt", str(path), *(f"--set={s}" for s in overrides)])
    summary = adapt.run(cfg, base=path.parent if path.exists() else None)
    if summary.status == "interrupted":
        # The conventional status of a process ended by a signal (128 + its number).
        code = 128 + int(signal.Signals[summary.signal or "SIGTERM"])
    else:
        # A failed task leaves a complete summary of the adaptation, and exit status 1 for scripts.
        code = 1 if summary.task is not None and summary.task.get("status") == "failed" else 0
        if summary.rank == 0:
            _print_run(summary, cfg.output.dir)
    if parallel.under_torchrun() and code in (0, 1):
        _leave(code)
    return code


def _print_run(summary: Any, run_dir: str) -> None:
    ev = summary.eval
    print(
        f"{summary.status}: {summary.steps} steps, {summary.tokens:,} tokens in {summary.time_s:.1f} s "
        f"({summary.tokens_per_s:,.0f} tok/s, measured); held-out loss {ev.loss_before:.4f} -> {ev.loss:.4f}"
    )
    if summary.task is not None:
        print(task_line(summary.task))
    if summary.mfu is not None:
        f = summary.flops
        print(f"MFU: {summary.mfu:.1%} of a {f['peak_flops_per_s'] / 1e9:,.0f} GFLOP/s peak ({f['peak_source']})")
    if summary.energy is not None:
        e = summary.energy
        print(f"energy: {e['joules']:,.0f} J in all, {e['train_joules']:,.0f} J training ({e['method']}, {e['meter']})")
    mem = summary.memory
    if mem and mem.get("train_peak_bytes") is not None:
        print(
            f"peak memory ({mem['device']}, measured): training {mem['train_peak_bytes'] / 2**20:,.0f} MiB, "
            f"evaluation {mem.get('eval_peak_bytes', 0) / 2**20:,.0f} MiB"
        )
    for line in _compile_and_forecast_lines(summary):
        print(line)
    print(f"run directory: {run_dir}")


def _compile_and_forecast_lines(summary: Any) -> list[str]:
    """What was compiled and what it cost; the forecast beside the measured figures."""
    lines = []
    c = summary.compile
    if c and c["compiled"] != "off":
        lines.append(
            f"compiled: {c['compiled']} ({c['compile_s']:.1f} s of compiling, "
            f"{c.get('training_compile_s') or 0:.1f} s of it inside training's time and energy)"
        )
    elif c and c.get("fallback"):
        lines.append(f"compiled: nothing (train.compile=auto fell back to eager: {c['fallback']})")
    f = summary.forecast
    if f and "versus_measured" in f:
        v = f["versus_measured"]
        ratios = {name: v[name]["ratio"] for name in ("peak_bytes", "step_s", "train_joules")}
        shown = {name: "n/a" if r is None else f"{r:.2f}" for name, r in ratios.items()}
        lines.append(
            f"forecast / measured: peak memory {shown['peak_bytes']}, seconds per step "
            f"{shown['step_s']}, training joules {shown['train_joules']} (`ecoadapt plan`)"
        )
    return lines


def _leave(code: int) -> None:
    """End a rank of a finished torchrun job: every output is written and the process group
    left, so skip C++ static destructors, where gloo's threads aborted a worker ("terminate
    called without an active exception") or left rank 0 hanging after its peer had gone."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from ecoadapt import config, evaluate

    path = resolve_config(args.config)
    cfg = config.load(path, args.set)
    task = evaluate.run(cfg)
    print(task_line(task))
    e = task["energy"]
    print(f"evaluation: {e['seconds']:.1f} s, {e['joules']:,.0f} J ({e['method']}, {e['meter']})")
    return 0


def task_line(task: dict[str, Any]) -> str:
    """The task's result in one line: scores, and the verdict on the paired gain."""
    if task.get("status") == "failed":
        return f"task failed: {task['error']} (the adaptation's results are kept; retry: {task['retry']})"
    line = f"task {task['metric']} ({task.get('mode', 'finetune')}): base {task['base']:.4f}"
    if task.get("adapted") is None:
        return line
    return f"{line}, adapted {task['adapted']:.4f}; {task['verdict_text']}"


def _cmd_plan(args: argparse.Namespace) -> int:
    import json

    from ecoadapt import config, plan
    from ecoadapt.progress import say

    path = resolve_config(args.config)
    cfg = config.load(path, args.set)
    steps, source = plan.planned_steps(cfg, path.parent if path.exists() else None)
    grid = args.grid or args.memory_gb is not None or args.energy_j is not None  # "which recipes fit"
    rows = plan.run(cfg, steps, args.memory_gb, args.energy_j, grid, args.fresh, say)
    print(
        f"forecast for {steps} steps ({source}) of {cfg.model.name_or_path}, {cfg.data.max_seq_len} tokens x "
        f"{cfg.train.micro_batch_size} x {cfg.train.grad_accum}, from a probe of a few steps per recipe:"
    )
    print(plan.table(rows, args.memory_gb, args.energy_j))
    if args.json:
        from ecoadapt.storage import atomic_write_text

        atomic_write_text(Path(args.json), json.dumps({"steps": steps, "source": source, "recipes": rows}, indent=1))
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from ecoadapt import report, sweep

    spec = sweep.load(args.sweep, args.set)
    results = sweep.run(spec)
    built = report.build(spec.out)
    print(built["table"])
    rec = built["recommendation"]
    print(f"\nrecommendation: {rec['text'] if rec else 'no point completed'}")
    print(f"report: {spec.out / 'report.html'}")
    return 0 if any(r.get("status") != "failed" for r in results) else 1


def _cmd_report(args: argparse.Namespace) -> int:
    from ecoadapt import report

    built = report.build(Path(args.dir), args.tolerance, args.objective, [Path(d) for d in args.more])
    print(built["table"])
    rec = built["recommendation"]
    print(f"\nrecommendation: {rec['text'] if rec else 'no point completed'}")
    print(f"report: {Path(args.dir) / 'report.html'}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    import platform

    from ecoadapt import demo

    built = demo.run(Path(args.out), quick=args.quick)
    print(built["table"])
    rec = built["recommendation"]
    print(f"\nrecommendation: {rec['text'] if rec else 'no point completed'}")
    for note in built["notes"]:
        print(f"- {note}")
    print(f"- {demo.SOURCE.format(version=platform.python_version())}")
    print(f"report: {Path(args.out) / 'report.html'}")
    return 0 if rec else 1


def _cmd_keys(args: argparse.Namespace) -> int:
    if args.summary:
        from ecoadapt.summary import reference

        print(keys_help(reference(), defaults=False))
    else:
        print(keys_help())
    return 0


def _cmd_meters(args: argparse.Namespace) -> int:
    from ecoadapt.measure import meters

    failed = []
    for kind in ("nvml", "rapl"):
        why = meters.probe(kind)
        print(f"{kind}: {'reads (measured)' if why is None else 'cannot read: ' + why}")
        if why is not None and kind in args.need:
            failed.append(kind)
    print("estimate: always available (estimated, never reported as measured)")
    return 1 if failed else 0


def _cmd_presets(args: argparse.Namespace) -> int:
    for name in preset_names():
        print(name)
    return 0


def _add_set(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=what)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (one sub-command per verb)."""
    parser = argparse.ArgumentParser(
        prog="ecoadapt",
        description="Adapt a pretrained language model to a new domain, and measure what it costs.",
    )
    parser.add_argument("--version", action="version", version=f"ecoadapt {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True)

    adapt = sub.add_parser(
        "adapt",
        help="continued pre-training of a model on a domain corpus",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config keys (YAML sections; override any with --set section.key=value):\n" + keys_help(),
    )
    adapt.add_argument("config", help="a YAML config file, or the name of a shipped preset")
    _add_set(adapt, "override a config key")
    adapt.add_argument(
        "--resume",
        action="store_true",
        help="resume from the checkpoint in output.dir (an interrupted run with the same config resumes anyway)",
    )
    adapt.set_defaults(func=_cmd_adapt)

    evaluate = sub.add_parser(
        "evaluate", help="downstream fine-tune and test of the base and of the adapted model, same seeds"
    )
    evaluate.add_argument("config", help="the adapt config (its output.dir holds the adapted model)")
    _add_set(evaluate, "override a config key")
    evaluate.set_defaults(func=_cmd_evaluate)

    plan_cmd = sub.add_parser(
        "plan", help="forecast peak memory, time and energy of a recipe before training; which recipes fit"
    )
    plan_cmd.add_argument("config", help="a YAML config file, or the name of a shipped preset")
    _add_set(plan_cmd, "override a config key")
    plan_cmd.add_argument(
        "--memory-gb", type=float, default=None, help="memory limit (GiB): forecast the grid, mark what fits"
    )
    plan_cmd.add_argument(
        "--energy-j", type=float, default=None, help="energy budget (J): forecast the grid, mark what fits"
    )
    plan_cmd.add_argument(
        "--grid", action="store_true", help="forecast precision x LoRA x checkpointing, not only the config's recipe"
    )
    plan_cmd.add_argument("--fresh", action="store_true", help="probe again rather than read cached probes")
    plan_cmd.add_argument("--json", default=None, help="also write the forecast to this JSON file")
    plan_cmd.set_defaults(func=_cmd_plan)

    sweep = sub.add_parser("sweep", help="run a grid of adapt configurations, one process each, resumable")
    sweep.add_argument("sweep", help="a sweep YAML (base + grid and/or points)")
    _add_set(sweep, "override a key of the base config (so of every point)")
    sweep.set_defaults(func=_cmd_sweep)

    rep = sub.add_parser("report", help="report.md, report.html, results.csv and plots for a sweep or a run")
    rep.add_argument("dir", help="a sweep or run directory (the report goes there)")
    rep.add_argument(
        "more", nargs="*", help="more sweep or run directories (Trainer runs too) to put in the same table"
    )
    rep.add_argument("--tolerance", type=float, default=None, help="metric distance from the best still accepted")
    rep.add_argument("--objective", choices=["energy", "time", "memory"], default=None, help="what to minimise")
    rep.set_defaults(func=_cmd_report)

    demo = sub.add_parser("demo", help="the whole job on the embedded default: a short sweep and its report")
    demo.add_argument("--out", default="runs/demo", help="where the demo's runs and report go")
    demo.add_argument("--quick", action="store_true", help="three recipes, smaller budget (about 2 minutes)")
    demo.set_defaults(func=_cmd_demo)

    keys = sub.add_parser("keys", help="list every config key with its default and help")
    keys.add_argument("--summary", action="store_true", help="list the fields of summary.json instead")
    keys.set_defaults(func=_cmd_keys)
    sub.add_parser("presets", help="list the shipped presets").set_defaults(func=_cmd_presets)
    meters = sub.add_parser("meters", help="which energy meters can read on this machine (built and read, not assumed)")
    meters.add_argument("--need", nargs="*", default=[], choices=["nvml", "rapl"], help="exit 1 unless these read")
    meters.set_defaults(func=_cmd_meters)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `ecoadapt` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    # Deprecation notices inside transformers are for its callers' developers, not our users.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\.")
    try:
        return int(args.func(args))
    except UserError as e:
        if args.debug:
            raise
        rank = (
            f" [rank {os.environ['RANK']}]" if "RANK" in os.environ and os.environ.get("WORLD_SIZE", "1") != "1" else ""
        )
        print(f"ecoadapt{rank}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ecoadapt: interrupted", file=sys.stderr)
        return 130
