"""The `ecoadapt` command: parse, call, print. No logic lives here."""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any

from ecoadapt import __version__, api
from ecoadapt.config import all_keys
from ecoadapt.config.measure import MEASURED_METERS
from ecoadapt.config.presets import preset_names
from ecoadapt.core.errors import AlreadySaid, Interrupted, UserError, disk_full, disk_full_message
from ecoadapt.results.judged import HarnessResult, TaskResult
from ecoadapt.results.summary import FINISHED


def keys_help(rows: list[tuple[str, str, Any, str]] | None = None, defaults: bool = True) -> str:
    """Keys with their type, default and help, generated from a schema (the config's by default)."""
    lines = []
    for key, type_name, default, doc in rows if rows is not None else all_keys():
        lines.append(f"  {key}  ({type_name}" + (f", default {default!r})" if defaults else ")"))
        lines.extend(textwrap.wrap(doc, 92, initial_indent="      ", subsequent_indent="      "))
    return "\n".join(lines)


def keys_markdown(rows: list[tuple[str, str, Any, str]], title: str, intro: str, defaults: bool = True) -> str:
    """The same keys as a Markdown page, one table per section (docs/configuration.md and
    docs/summary.md are this output, checked by a test so that they cannot drift)."""
    out = [f"# {title}", "", intro]
    section = None
    for key, type_name, default, doc in rows:
        if type_name == "section":
            continue
        prefix = key.split(".")[0] if "." in key else "(top level)"
        if prefix != section:
            section = prefix
            out += ["", f"## {prefix}", ""]
            out += (
                ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
                if defaults
                else [
                    "| field | type | meaning |",
                    "| --- | --- | --- |",
                ]
            )
        cells = [f"`{key}`", f"`{type_name}`", *([f"`{default!r}`"] if defaults else []), " ".join(doc.split())]
        out.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(out) + "\n"


CONFIG_PAGE = (
    "Configuration",
    "Every key of a run's config, generated from the config dataclasses' docstrings "
    "(`ecoadapt keys --markdown`; the same as `ecoadapt keys` and `ecoadapt adapt --help`). "
    "Override any with `--set section.key=value` (values are read as YAML).",
)
SUMMARY_PAGE = (
    "summary.json",
    "Every field of a run's `summary.json`, generated from `RunSummary`'s docstrings "
    "(`ecoadapt keys --summary --markdown`). Every figure says whether it is measured or estimated.",
)


JUDGE_WINDOWS = ("task", "harness")  # the energy windows of judging the adapted model


def _cmd_adapt(args: argparse.Namespace) -> int:
    try:
        summary = api.adapt(args.config, args.set, resume=args.resume, paths_from=args.paths_from)
    except api.JobFailed as e:  # its ranks printed why
        return e.exit_code
    from ecoadapt.model import parallel  # imports torch: only after adapt has decided how to (heap.py)

    code = summary.exit_status
    if summary.status != "interrupted" and summary.rank == 0:
        _print_run(summary, summary.config["output"]["dir"])
    if parallel.under_torchrun() and code in (0, 1):
        parallel.end_rank(code)
    return code


def _print_run(summary: Any, run_dir: str) -> None:
    ev = summary.eval
    print(
        f"{summary.status}: {summary.steps} steps, {summary.tokens:,} tokens in {summary.time_s:.1f} s "
        f"({summary.tokens_per_s:,.0f} tok/s, measured); held-out loss {ev.loss_before:.4f} -> {ev.loss:.4f}"
    )
    if ev.general is not None:
        print(general_line(ev.general))
    if summary.task is not None:
        print(task_line(summary.task))
    if summary.harness is not None:
        for line in harness_lines(summary.harness):
            print(line)
    if summary.mfu is not None:
        f = summary.flops
        print(f"MFU: {summary.mfu:.1%} of a {f['peak_flops_per_s'] / 1e9:,.0f} GFLOP/s peak ({f['peak_source']})")
    if summary.energy is not None:
        e = summary.energy
        per_token = f", {e['mj_per_token']:.2f} mJ per training token" if e.get("mj_per_token") else ""
        judging = sum((e.get("phases") or {}).get(w, {}).get("joules", 0.0) for w in JUDGE_WINDOWS)
        judged = f", {judging:,.0f} J judging ({judging / e['joules']:.0%} of all)" if judging and e["joules"] else ""
        print(
            f"energy: {e['joules']:,.0f} J in all, {e['train_joules']:,.0f} J training{per_token}{judged} "
            f"({e['method']}, {e['meter']})"
        )
    o = (summary.energy or {}).get("overhead")
    if o and o["windows"]:
        parts = ", ".join(name.replace("_", " ") for name in o["windows"])
        print(f"overhead (ecoadapt's own: {parts}): {o['joules']:,.0f} J, {o['share']:.1%} of the run's energy")
    mem = summary.memory
    if mem and mem.get("train_peak_bytes") is not None:
        print(
            f"peak memory ({mem['device']}, measured): training {mem['train_peak_bytes'] / 2**20:,.0f} MiB, "
            f"evaluation {mem.get('eval_peak_bytes', 0) / 2**20:,.0f} MiB"
            + (f", loading {mem['load_peak_bytes'] / 2**20:,.0f} MiB" if mem.get("load_peak_bytes") else "")
        )
    for line in [*_choice_lines(summary), *_compile_and_forecast_lines(summary)]:
        print(line)
    print(f"run directory: {run_dir}")


def _choice_lines(summary: Any) -> list[str]:
    """What the run chose for itself (precision and micro-batch auto) and whether it reached a target."""
    lines = []
    auto = (summary.precision or {}).get("auto")
    if auto:
        lines.append(f"precision auto: {auto['mode']} ({auto['why']})")
    b = summary.batch
    if b and summary.config.get("train", {}).get("fill_micro_batch"):  # micro_batch_size: auto
        lines.append(f"micro-batch: {b['how']}; {b['tokens_per_step']:,} tokens per step")
    t = summary.target
    if t:
        got = f"reached at step {t['step']}, {t['train_joules'] or 0:,.0f} J" if t["reached"] else "not reached"
        lines.append(f"target held-out loss {t['loss']:.4f}: {got}")
    return lines


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


def _cmd_evaluate(args: argparse.Namespace) -> int:
    found = api.evaluate(args.config, args.set)
    if found.task is not None:
        print(task_line(found.task))
    if found.harness is not None:
        for line in harness_lines(found.harness):
            print(line)
    for judged in found.each():
        e = judged.energy or {}
        if e:
            print(f"evaluation: {e['seconds']:.1f} s, {e['joules']:,.0f} J ({e['method']}, {e['meter']})")
    return 0


def harness_lines(harness: HarnessResult) -> list[str]:
    """The harness's result, a line per task: each model's metric with its standard error, and
    the verdict on the difference paired by item."""
    if harness.failed:
        return [f"harness failed: {harness.error} (the adaptation's results are kept; retry: {harness.retry})"]

    def score(value: float | None, stderr: float | None) -> str:
        if value is None:
            return "-"
        return f"{value:.4f}" + (f" (s.e. {stderr:.4f})" if stderr is not None else "")

    lines = []
    for t in harness.tasks:
        line = f"harness {t.name} {t.metric} ({harness.fewshot}-shot): base {score(t.base, t.base_stderr)}"
        if t.adapted is not None:
            line += f", adapted {score(t.adapted, t.adapted_stderr)}; {t.verdict_text or 'not paired'}"
        lines.append(line)
    return lines


def general_line(general: Any) -> str:
    """The general text's loss before and after, and the verdict on forgetting."""
    return f"general-text loss {general.loss_before:.4f} -> {general.loss:.4f}: {general.verdict_text}"


def task_line(task: TaskResult) -> str:
    """The task's result in one line: scores, and the verdict on the paired gain."""
    if task.failed:
        return f"task failed: {task.error} (the adaptation's results are kept; retry: {task.retry})"
    line = f"task {task.metric} ({task.mode or 'finetune'}): base {task.base:.4f}"
    if task.adapted is None:
        return line
    return f"{line}, adapted {task.adapted:.4f}; {task.verdict_text}"


def _cmd_plan(args: argparse.Namespace) -> int:
    import json

    plan = api.plan(args.config, args.set, args.memory_gb, args.energy_j, args.grid, args.fresh, args.device, args.mfu)
    cfg = plan.config
    what = f"projection onto {args.device}" if args.device else "forecast"
    print(
        f"{what} for {plan.steps} steps ({plan.source}) of {cfg.model.name_or_path}, {cfg.data.max_seq_len} tokens "
        f"x {cfg.train.micro_batch_size} x {cfg.train.grad_accum}:"
    )
    print(plan.table)
    if args.json:
        from ecoadapt.core.storage import atomic_write_text

        document = {"steps": plan.steps, "source": plan.source, "recipes": plan.recipes}
        atomic_write_text(Path(args.json), json.dumps(document, indent=1))
    return 0


def _print_report(report: api.Report) -> None:
    print(report.table)
    print(f"\nrecommendation: {report.recommendation_text}")


def _cmd_sweep(args: argparse.Namespace) -> int:
    result = api.sweep(args.sweep, args.set)
    _print_report(result.report)
    print(f"report: {result.report.folder / 'report.html'}")
    if not result.all_finished:
        unfinished = [str(r.get("name")) for r in result.results if r.get("status") not in FINISHED]
        print(
            f"ecoadapt: not every point finished ({', '.join(unfinished)}); rerun the sweep to retry them",
            file=sys.stderr,
        )
    return 0 if result.all_finished else 1


def _cmd_report(args: argparse.Namespace) -> int:
    report = api.report(args.dir, args.more, args.tolerance, args.objective)
    _print_report(report)
    print(f"report: {report.folder / 'report.html'}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    import platform

    from ecoadapt.commands import demo

    report = api.demo(args.out, quick=args.quick)
    _print_report(report)
    for note in report.notes:
        print(f"- {note}")
    print(f"- {demo.SOURCE.format(version=platform.python_version())}")
    print(f"report: {report.folder / 'report.html'}")
    return 0 if report.recommendation else 1


def _cmd_adopt(args: argparse.Namespace) -> int:
    from ecoadapt.commands.adopt import adopt

    for folder in adopt(Path(args.dir).expanduser()):
        print(f"adopted {folder}: its files are now on ecoadapt's record (it may replace them on overwrite)")
    return 0


def _cmd_keys(args: argparse.Namespace) -> int:
    if args.summary:
        from ecoadapt.results.summary import reference

        rows = reference()
        text = keys_markdown(rows, *SUMMARY_PAGE, defaults=False) if args.markdown else keys_help(rows, defaults=False)
    else:
        text = keys_markdown(all_keys(), *CONFIG_PAGE) if args.markdown else keys_help()
    print(text, end="" if args.markdown else "\n")  # a page ends with its own newline
    return 0


def _cmd_meters(args: argparse.Namespace) -> int:
    from ecoadapt.measure import meters

    failed = []
    for kind in MEASURED_METERS:
        why = meters.check(kind)
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
    _add_run_commands(sub)
    _add_result_commands(sub)
    _add_info_commands(sub)
    return parser


def _add_run_commands(sub: Any) -> None:
    """adapt, evaluate and plan: the verbs that take one run's config."""
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
    adapt.add_argument(
        "--paths-from",
        default=None,
        metavar="DIR",
        help="look relative corpus paths up in DIR first (default: the config file's folder)",
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
    plan_cmd.add_argument(
        "--device",
        default=None,
        help="project onto a GPU you do not have (T4, A10, L4, A100-40GB, A100-80GB, H100, H200) or onto a CPU "
        "machine's memory (cpu-16gb, cpu-24gb, cpu-32gb: any cpu-<N>gb)",
    )
    plan_cmd.add_argument("--mfu", type=float, default=None, help="with --device: the MFU to assume (default 0.3)")
    plan_cmd.add_argument("--json", default=None, help="also write the forecast to this JSON file")
    plan_cmd.set_defaults(func=_cmd_plan)


def _add_result_commands(sub: Any) -> None:
    """sweep, report and demo: the verbs that end in a report."""
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


def _add_info_commands(sub: Any) -> None:
    """keys, presets and meters: what the tool knows, and what this machine can measure."""
    adopt = sub.add_parser(
        "adopt", help="take over a run or sweep folder an older ecoadapt wrote (it kept no record of its files)"
    )
    adopt.add_argument("dir", help="the run or sweep folder")
    adopt.set_defaults(func=_cmd_adopt)

    keys = sub.add_parser("keys", help="list every config key with its default and help")
    keys.add_argument("--summary", action="store_true", help="list the fields of summary.json instead")
    keys.add_argument("--markdown", action="store_true", help="as a Markdown page (docs/configuration.md)")
    keys.set_defaults(func=_cmd_keys)
    sub.add_parser("presets", help="list the shipped presets").set_defaults(func=_cmd_presets)
    meters = sub.add_parser("meters", help="which energy meters can read on this machine (built and read, not assumed)")
    meters.add_argument("--need", nargs="*", default=[], choices=MEASURED_METERS, help="exit 1 unless these read")
    meters.set_defaults(func=_cmd_meters)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `ecoadapt` console script; returns the exit status."""
    from ecoadapt.core.processes import follow_parent

    follow_parent()  # started by a sweep (or a benchmark): go when it goes
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
    except Interrupted as e:
        print(f"ecoadapt: {e}", file=sys.stderr)
        return e.exit_status
    except AlreadySaid as e:
        return e.exit_status
    except KeyboardInterrupt:
        print("ecoadapt: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a full disk anywhere is one line, as bad input is; anything else is a bug
        where = disk_full(e)
        if where is None or args.debug:
            raise
        print(f"ecoadapt: error: {disk_full_message(where)}", file=sys.stderr)
        return 2
