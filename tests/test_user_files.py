"""Never lose a user's work: what ecoadapt did not write is never deleted, a run folder is one
run's at a time, files are the user's to share, and a kill after training loses no finished
phase. Each test is named after the defect it pins."""

import json
import os
import stat
import subprocess
import sys
import time

import pytest
import yaml

from ecoadapt.cli import main
from ecoadapt.core import ownership, storage
from ecoadapt.model.export import replace_folder
from ecoadapt.results import rundir
from helpers.runs import write_config
from helpers.tiny_models import write_task


def test_overwrite_never_deletes_a_folder_ecoadapt_did_not_write(tmp_path, tiny_bert, corpus_jsonl, capsys):
    project = tmp_path / "proj"
    (project / "data").mkdir(parents=True)
    (project / "thesis.tex").write_text("\\documentclass{article}")
    (project / "data" / "raw.csv").write_text("a,b\n1,2\n")
    path = write_config(tmp_path, tiny_bert, corpus_jsonl)
    code = main(["adapt", str(path), "--set", f"output.dir={project}", "--set", "output.overwrite=true"])
    assert code == 2
    err = capsys.readouterr().err
    assert "holds files ecoadapt did not write (data, thesis.tex)" in err and "never deletes" in err
    assert (project / "thesis.tex").is_file() and (project / "data" / "raw.csv").read_text() == "a,b\n1,2\n"


@pytest.mark.parametrize("where", ["cwd", "home", "repo"])
def test_the_current_folder_home_and_a_repository_root_are_refused_outright(tmp_path, monkeypatch, where):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    (tmp_path / "repo" / ".git").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    target = {"cwd": tmp_path, "home": tmp_path / "home", "repo": tmp_path / "repo"}[where]
    what = {"cwd": "the current folder", "home": "your home folder", "repo": "a repository's root"}[where]
    with pytest.raises(Exception, match=what):
        rundir.resume_point(target, {}, overwrite=True, require=False)


def test_overwriting_a_run_removes_ecoadapts_files_and_keeps_the_users(tmp_path, tiny_bert, corpus_jsonl):
    path = write_config(tmp_path, tiny_bert, corpus_jsonl, output={"save_model": True})
    assert main(["adapt", str(path)]) == 0
    run = tmp_path / "run"
    assert (run / ownership.MANIFEST).is_file() and (run / "model").is_dir()
    assert {"model", "summary.json", "config.yaml"} <= set(ownership.Folder(run).survey().own)
    (run / "notes.md").write_text("my notes on this run")  # the user's, added afterwards
    for lookalike in ("thesis.old", ".notes.tmp"):  # named like what ecoadapt sets aside, but the user's
        (run / lookalike).write_text("mine")
    summary_before = (run / "summary.json").read_text()
    assert main(["adapt", str(path)]) == 0  # the same command again: it has finished, nothing to redo
    assert (run / "summary.json").read_text() == summary_before
    assert main(["adapt", str(path), "--set", "output.overwrite=true", "--set", "train.max_steps=2"]) == 0
    assert (run / "notes.md").read_text() == "my notes on this run"
    assert (run / "thesis.old").read_text() == "mine" and (run / ".notes.tmp").read_text() == "mine"
    assert json.loads((run / "summary.json").read_text())["steps"] == 2


def test_a_second_run_in_a_folder_in_use_is_refused_naming_the_first(tmp_path):
    run = tmp_path / "run"
    with rundir.locked(run):
        holder = rundir.in_use_by(run)
        assert holder is not None and f"process {os.getpid()}" in holder
        with pytest.raises(Exception, match=f"in use by process {os.getpid()}"):
            rundir.resume_point(run, {}, overwrite=True, require=False)
    assert rundir.in_use_by(run) is None  # released with the run


def test_files_written_atomically_honour_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        storage.write_json(tmp_path / "summary.json", {"a": 1})
        assert stat.S_IMODE((tmp_path / "summary.json").stat().st_mode) == 0o644  # was 0600
        os.umask(0o002)  # a group-shared cache
        storage.write_json(tmp_path / "shared.json", {"a": 1})
        assert stat.S_IMODE((tmp_path / "shared.json").stat().st_mode) == 0o664
    finally:
        os.umask(old)


def test_saving_over_an_existing_model_replaces_it_whole(tmp_path):
    """The rerun that used to fail with 'Directory not empty' and leave .model.tmp beside it."""
    tmp_path = tmp_path / "run"
    tmp_path.mkdir()
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "old.bin").write_text("old")
    (tmp_path / ".model.tmp").mkdir()
    (tmp_path / ".model.tmp" / "new.bin").write_text("new")
    replace_folder(tmp_path / ".model.tmp", tmp_path / "model")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert [p.name for p in (tmp_path / "model").iterdir()] == ["new.bin"]
    # A kill between the two renames leaves the old model aside: the next save puts it back first.
    (tmp_path / "model").rename(tmp_path / "model.old")
    (tmp_path / ".model.tmp").mkdir()
    (tmp_path / ".model.tmp" / "newer.bin").write_text("newer")
    replace_folder(tmp_path / ".model.tmp", tmp_path / "model")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def _start(config, *extra):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "ecoadapt", "adapt", str(config), *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_a_run_killed_during_its_task_resumes_the_task_and_keeps_the_trained_model(tmp_path, tiny_bert, corpus_jsonl):
    task = write_task(tmp_path / "task.jsonl", 200)
    sections = {
        "train": {"max_steps": 6, "save_every": 3},
        "task": {"train": [str(task)], "seeds": [0, 1, 2], "epochs": 1, "cache": False},
        "measure": {"energy": "estimate"},
        "output": {"save_model": True},
    }
    path = write_config(tmp_path, tiny_bert, corpus_jsonl, **sections)
    run = tmp_path / "run"
    proc = _start(path)
    seeds = run / "task_seeds.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None and len(storage.read_jsonl(seeds)) < 2:
        time.sleep(0.05)
    proc.kill()  # SIGKILL during the task, after a seed or two
    proc.communicate()
    assert (run / "phases.json").is_file() and (run / "model").is_dir(), sorted(p.name for p in run.iterdir())
    done_before = len(storage.read_jsonl(seeds))
    model_mtime = (run / "model" / "model.safetensors").stat().st_mtime
    rerun = _start(path)
    out, _ = rerun.communicate(timeout=240)
    assert rerun.returncode == 0, out
    assert "resuming after training" in out and "Traceback" not in out
    assert (run / "model" / "model.safetensors").stat().st_mtime == model_mtime  # kept, not trained again
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 6
    assert len(summary["task"]["per_seed"]) == 3 and summary["task"]["energy"]["resumed_seeds"] == done_before
    assert not (run / "phases.json").exists() and not seeds.exists()

    # The same run uninterrupted scores the same: resuming changed no number.
    (tmp_path / "ref").mkdir()
    again = write_config(tmp_path / "ref", tiny_bert, corpus_jsonl, **sections)
    assert main(["adapt", str(again)]) == 0
    reference = json.loads((tmp_path / "ref" / "run" / "summary.json").read_text())
    for mine, theirs in zip(summary["task"]["per_seed"], reference["task"]["per_seed"], strict=True):
        # Seed by seed (a mean can agree by chance): the seeds scored after the resume, from
        # the saved model, score as the uninterrupted run's in-memory model does.
        assert mine["adapted"]["macro_f1"] == pytest.approx(theirs["adapted"]["macro_f1"], rel=1e-6), mine["seed"]
        assert mine["base"]["macro_f1"] == pytest.approx(theirs["base"]["macro_f1"], rel=1e-6), mine["seed"]
    assert summary["task"]["base"] == pytest.approx(reference["task"]["base"], rel=1e-6)
    assert summary["eval"]["loss"] == pytest.approx(reference["eval"]["loss"], rel=1e-6)
    assert yaml.safe_load((run / "config.yaml").read_text())["task"]["seeds"] == [0, 1, 2]


@pytest.mark.slow
def test_sigterm_to_a_sweep_reaches_its_run_which_checkpoints_and_the_sweep_resumes(tmp_path, tiny_bert, corpus_jsonl):
    base = yaml.safe_load(write_config(tmp_path, tiny_bert, corpus_jsonl).read_text())
    base["train"].update({"max_steps": 120, "log_every": 1, "lr": 1e-3})
    base["measure"] = {"energy": "estimate"}
    spec = {
        "base": base,
        "points": [{"name": "lora", "set": {"lora.enabled": True}}],
        "output": {"dir": str(tmp_path / "sweep")},
    }
    spec_path = tmp_path / "sweep.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    cmd = [sys.executable, "-m", "ecoadapt", "sweep", str(spec_path)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 240
    metrics = list((tmp_path / "sweep" / "points").glob("*/metrics.jsonl"))
    while time.monotonic() < deadline and (not metrics or len(storage.read_jsonl(metrics[0])) < 5):
        time.sleep(0.05)
        metrics = list((tmp_path / "sweep" / "points").glob("*/metrics.jsonl"))
    proc.send_signal(15)  # to the sweep alone, as a scheduler or `kill` sends it
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, out
    records = storage.read_jsonl(tmp_path / "sweep" / "results.jsonl")
    assert [(r["status"], r["interrupted_by"]) for r in records] == [("interrupted", "SIGTERM")], out
    assert (metrics[0].parent / "checkpoint.pt").is_file()  # the run checkpointed: no work lost
    assert "rerun the same command to resume" in out and "Traceback" not in out

    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert again.returncode == 0, again.stderr[-2000:]
    latest = {r["name"]: r for r in storage.read_jsonl(tmp_path / "sweep" / "results.jsonl")}
    assert latest["baseline"]["status"] == "completed" and latest["lora"]["status"] == "completed"
    resumed = [r for r in storage.read_jsonl(tmp_path / "sweep" / "results.jsonl") if r["status"] == "completed"]
    assert any((r.get("resumed_from_step") or 0) >= 5 for r in resumed)


def test_a_timeout_stops_the_whole_process_tree_grandchildren_included(tmp_path):
    from ecoadapt.core.processes import run_child

    # A child that starts a grandchild in a session of its own (as torchrun starts its
    # workers), then both sleep; the grandchild writes its pid first.
    pid_file = tmp_path / "grandchild.pid"
    grandchild_code = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(600)"
    child = tmp_path / "child.py"
    child.write_text(
        "import subprocess, sys, time\n"
        f"subprocess.Popen([sys.executable, '-c', {grandchild_code!r}], start_new_session=True)\n"
        "time.sleep(600)\n"
    )
    code = str(child)
    started = time.monotonic()
    result = run_child([sys.executable, code], timeout_s=2.0, grace_s=1.0)
    assert result.timed_out and time.monotonic() - started < 30
    grandchild = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _alive(grandchild):
        time.sleep(0.05)
    assert not _alive(grandchild)


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_an_invalid_hub_id_is_one_line_not_a_traceback(tmp_path, corpus_jsonl, capsys):
    path = write_config(tmp_path, "org/..bad", corpus_jsonl)
    assert main(["adapt", str(path)]) == 2
    err = capsys.readouterr().err
    assert "'org/..bad' is neither a local folder or file nor a valid hub id" in err and "Traceback" not in err


def test_a_task_whose_labels_have_one_example_each_is_refused_before_adapting(
    tmp_path, tiny_bert, corpus_jsonl, capsys
):
    task = tmp_path / "task.jsonl"
    task.write_text("".join(json.dumps({"text": f"text {i} here", "label": f"l{i}"}) + "\n" for i in range(6)))
    path = write_config(tmp_path, tiny_bert, corpus_jsonl, task={"train": [str(task)]})
    assert main(["adapt", str(path)]) == 2
    err = capsys.readouterr().err
    assert "left no test examples (the most examples a label has is 1)" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # refused before any adaptation


def test_an_unreadable_cache_file_is_measured_again_with_a_note(tmp_path, capsys):
    import torch

    from ecoadapt.measure import flops

    path = flops._cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('{"v3|cpu": 1.0, "tor')  # torn by a kill, or edited by hand
    value, source = flops.peak_flops(torch.device("cpu"), torch.float32)
    assert source == "measured" and value > 1e6
    assert "cannot be read (JSONDecodeError); it is measured again" in capsys.readouterr().err
    assert json.loads(path.read_text())  # written whole again


@pytest.mark.slow
def test_a_resume_on_a_corpus_edited_in_place_is_refused_naming_it(tmp_path, tiny_bert, corpus_jsonl):
    path = write_config(tmp_path, tiny_bert, corpus_jsonl, train={"max_steps": 300, "save_every": 2, "log_every": 1})
    proc = _start(path)
    deadline = time.monotonic() + 120
    while not (tmp_path / "run" / "checkpoint.pt").is_file():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
        time.sleep(0.05)
    proc.kill()
    proc.communicate()
    with open(corpus_jsonl, "a") as f:
        f.write(json.dumps({"caption": "a new line added to the corpus afterwards"}) + "\n")
    rerun = _start(path)
    out, _ = rerun.communicate(timeout=120)
    assert rerun.returncode == 2, out
    assert "holds a checkpoint made on other corpus token store" in out and "Traceback" not in out
    assert (tmp_path / "run" / "checkpoint.pt").is_file()  # kept: the original corpus resumes it


def test_temp_files_of_killed_writers_are_removed_by_the_next_write(tmp_path):
    tmp_path = tmp_path / "run"
    tmp_path.mkdir()
    host = storage._HOST
    dead = tmp_path / f".summary.json.{host}.999999999.ab12.tmp"  # no such process
    alive = tmp_path / f".summary.json.{host}.{os.getppid()}.cd34.tmp"  # a live writer
    elsewhere = tmp_path / ".summary.json.another-host.1.ef56.tmp"  # may be alive on a shared disk
    for f in (dead, alive, elsewhere):
        f.write_text("{")
    storage.write_json(tmp_path / "summary.json", {"status": "completed"})
    assert not dead.exists() and alive.exists() and elsewhere.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["summary.json", alive.name, elsewhere.name])


@pytest.mark.slow
def test_sigterm_to_the_launcher_of_a_two_rank_job_reaches_both_ranks(tmp_path, tiny_llama, corpus_jsonl):
    """torchrun runs in a group of its own; the launcher passes the signal on, the ranks checkpoint."""
    # Long enough that the signal arrives mid-training on a fast machine (60 steps took 0.5 s).
    sections = {"train": {"max_steps": 400, "log_every": 1, "micro_batch_size": 2}, "parallel": {"nproc": 2}}
    path = write_config(tmp_path, tiny_llama, corpus_jsonl, measure={"energy": "estimate"}, **sections)
    proc = _start(path)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 180
    while len(storage.read_jsonl(metrics)) < 3:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.05)
    proc.send_signal(15)  # to the launcher alone
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, out[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "interrupted" and (tmp_path / "run" / "checkpoint.pt").is_file()
    rerun = _start(path)  # the same command resumes both ranks from the checkpoint
    out, _ = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, out[-3000:]
    resumed = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert resumed["status"] == "completed" and resumed["steps"] == 400 and resumed["resumed_from_step"] >= 3
