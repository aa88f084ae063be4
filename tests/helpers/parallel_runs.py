"""Runs of the tiny config that the parallel and quantized tests compare, one process or N."""

import json
import os
import subprocess
import sys

import yaml


def config(tmp_path, name, model, corpus, **train):
    cfg = {
        "model": {"name_or_path": str(model)},
        "data": {"train": [str(corpus)], "text_field": "caption", "max_seq_len": 16, "eval_fraction": 0.1},
        "train": {"max_steps": 5, "lr": 3e-3, "log_every": 1, "warmup_ratio": 0, "seed": 3, **train},
        "measure": {"energy": "estimate"},
        "output": {"dir": str(tmp_path / name)},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run(path, nproc=1, *sets):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "ecoadapt", "adapt", str(path), *(f"--set={s}" for s in sets)]
    if nproc > 1:
        cmd += [f"--set=parallel.nproc={nproc}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def losses(folder):
    return [json.loads(x)["loss"] for x in (folder / "metrics.jsonl").read_text().splitlines()]
