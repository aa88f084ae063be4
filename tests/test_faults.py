"""Faults a run meets in the wild: a killed child whose workers hold its pipe, a stale summary,
a stray quote in a CSV, RAPL zones that overlap or wrap, a sweep's paths. Each test is named
after the defect it pins (issue 36's table: #3, #4, #8, #11) or the meter rule it holds."""

import subprocess
import sys
import time

import pytest
import yaml

from ecoadapt.commands import isolated
from ecoadapt.core.errors import UserError
from ecoadapt.core.processes import run_child
from ecoadapt.data import readers
from ecoadapt.measure import meters
from helpers.fakes import make_zone
from helpers.runs import write_config


def test_defect_4_a_killed_child_whose_worker_holds_the_pipe_does_not_hang_the_parent(tmp_path):
    """A grandchild in the child's group inherits its stderr; the child dies of SIGKILL."""
    pid_file = tmp_path / "worker.pid"
    child = tmp_path / "child.py"
    child.write_text(
        "import os, signal, subprocess, sys, time\n"
        f"w = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(w.pid))\n"
        "print('tokenizing:  40%|####', file=sys.stderr, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    started = time.monotonic()
    result = run_child([sys.executable, str(child)], capture_stderr=True)
    assert time.monotonic() - started < 20  # it used to wait for the worker, forever
    assert result.code == -9 and result.exit_status == 137
    worker = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _alive(worker):
        time.sleep(0.05)
    assert not _alive(worker)  # the group went with it: no orphan
    error = isolated.last_error(result.tail, result.exit_status, result.code)
    assert error == "killed by SIGKILL (exit status 137); rerun to resume it"  # not the progress bar


def test_a_workers_parent_death_signal_reaches_it(tmp_path):
    """die_with_parent: a worker of a run killed outright goes with it (Linux)."""
    if not sys.platform.startswith("linux"):
        pytest.skip("prctl(PR_SET_PDEATHSIG) is Linux's")
    pid_file = tmp_path / "worker.pid"
    code = (
        "import os, subprocess, sys, time\n"
        "w = subprocess.Popen([sys.executable, '-c', 'from ecoadapt.core.processes import die_with_parent; "
        "import time; die_with_parent(); time.sleep(600)'], start_new_session=True)\n"
        f"open({str(pid_file)!r}, 'w').write(str(w.pid))\n"
        "time.sleep(600)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.monotonic() + 30
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(1.0)  # the worker has set its parent-death signal
    parent.kill()
    parent.wait()
    worker = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _alive(worker):
        time.sleep(0.05)
    assert not _alive(worker)


def test_defect_8_a_stale_summary_is_never_taken_for_a_failed_attempts(tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text('{"status": "completed", "steps": 99}')  # an earlier attempt's
    fake = tmp_path / "fake_ecoadapt.py"
    fake.write_text("import sys\nprint('ecoadapt: output.dir: in use by process 1', file=sys.stderr)\nsys.exit(2)\n")
    real = [sys.executable, "-m", "ecoadapt", "adapt"]
    monkeypatch.setattr(
        isolated, "run_child", lambda cmd, **kw: run_child([sys.executable, str(fake), *cmd[len(real) :]], **kw)
    )
    summary = isolated.run_adapt({"model": {}}, run)
    assert summary["status"] == "failed" and summary["exit_code"] == 2
    assert summary["error"] == "ecoadapt: output.dir: in use by process 1"


def test_defect_11_a_stray_quote_in_a_csv_names_its_line_in_bounded_memory(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "CSV_FIELD_LIMIT", 4096)  # the real one is 16 M characters
    path = tmp_path / "corpus.csv"
    rows = ["text,label", '"an opened quote,0', *(f"document number {i},1" for i in range(2000))]
    path.write_text("\n".join(rows) + "\n")
    with pytest.raises(UserError, match=r"corpus.csv:2: a field runs on past .* a quote"):
        list(readers._table(path, "text", ","))
    fine = tmp_path / "fine.csv"
    fine.write_text('text,label\n"a ""quoted"" word, and a comma",0\nplain,1\n')
    assert [r["text"] for _, r in readers._table(fine, "text", ",")] == ['a "quoted" word, and a comma', "plain"]


def test_rapl_on_a_laptop_counts_the_package_not_psys_beside_it(tmp_path):
    make_zone(tmp_path, "intel-rapl:0", "package-0", 0, 2**40)
    psys = make_zone(tmp_path, "intel-rapl:1", "psys", 0, 2**40)
    meter = meters.RaplMeter(tmp_path, sample=False)
    assert meter.describe()["zones"] == ["package-0"]
    (tmp_path / "intel-rapl:0" / "energy_uj").write_text("2000000\n")
    (psys / "energy_uj").write_text("5000000\n")  # holds the package's 2 J: never added to it
    assert meter.total_joules() == pytest.approx(2.0)


def test_rapl_with_psys_alone_counts_psys_and_two_packages_count_both(tmp_path):
    alone = tmp_path / "laptop"
    make_zone(alone, "intel-rapl:0", "psys", 0, 2**40)
    assert meters.RaplMeter(alone, sample=False).describe()["zones"] == ["psys"]
    server = tmp_path / "server"
    for i in (0, 1):
        make_zone(server, f"intel-rapl:{i}", f"package-{i}", 0, 2**40)
        make_zone(server, f"intel-rapl:{i}:0", "dram", 0, 2**40)
        make_zone(server, f"intel-rapl:{i}:1", "core", 0, 2**40)
    meter = meters.RaplMeter(server, sample=False)
    assert sorted(meter.describe()["zones"]) == ["dram", "dram", "package-0", "package-1"]
    for zone in ("intel-rapl:0", "intel-rapl:1", "intel-rapl:0:0", "intel-rapl:1:0", "intel-rapl:1:1"):
        (server / zone / "energy_uj").write_text("1000000\n")
    assert meter.total_joules() == pytest.approx(4.0)  # the core zone's joule is inside package-1's


def test_rapl_wraps_inside_a_long_window_are_counted_by_background_reads(tmp_path):
    """A counter that wraps twice between the run's two reads: only sampling sees both."""
    zone = make_zone(tmp_path, "intel-rapl:0", "package-0", 0, 1_000_000)  # wraps every joule
    sampled = meters.RaplMeter(tmp_path)
    unsampled = meters.RaplMeter(tmp_path, sample=False)
    assert sampled.sample_s == meters.RAPL_SAMPLE_S[0]
    for uj in (600_000, 200_000, 800_000, 400_000):  # +0.6, +0.6 (wrapped), +0.6, +0.6 (wrapped)
        (zone / "energy_uj").write_text(f"{uj}\n")
        time.sleep(sampled.sample_s * 2.5)
    assert sampled.total_joules() == pytest.approx(2.4)
    assert unsampled.total_joules() == pytest.approx(0.4)  # one read: 0 -> 0.4, three wraps lost


def test_defect_3_a_sweep_point_reads_the_sweeps_corpus_never_one_planted_in_tmp(
    tmp_path, tiny_bert, corpus_jsonl, monkeypatch
):
    from ecoadapt.commands import sweep as sweep_command

    project = tmp_path / "project"
    project.mkdir()
    (project / "docs.jsonl").write_text(corpus_jsonl.read_text())
    base = yaml.safe_load(write_config(tmp_path, tiny_bert, corpus_jsonl).read_text())
    base["data"]["train"] = ["docs.jsonl"]  # relative: the sweep file's folder
    base["train"]["max_steps"] = 1
    spec = {"base": base, "points": [{"name": "p", "set": {"train.lr": 1e-3}}], "output": {"dir": str(tmp_path / "s")}}
    (project / "sweep.yaml").write_text(yaml.safe_dump(spec))
    planted = tmp_path / "tmp"
    planted.mkdir()
    (planted / "docs.jsonl").write_text('{"text": "planted by someone else"}\n' * 50)
    monkeypatch.setenv("TMPDIR", str(planted))
    monkeypatch.setattr("tempfile.tempdir", None)
    loaded = sweep_command.load(project / "sweep.yaml")
    assert loaded.paths_from == project
    results = sweep_command.run_points(loaded)
    assert all(r["status"] == "completed" for r in results), [r.get("error") for r in results]
    sources = [source for r in results for source in r["data"]["sources"]]
    assert sources and all(str(project / "docs.jsonl") in str(s) for s in sources), sources


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_short_append_is_finished_or_cut_back_never_left_torn(tmp_path, monkeypatch):
    import errno
    import os

    from ecoadapt.core import storage

    log = tmp_path / "metrics.jsonl"
    storage.append_jsonl(log, {"step": 1})
    real_write = os.write
    calls = {"n": 0}

    def short_then_full(fd, data):
        calls["n"] += 1
        if calls["n"] == 1:
            return real_write(fd, data[:5])  # a short write (a signal, a nearly full disk)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(storage.os, "write", short_then_full)
    with pytest.raises(OSError, match="No space left"):
        storage.append_jsonl(log, {"step": 2, "loss": 1.5})
    monkeypatch.setattr(storage.os, "write", real_write)
    storage.append_jsonl(log, {"step": 3})
    assert log.read_text() == '{"step": 1}\n{"step": 3}\n'  # no torn half-line joined to the next


@pytest.mark.slow
def test_a_full_disk_during_a_checkpoint_is_one_line_and_the_rerun_finishes(tmp_path, tiny_llama, corpus_jsonl):
    import json
    import os
    import resource
    import signal

    path = write_config(tmp_path, tiny_llama, corpus_jsonl, train={"max_steps": 6, "save_every": 2})
    cache = tmp_path / "cache"
    env = {**os.environ, "ECOADAPT_CACHE": str(cache), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "ecoadapt", "adapt", str(path)]
    # Prepare the token store first, so that the limit strikes the run's own files.
    assert subprocess.run([*cmd, "--set", "train.max_steps=1", "--set", "output.dir=" + str(tmp_path / "warm")],
                          env=env, capture_output=True).returncode == 0  # fmt: skip

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))  # smaller than a checkpoint

    full = subprocess.run(cmd, env=env, capture_output=True, text=True, preexec_fn=limit, timeout=300)
    assert full.returncode == 2, full.stderr[-2000:]
    assert "Traceback" not in full.stderr and "the disk is full" in full.stderr
    assert len([line for line in full.stderr.splitlines() if line.startswith("ecoadapt")]) == 1
    run = tmp_path / "run"
    assert not any(p.name.endswith(".tmp") for p in run.iterdir())  # no temp file left behind
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads((run / "summary.json").read_text())["steps"] == 6


@pytest.mark.slow
def test_sigterm_during_the_task_stops_between_seeds_and_the_rerun_finishes(tmp_path, tiny_bert, corpus_jsonl):
    import json
    import os

    from ecoadapt.core import storage
    from helpers.tiny_models import write_task

    task = write_task(tmp_path / "task.jsonl", 200)
    sections = {
        "train": {"max_steps": 4},
        "task": {"train": [str(task)], "seeds": [0, 1, 2], "epochs": 1, "cache": False},
        "measure": {"energy": "estimate"},
        "output": {"save_model": True},
    }
    path = write_config(tmp_path, tiny_bert, corpus_jsonl, **sections)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "ecoadapt", "adapt", str(path)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seeds = tmp_path / "run" / "task_seeds.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None and not storage.read_jsonl(seeds):
        time.sleep(0.05)
    proc.terminate()  # SIGTERM while the task scores its seeds
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, out[-2000:]
    assert "the task stopped between seeds" in out and "Traceback" not in out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["signal"] == "SIGTERM"
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    final = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert final["status"] == "completed" and len(final["task"]["per_seed"]) == 3


def test_a_sweep_killed_outright_takes_its_running_point_with_it(tmp_path):
    """The harness's finding: SIGKILL to a sweep left its point (its own process group) running."""
    pid_file = tmp_path / "point.pid"
    point = (
        "import os, time\n"
        "from ecoadapt.core.processes import PARENT_ENV, follow_parent\n"
        "follow_parent()\n"
        f"open({str(pid_file)!r}, 'w').write(str(os.getpid()) + ' ' + str(PARENT_ENV in os.environ))\n"
        "time.sleep(600)\n"
    )
    sweep = (
        "import sys\n"
        "from ecoadapt.core.processes import run_child\n"
        f"run_child([sys.executable, '-c', {point!r}], follow=True)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", sweep])
    deadline = time.monotonic() + 60
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline and parent.poll() is None
        time.sleep(0.05)
    pid, inherited = pid_file.read_text().split()
    assert inherited == "False"  # not passed on to the point's own children (torchrun's ranks)
    parent.kill()  # the OOM killer's way: no handler runs in the sweep
    parent.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _alive(int(pid)):
        time.sleep(0.05)
    assert not _alive(int(pid))
