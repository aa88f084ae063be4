"""Kill -9 at random moments of every phase, rerun the same command, and check nothing was lost.

A tiny fp32 CPU run (tokenizing Python's docstrings, training with checkpoints, saving, a task
of three seeds) and a 2-point sweep of it (and its report) are each run once uninterrupted, for
the reference. Then, for each trial, the same command starts afresh (a fresh cache), is killed
with SIGKILL (the whole process group) at a moment drawn uniformly over the reference's
duration, and is rerun until it exits 0. A trial fails when a rerun prints a traceback or
exits non-zero twice, when anything of the user's beside or inside the output is gone, or when
the final results differ from the reference (held-out loss, steps, every task score seed by
seed). The phase each kill landed in is read from what the run folder held at that moment.

    python bench/crash.py --runs 35 --sweeps 15        # 50 kills; results in bench/results/crash.json

Energy and times are not compared: a resumed run measures its own.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

from random_llama import build  # noqa: E402

USER_FILES = {"thesis.tex": "\\documentclass{article}\n", "data/raw.csv": "a,b\n1,2\n"}
SWEEP_USER_FILES = {"sweep/notes.md": "my notes\n"}  # a user's file inside the sweep's own folder


def base_config(model: Path, out: Path) -> dict[str, Any]:
    return {
        "model": {"name_or_path": str(model)},
        "data": {"train": ["builtin:python-docstrings"], "max_seq_len": 64, "eval_max_blocks": 16},
        "train": {"max_steps": 12, "micro_batch_size": 8, "lr": 1e-3, "save_every": 4, "log_every": 2},
        "task": {
            "train": ["builtin:python-docstring-topics"],
            "max_train_examples": 160,
            "max_test_examples": 80,
            "max_seq_len": 32,
            "epochs": 1,
            "seeds": [0, 1, 2],
        },
        "measure": {"energy": "estimate", "forecast": False},
        "output": {"dir": str(out), "save_model": True},
    }


def start(args: list[str], cache: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "ECOADAPT_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "ecoadapt", *args]
    return subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


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


def sweep_phase(sweep: Path) -> str:
    if (sweep / "report.md").is_file():
        return "report written"
    points = sorted((sweep / "points").glob("*")) if (sweep / "points").is_dir() else []
    done = (
        len([line for line in (sweep / "results.jsonl").read_text().splitlines()])
        if (sweep / "results.jsonl").is_file()
        else 0
    )
    if not points:
        return "sweep: loading and tokenizing"
    if done >= 2:
        return "sweep: report"
    return f"sweep point {len(points)}: {phase_of(points[-1])}"


def finish(args: list[str], cache: Path) -> tuple[bool, str]:
    """Rerun until it exits 0 (twice at most); (ok, why not)."""
    for attempt in range(2):
        proc = start(args, cache)
        out, _ = proc.communicate(timeout=900)
        if "Traceback" in out:
            return False, f"rerun {attempt + 1} printed a traceback: {out[-1500:]}"
        if proc.returncode == 0:
            return True, ""
    return False, f"rerun exited {proc.returncode}: {out[-1500:]}"


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


def user_files(kind: str) -> dict[str, str]:
    return {**USER_FILES, **(SWEEP_USER_FILES if kind == "sweep" else {})}


def user_files_intact(project: Path, kind: str) -> bool:
    return all((project / n).is_file() and (project / n).read_text() == text for n, text in user_files(kind).items())


def write_user_files(project: Path, kind: str) -> None:
    for name, text in user_files(kind).items():
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_text(text)


def trial(
    kind: str, model: Path, work: Path, reference: dict[str, Any], duration: float, rng: random.Random
) -> dict[str, Any]:
    project = Path(tempfile.mkdtemp(dir=work, prefix=f"{kind}-"))
    write_user_files(project, kind)
    cache = project / "cache"
    args = command(kind, model, project)
    proc = start(args, cache)
    delay = rng.uniform(0.2, duration)
    time.sleep(delay)
    phase = phase_of(project / "run") if kind == "run" else sweep_phase(project / "sweep")
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    else:
        phase = "finished before the kill"
    proc.communicate()
    ok, why = finish(args, cache)
    if ok and not user_files_intact(project, kind):
        ok, why = False, "a user's file is gone or changed"
    if ok:
        got = results_of_run(project / "run") if kind == "run" else results_of_sweep(project / "sweep")
        if got != reference:
            ok, why = False, f"results differ: {got} vs {reference}"
    return {"kind": kind, "delay_s": round(delay, 2), "phase": phase, "ok": ok, "why": why}


def command(kind: str, model: Path, project: Path) -> list[str]:
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


def reference_of(kind: str, model: Path, work: Path) -> tuple[dict[str, Any], float]:
    project = Path(tempfile.mkdtemp(dir=work, prefix=f"reference-{kind}-"))
    write_user_files(project, kind)
    args = command(kind, model, project)
    t0 = time.perf_counter()
    proc = start(args, project / "cache")
    out, _ = proc.communicate(timeout=900)
    if proc.returncode != 0:
        raise SystemExit(f"the uninterrupted {kind} failed: {out[-2000:]}")
    seconds = time.perf_counter() - t0
    got = results_of_run(project / "run") if kind == "run" else results_of_sweep(project / "sweep")
    return got, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=35)
    parser.add_argument("--sweeps", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "crash.json")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="ecoadapt-crash-") as tmp:
        work = Path(tmp)
        model = build(work / "model", layers=2, hidden=72, intermediate=192, vocab=512, tokenizer_vocab=512)
        trials = []
        for kind, n in (("run", args.runs), ("sweep", args.sweeps)):
            if not n:
                continue
            reference, duration = reference_of(kind, model, work)
            print(f"{kind}: uninterrupted in {duration:.1f} s: {reference}", flush=True)
            for i in range(n):
                t = trial(kind, model, work, reference, duration, rng)
                trials.append(t)
                verdict = "ok" if t["ok"] else "FAILED " + t["why"]
                print(f"{kind} {i + 1}/{n}: killed at {t['delay_s']} s ({t['phase']}): {verdict}", flush=True)
    by_phase = Counter(t["phase"] for t in trials)
    failures = [t for t in trials if not t["ok"]]
    result = {"kills": len(trials), "failures": len(failures), "by_phase": dict(by_phase), "trials": trials}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{len(trials)} kills, {len(failures)} failures; by phase: {dict(by_phase)}")
    raise SystemExit(1 if failures else 0)


if __name__ == "__main__":
    main()
