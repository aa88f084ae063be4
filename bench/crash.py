"""Faults at random moments of every phase, the same command rerun, and nothing lost.

A tiny fp32 CPU run (tokenizing Python's docstrings, training with checkpoints, saving, a task
of two seeds), a 2-point sweep of it (and its report), and ``ecoadapt demo --quick`` (MiniLM,
three recipes, the probe, the report; with ``--demos``) are each run once uninterrupted, for the
reference. Then each trial starts the same command afresh (a fresh cache) and injects one fault:

- ``SIGKILL`` (to the whole process group, as the OOM killer or a dead node), ``SIGTERM`` (to
  the main process, as ``kill`` or a scheduler sends it) or ``SIGHUP`` (to the group, as a closed
  terminal sends it), in a phase drawn uniformly from the command's phases (a run's loading,
  evaluating, training, saving and task; each sweep or demo point's, and the report), at a
  moment drawn within the first second of it (a moment drawn over the whole duration struck
  loading nine times in ten: loading and tokenizing take most of a tiny run's time);
- a full disk: ``RLIMIT_FSIZE`` (SIGXFSZ ignored, so writes fail with EFBIG as on a full disk)
  at a size drawn between 1 KiB and the largest file the reference wrote, so that it strikes
  the token store, a checkpoint, the export or the summary;
- two copies of the command started at once on the same folder;
- a symbolic link planted where the run's lock goes, pointing at a user's file.

After each, the same command is rerun until it exits 0 (three times at most). A trial fails on
a traceback or a multi-line error, a hang (no exit within 15 minutes), a process of the trial
left alive, a user's file (beside the output, or added inside it after the fault) gone or
changed, or final results that differ from the reference (held-out loss, steps, every task
score seed by seed). The phase each fault landed in is read from what the folder held then.

    python bench/crash.py --jobs 2   # 220 faults; results in bench/results/crash.json

Energy and times are not compared: a resumed run measures its own.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

from random_llama import build  # noqa: E402

USER_FILES = {"thesis.tex": "\\documentclass{article}\n", "data/raw.csv": "a,b\n1,2\n"}
# A user's file added inside the output folder once ecoadapt has made it (a folder with no
# record of what ecoadapt wrote is refused whole, so it cannot be there before).
INSIDE = {"run": "run/notes.md", "sweep": "sweep/notes.md", "demo": "demo/notes.md"}
FOLDER = {"run": "run", "sweep": "sweep", "demo": "demo"}  # each kind's output folder in its trial
SIGNALS = {"SIGKILL": signal.SIGKILL, "SIGTERM": signal.SIGTERM, "SIGHUP": signal.SIGHUP}
HANG_S = 900
ORPHAN_WAIT_S = 15.0  # how long a faulted command's descendants may take to exit after it


def base_config(model: Path, out: Path) -> dict[str, Any]:
    return {
        "model": {"name_or_path": str(model)},
        "data": {"train": ["builtin:python-docstrings"], "max_seq_len": 64, "eval_max_blocks": 16},
        "train": {"max_steps": 8, "micro_batch_size": 8, "lr": 1e-3, "save_every": 3, "log_every": 2},
        "task": {
            "train": ["builtin:python-docstring-topics"],
            "max_train_examples": 120,
            "max_test_examples": 60,
            "max_seq_len": 32,
            "epochs": 1,
            "seeds": [0, 1],
        },
        "measure": {"energy": "estimate", "forecast": False},
        "output": {"dir": str(out), "save_model": True},
    }


def start(args: list[str], cache: Path, file_limit: int | None = None) -> subprocess.Popen[str]:
    env = {**os.environ, "ECOADAPT_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "ecoadapt", *args]

    def limit() -> None:  # in the child: writes past the limit fail with EFBIG, as on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        if file_limit is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, file_limit))

    return subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        preexec_fn=limit,
    )


def bad_output(out: str, code: int) -> str:
    """Why a command's output breaks the rules (a traceback, an error of more than one line), or ""."""
    if "Traceback" in out:
        return f"a traceback: {out[-1500:]}"
    errors = [line for line in out.splitlines() if line.startswith("ecoadapt") and "error" in line]
    if code == 2 and len(errors) != 1:
        return f"exit 2 with {len(errors)} error lines: {out[-1500:]}"
    return ""


def phase_of(run: Path) -> str:
    """Which phase a run folder shows, from what it holds."""
    if (run / "summary.json").is_file() and json.loads((run / "summary.json").read_text()).get("status") == "completed":
        return "finished"
    if (run / "phases.json").is_file():
        return "task"
    if (run / ".model.tmp").exists() or (run / ".adapter.tmp").exists():
        return "saving"
    if (run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").stat().st_size:
        return "training"
    if (run / "config.yaml").is_file():
        return "evaluating before training"
    return "loading and tokenizing"


def sweep_phase(sweep: Path, total: int) -> str:
    """Which phase a sweep (or demo) folder of ``total`` points shows, from what it holds."""
    if (sweep / "report.md").is_file():
        return "report written"
    points = [p for p in (sweep / "points").glob("*") if p.is_dir()] if (sweep / "points").is_dir() else []
    done = (
        len([line for line in (sweep / "results.jsonl").read_text().splitlines()])
        if (sweep / "results.jsonl").is_file()
        else 0
    )
    if not points:
        return f"{sweep.name}: loading and tokenizing"
    if done >= total:
        return f"{sweep.name}: report"
    # The point being run is the folder written to last (points run in the sweep's order, not
    # their names').
    latest = max(points, key=lambda p: p.stat().st_mtime_ns)
    return f"{sweep.name} point {len(points)}: {phase_of(latest)}"


RUN_PHASES = ("loading and tokenizing", "evaluating before training", "training", "saving", "task")


def phases_of(kind: str, points: int) -> list[str]:
    """Every phase a command goes through, in order, as ``where`` names them."""
    if kind == "run":
        return [*RUN_PHASES, "finished"]
    folder = FOLDER[kind]
    each = [f"{folder} point {i}: {phase}" for i in range(1, points + 1) for phase in (*RUN_PHASES, "finished")]
    return [f"{folder}: loading and tokenizing", *each, f"{folder}: report", "report written"]


def reached(phase: str, target: str, order: list[str]) -> bool:
    """Whether the command has reached ``target`` (or gone past it) when it shows ``phase``."""
    if phase not in order:  # a phase the folder shows in no known way: do not wait on it
        return True
    return order.index(phase) >= order.index(target)


def finish(args: list[str], cache: Path) -> tuple[bool, str]:
    """Rerun until it exits 0 (three times at most); (ok, why not)."""
    out, code = "", 0
    for attempt in range(3):
        proc = start(args, cache)
        try:
            out, _ = proc.communicate(timeout=HANG_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            return False, f"rerun {attempt + 1} hung"
        code = proc.returncode
        why = bad_output(out, code)
        if why:
            return False, f"rerun {attempt + 1}: {why}"
        if code == 0:
            return True, ""
    return False, f"rerun exited {code}: {out[-1500:]}"


def _running(proc: Any, psutil: Any) -> bool:
    try:
        return bool(proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


def left_alive(project: Path) -> list[int]:
    """Processes still running whose command line names the trial's folder."""
    import psutil

    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and str(project) in " ".join(proc.info["cmdline"] or []):
                found.append(proc.pid)
        except psutil.Error:
            continue
    return found


def results_of_run(run: Path) -> dict[str, Any]:
    s = json.loads((run / "summary.json").read_text())
    return {
        "status": s["status"],
        "steps": s["steps"],
        "eval_loss": round(s["eval"]["loss"], 6),
        "task": [
            (r["seed"], round(r["base"]["macro_f1"], 6), round(r["adapted"]["macro_f1"], 6))
            for r in s["task"]["per_seed"]
        ],
    }


def results_of_sweep(sweep: Path) -> dict[str, Any]:
    latest = {}
    for line in (sweep / "results.jsonl").read_text().splitlines():
        r = json.loads(line)
        latest[r["name"]] = r
    return {
        name: {
            "status": r["status"],
            "eval_loss": round(r["eval"]["loss"], 6),
            "adapted": round(r["task"]["adapted"], 6),
        }
        for name, r in sorted(latest.items())
    }


def results_of(kind: str, project: Path) -> dict[str, Any]:
    """What must equal the reference: a run's summary, or a sweep's (or the demo's) points."""
    return results_of_run(project / "run") if kind == "run" else results_of_sweep(project / FOLDER[kind])


def user_files_intact(project: Path, files: dict[str, str]) -> bool:
    return all((project / n).is_file() and (project / n).read_text() == text for n, text in files.items())


def write_user_files(project: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_text(text)


def add_inside(project: Path, kind: str, files: dict[str, str]) -> None:
    """A user's note inside the output folder, where ecoadapt has made it and recorded its files."""
    inside = project / INSIDE[kind]
    if (inside.parent / ".ecoadapt-manifest.json").is_file():
        inside.write_text("my notes on this run\n")
        files[INSIDE[kind]] = "my notes on this run\n"


def trial(kind: str, fault: str, model: Path, work: Path, reference: Reference, rng: random.Random) -> dict[str, Any]:
    project = Path(tempfile.mkdtemp(dir=work, prefix=f"{kind}-{fault}-"))
    files = dict(USER_FILES)
    write_user_files(project, files)
    cache = project / "cache"
    args = command(kind, model, project)
    phase, detail, why = inject(fault, kind, args, project, cache, reference, rng, files)
    ok = not why
    if ok:
        ok, why = finish(args, cache)
    if ok and not user_files_intact(project, files):
        ok, why = False, "a user's file is gone or changed"
    if ok and (alive := left_alive(project)):
        ok, why = False, f"processes left: {alive}"
    if ok:
        got = results_of(kind, project)
        if got != reference.results:
            ok, why = False, f"results differ: {got} vs {reference.results}"
    shutil.rmtree(project, ignore_errors=True)
    return {"kind": kind, "fault": fault, **detail, "phase": phase, "ok": ok, "why": why}


def inject(
    fault: str,
    kind: str,
    args: list[str],
    project: Path,
    cache: Path,
    reference: Reference,
    rng: random.Random,
    files: dict[str, str],
) -> tuple[str, dict[str, Any], str]:
    """Run the command with one fault; (the phase it struck, what was drawn, why it broke a rule or "")."""

    def where() -> str:
        try:
            return phase_of(project / "run") if kind == "run" else sweep_phase(project / FOLDER[kind], reference.points)
        except (OSError, ValueError):  # a file being replaced as it was read: look again
            return "unreadable for a moment"

    if fault in SIGNALS:
        order = phases_of(kind, reference.points)
        target = rng.choice([p for p in order if not p.endswith(("finished", "report written"))])
        delay = rng.uniform(0.0, 1.0)
        proc = start(args, cache)
        t0 = time.monotonic()
        # Wait for the phase drawn (or a later one, when the drawn one was too short to see), then
        # the moment drawn within it; a command taking 4x its reference fires anyway.
        patience = 4 * reference.seconds
        while proc.poll() is None and not reached(where(), target, order) and time.monotonic() - t0 < patience:
            time.sleep(0.05)
        time.sleep(delay)
        phase = where()
        if proc.poll() is not None:
            phase = "finished before the fault"
        tree = tree_of(proc)  # its workers too: their command lines do not name the folder
        if proc.poll() is None and fault == "SIGTERM":
            proc.send_signal(signal.SIGTERM)  # to the main process alone, as `kill PID`
        elif proc.poll() is None:
            os.killpg(proc.pid, SIGNALS[fault])  # the group: the OOM killer's SIGKILL, a terminal's SIGHUP
        detail = {"target": target, "after_s": round(time.monotonic() - t0, 2)}
        return phase, detail, _ended(proc, project, kind, files, tree)
    if fault == "disk-full":
        size = int(math.exp(rng.uniform(math.log(1024), math.log(reference.largest_file))))
        proc = start(args, cache, file_limit=size)
        why = _ended(proc, project, kind, files)
        return f"a file past {size:,} bytes", {"file_limit": size}, why
    if fault == "two-at-once":
        procs = [start(args, cache), start(args, cache)]
        why = _all_ended(procs, project, kind, files)
        return "started together", {"exits": [p.returncode for p in procs]}, why
    if fault == "symlinked-lock":
        victim = project / "thesis.tex"
        folder = project / FOLDER[kind]
        folder.mkdir()
        (folder / ".ecoadapt-run.lock").symlink_to(victim)
        proc = start(args, cache)
        why = _ended(proc, project, kind, files)
        if not why and proc.returncode != 2:
            why = f"a planted symlink was not refused (exit {proc.returncode})"
        (folder / ".ecoadapt-run.lock").unlink()
        return "before the start", {}, why
    raise SystemExit(f"unknown fault {fault}")


def tree_of(proc: subprocess.Popen[str]) -> list[Any]:
    """The command's process and every descendant, now."""
    import psutil

    try:
        root = psutil.Process(proc.pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def _ended(
    proc: subprocess.Popen[str], project: Path, kind: str, files: dict[str, str], tree: list[Any] | None = None
) -> str:
    """Wait for the faulted command; why its end broke a rule, or ""."""
    return _all_ended([proc], project, kind, files, tree)


def _all_ended(
    procs: list[subprocess.Popen[str]],
    project: Path,
    kind: str,
    files: dict[str, str],
    tree: list[Any] | None = None,
) -> str:
    """Wait for every faulted command; why their ends broke a rule, or ""."""
    import psutil

    outs = []
    for proc in procs:
        try:
            outs.append(proc.communicate(timeout=HANG_S)[0])
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return "hung after the fault"
    for proc in procs:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, 0)  # the group still has a member: give it a moment, then look
            time.sleep(2.0)
    # A sweep's point runs in a group of its own and goes on SIGTERM when the sweep dies: give
    # its exit (and its workers') up to ORPHAN_WAIT_S before calling anything an orphan.
    mine = {q.pid for q in procs}
    deadline = time.monotonic() + ORPHAN_WAIT_S
    while time.monotonic() < deadline and any(p.pid not in mine and _running(p, psutil) for p in tree or []):
        time.sleep(0.2)
    orphans = [p.pid for p in tree or [] if p.pid not in mine and _running(p, psutil)]
    if alive := left_alive(project) + orphans:
        return f"processes outlived the faulted command: {alive}"
    add_inside(project, kind, files)
    for proc, out in zip(procs, outs, strict=True):
        why = "" if proc.returncode == -signal.SIGKILL else bad_output(out, proc.returncode)
        if why:
            return why
    return ""


def command(kind: str, model: Path, project: Path) -> list[str]:
    if kind == "demo":
        return ["demo", "--quick", "--out", str(project / "demo")]
    if kind == "run":
        config = project / "run.yaml"
        config.write_text(yaml.safe_dump(base_config(model, project / "run")))
        return ["adapt", str(config)]
    base = base_config(model, project / "unused")
    spec = {
        "base": base,
        "points": [{"name": "lora", "set": {"lora.enabled": True}}],
        "output": {"dir": str(project / "sweep")},
    }
    config = project / "sweep.yaml"
    config.write_text(yaml.safe_dump(spec))
    return ["sweep", str(config)]


@dataclass
class Reference:
    """An uninterrupted command's results, duration (s) and largest file written (bytes)."""

    results: dict[str, Any]
    seconds: float
    largest_file: int
    points: int = 1
    """How many points (a sweep's or the demo's); 1 for a run."""


def reference_of(kind: str, model: Path, work: Path) -> Reference:
    project = Path(tempfile.mkdtemp(dir=work, prefix=f"reference-{kind}-"))
    write_user_files(project, USER_FILES)
    args = command(kind, model, project)
    t0 = time.perf_counter()
    proc = start(args, project / "cache")
    out, _ = proc.communicate(timeout=HANG_S)
    if proc.returncode != 0:
        raise SystemExit(f"the uninterrupted {kind} failed: {out[-2000:]}")
    seconds = time.perf_counter() - t0
    got = results_of(kind, project)
    largest = max(f.stat().st_size for f in project.rglob("*") if f.is_file() and not f.is_symlink())
    return Reference(got, seconds, largest, points=1 if kind == "run" else len(got))


SPECIAL = ("disk-full", "two-at-once", "symlinked-lock")


def plan(runs: int, sweeps: int, special: int, rng: random.Random, demos: int = 0) -> list[tuple[str, str]]:
    """(kind, fault) of every trial: signals drawn for the run, sweep and demo trials, the special
    faults in turn (a quarter of them on a sweep), in a shuffled order."""
    trials = [("run", rng.choice(list(SIGNALS))) for _ in range(runs)]
    trials += [("sweep", rng.choice(list(SIGNALS))) for _ in range(sweeps)]
    trials += [("demo", rng.choice(list(SIGNALS))) for _ in range(demos)]
    trials += [("sweep" if i % 4 == 3 else "run", SPECIAL[i % len(SPECIAL)]) for i in range(special)]
    rng.shuffle(trials)  # kinds interleaved: a harness cut short still has some of each
    return trials


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=110)
    parser.add_argument("--sweeps", type=int, default=30)
    parser.add_argument("--special", type=int, default=60)
    parser.add_argument("--demos", type=int, default=20, help="signals to `demo --quick` (about 2 minutes each)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=1, help="trials at once (each its own folder and cache)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "crash.json")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    started = time.perf_counter()
    trials: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="ecoadapt-crash-") as tmp:
        work = Path(tmp)
        model = build(work / "model", layers=2, hidden=72, intermediate=192, vocab=512, tokenizer_vocab=512)
        todo = plan(args.runs, args.sweeps, args.special, rng, args.demos)
        references = {kind: reference_of(kind, model, work) for kind in sorted({k for k, _ in todo})}
        for kind, ref in references.items():
            print(f"{kind}: uninterrupted in {ref.seconds:.1f} s: {ref.results}", flush=True)
        # Each trial draws from its own generator: the same seed gives the same faults, however
        # the --jobs trials interleave.
        seeds = [rng.randrange(2**32) for _ in todo]

        def one(i: int) -> dict[str, Any]:
            kind, fault = todo[i]
            return trial(kind, fault, model, work, references[kind], random.Random(seeds[i]))

        with ThreadPoolExecutor(args.jobs) as pool:
            for done, t in enumerate(pool.map(one, range(len(todo))), 1):
                trials.append(t)
                verdict = "ok" if t["ok"] else "FAILED " + t["why"]
                print(f"{done}/{len(todo)} {t['kind']} {t['fault']} ({t['phase']}): {verdict}", flush=True)
                write(args.out, trials, time.perf_counter() - started)  # kept as it goes: a long run can be cut
    failures = write(args.out, trials, time.perf_counter() - started)
    print(f"{len(trials)} faults, {failures} failures in {time.perf_counter() - started:.0f} s")
    raise SystemExit(1 if failures else 0)


def write(out: Path, trials: list[dict[str, Any]], seconds: float) -> int:
    """bench/results/crash.json: the counts by fault and phase, and every trial; returns the failures."""
    failures = [t for t in trials if not t["ok"]]
    result = {
        "faults": len(trials),
        "failures": len(failures),
        "seconds": round(seconds),
        "by_fault": dict(Counter(f"{t['kind']} {t['fault']}" for t in trials)),
        "by_phase": dict(Counter(t["phase"] for t in trials)),
        "trials": trials,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    return len(failures)


if __name__ == "__main__":
    main()
