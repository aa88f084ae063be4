"""Ownership by record: ecoadapt removes and overwrites only what its folders' manifests say it
wrote, in run, sweep, demo and report folders alike. Each test is named after the defect it pins
(issue 36's table: #1, #2, #5, #8, #9, #10, #12)."""

import json
import os

import pytest
import yaml

from ecoadapt.cli import main
from ecoadapt.core import ownership
from ecoadapt.core.errors import UserError
from ecoadapt.results import rundir
from helpers.runs import write_config


def test_a_claimed_entry_is_removed_and_a_users_file_beside_it_is_not(tmp_path):
    folder = ownership.Folder(tmp_path / "out")
    folder.claim("summary.json", "model")
    (tmp_path / "out" / "summary.json").write_text("{}")
    (tmp_path / "out" / "model").mkdir()
    (tmp_path / "out" / "model" / "w.bin").write_bytes(b"w")
    folder.seal()
    recorded = folder.entries()
    assert recorded["summary.json"]["state"] == "sealed" and "sha256" in recorded["summary.json"]
    assert recorded["model"]["kind"] == "dir" and recorded["model"]["files"] == 1
    (tmp_path / "out" / "notes.md").write_text("mine")  # the user's notes beside a run of ecoadapt's
    assert sorted(folder.remove()) == ["model", "summary.json"]
    left = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert left == sorted([ownership.GUARD, ownership.MANIFEST, "notes.md"])
    assert (tmp_path / "out" / "notes.md").read_text() == "mine"


def test_a_folder_without_a_manifest_is_never_cleared(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "summary.json").write_text("{}")  # a name ecoadapt writes, but no record of it
    with pytest.raises(UserError, match=r"files ecoadapt did not write \(summary.json\)"):
        ownership.Folder(out).remove()
    assert (out / "summary.json").read_text() == "{}"


def test_a_file_edited_after_ecoadapt_wrote_it_is_the_users_and_is_kept(tmp_path):
    folder = ownership.Folder(tmp_path)
    folder.claim("report.md")
    (tmp_path / "report.md").write_text("# ecoadapt report\n")
    folder.seal()
    (tmp_path / "report.md").write_text("# ecoadapt report\nmy conclusions\n")  # same size? no: edited
    assert folder.survey().changed == ["report.md"]
    with pytest.raises(UserError, match=r"changed since ecoadapt wrote it"):
        folder.claim("report.md")
    assert folder.remove(["report.md"]) == []  # named, but changed: kept
    assert (tmp_path / "report.md").read_text().endswith("my conclusions\n")


def test_same_size_edit_is_caught_by_the_hash(tmp_path):
    folder = ownership.Folder(tmp_path)
    folder.claim("a.txt")
    (tmp_path / "a.txt").write_text("aaaa")
    folder.seal()
    stat = (tmp_path / "a.txt").stat()
    (tmp_path / "a.txt").write_text("bbbb")
    os.utime(tmp_path / "a.txt", ns=(stat.st_atime_ns, stat.st_mtime_ns))  # cp -p keeps the time
    assert folder.survey().changed == ["a.txt"]


def test_defect_1_adapt_never_takes_a_users_folder_for_an_older_run(tmp_path, tiny_bert, corpus_jsonl, capsys):
    """A folder holding only names ecoadapt also writes was emptied and "restarted", exit 0."""
    user = tmp_path / "mine"
    (user / "model").mkdir(parents=True)
    (user / "model" / "pytorch_model.bin").write_bytes(b"my weights")
    (user / "results.csv").write_text("a,b\n")
    (user / "report.md").write_text("# my report\n")
    path = write_config(tmp_path, tiny_bert, corpus_jsonl)
    assert main(["adapt", str(path), "--set", f"output.dir={user}"]) == 2
    err = capsys.readouterr().err
    assert "holds files ecoadapt did not write (model, report.md, results.csv)" in err
    assert (user / "model" / "pytorch_model.bin").read_bytes() == b"my weights"
    assert (user / "results.csv").read_text() == "a,b\n" and (user / "report.md").read_text() == "# my report\n"
    assert sorted(p.name for p in user.iterdir()) == ["model", "report.md", "results.csv"]  # nothing added


def test_defect_2_a_sweep_never_overwrites_a_users_report(tmp_path, tiny_bert, corpus_jsonl, capsys):
    base = yaml.safe_load(write_config(tmp_path, tiny_bert, corpus_jsonl).read_text())
    out = tmp_path / "sweep"
    out.mkdir()
    (out / "report.md").write_text("# my report\n")
    (out / "results.csv").write_text("mine\n")
    spec = {"base": base, "points": [{"name": "lora", "set": {"lora.enabled": True}}], "output": {"dir": str(out)}}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(spec))
    assert main(["sweep", str(tmp_path / "sweep.yaml")]) == 2
    assert "holds files ecoadapt did not write (report.md, results.csv)" in capsys.readouterr().err
    assert (out / "report.md").read_text() == "# my report\n" and (out / "results.csv").read_text() == "mine\n"
    assert sorted(p.name for p in out.iterdir()) == ["report.md", "results.csv"]


@pytest.mark.parametrize("where", ["cwd", "home"])
def test_a_sweep_into_the_working_or_home_folder_is_refused(
    tmp_path, monkeypatch, where, capsys, tiny_bert, corpus_jsonl
):
    base = yaml.safe_load(write_config(tmp_path, tiny_bert, corpus_jsonl).read_text())
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    monkeypatch.chdir(tmp_path)
    target = tmp_path if where == "cwd" else tmp_path / "home"
    spec = {"base": base, "points": [{"name": "p", "set": {}}], "output": {"dir": str(target)}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    assert main(["sweep", str(tmp_path / "s.yaml")]) == 2
    assert "writes into a folder of its own" in capsys.readouterr().err


def test_report_refuses_to_overwrite_a_users_report_and_writes_its_own_on_record(tmp_path, capsys):
    run = tmp_path / "run"
    folder = ownership.Folder(run)
    folder.claim("summary.json")
    (run / "summary.json").write_text(json.dumps(_summary()))
    folder.seal()
    (run / "report.md").write_text("# the user's own\n")
    assert main(["report", str(run)]) == 2
    assert "report.md was not written by ecoadapt" in capsys.readouterr().err
    assert (run / "report.md").read_text() == "# the user's own\n"
    (run / "report.md").unlink()
    assert main(["report", str(run)]) == 0
    survey = folder.survey()
    assert not survey.foreign and "report.md" in survey.own and "results.csv" in survey.own
    assert main(["report", str(run)]) == 0  # its own report, rewritten


def test_a_report_refused_in_a_users_folder_leaves_nothing_there(tmp_path, capsys):
    folder = tmp_path / "theirs"
    folder.mkdir()
    (folder / "summary.json").write_text(json.dumps(_summary()))
    (folder / "report.md").write_text("# mine\n")
    assert main(["report", str(folder)]) == 2
    assert "report.md was not written by ecoadapt" in capsys.readouterr().err
    assert sorted(p.name for p in folder.iterdir()) == ["report.md", "summary.json"]


def test_defect_12_report_on_a_torn_summary_is_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text('{"status": "compl')
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err
    assert "summary.json: cannot read it as a summary" in err and "Traceback" not in err


def test_defect_5_report_reads_a_record_of_an_interrupted_point(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    record = {"name": "a", "key": "k1", "baseline": True, "exit_code": 143, "interrupted_by": "SIGTERM"}
    (sweep / "results.jsonl").write_text(json.dumps({**record, **_summary()}) + "\n")
    assert main(["report", str(sweep)]) == 0, capsys.readouterr().err


def test_defect_9_a_symlinked_lock_is_refused_and_its_target_untouched(tmp_path):
    from ecoadapt.core import locks

    victim = tmp_path / "precious.txt"
    victim.write_text("do not truncate me")
    run = tmp_path / "run"
    with rundir.locked(run):  # a run folder of ecoadapt's, its lock on record
        pass
    (run / rundir.LOCK_FILE).unlink()
    (run / rundir.LOCK_FILE).symlink_to(victim)  # planted in its place
    changed = r"changed since ecoadapt wrote them \(.ecoadapt-run.lock\)"
    with pytest.raises(UserError, match=changed), rundir.locked(run):
        pass
    store_lock = tmp_path / "tokens" / "key.lock"  # a token store's lock: no manifest guards it
    store_lock.parent.mkdir()
    store_lock.symlink_to(victim)
    with pytest.raises(UserError, match="is a symbolic link"), locks.held(store_lock, "the token store"):
        pass
    assert victim.read_text() == "do not truncate me"


def test_defect_10_a_tilde_in_a_path_key_is_the_home_folder(tmp_path, monkeypatch):
    from ecoadapt.config import RunConfig

    monkeypatch.setenv("HOME", str(tmp_path))
    raw = {"model": {"name_or_path": "m"}, "output": {"dir": "~/runs/x"}, "data": {"train": ["~/c.txt"]}}
    cfg = RunConfig.from_mapping(raw)
    assert cfg.output.dir == f"{tmp_path}/runs/x" and cfg.data.train == [f"{tmp_path}/c.txt"]


def test_an_older_run_folder_is_refused_until_adopted_then_overwritten(tmp_path, tiny_bert, corpus_jsonl, capsys):
    old = tmp_path / "run"
    old.mkdir()
    (old / ownership.LEGACY_MARKER).write_text("{}")
    (old / "metrics.jsonl").write_text("")
    path = write_config(tmp_path, tiny_bert, corpus_jsonl, train={"max_steps": 1})
    assert main(["adapt", str(path), "--set", "output.overwrite=true"]) == 2
    assert f"ecoadapt adopt {old}" in capsys.readouterr().err
    (old / "thesis.tex").write_text("mine")
    assert main(["adopt", str(old)]) == 2  # a name no ecoadapt ever wrote: not adopted
    assert "never writes (thesis.tex)" in capsys.readouterr().err
    (old / "thesis.tex").unlink()
    assert main(["adopt", str(old)]) == 0
    assert main(["adapt", str(path), "--set", "output.overwrite=true"]) == 0
    assert not (old / ownership.LEGACY_MARKER).exists()  # adopted, so removed with the rest
    assert json.loads((old / "summary.json").read_text())["steps"] == 1


def test_nested_output_folders_are_removed_through_their_own_manifests(tmp_path):
    sweep = ownership.Folder(tmp_path / "sweep")
    sweep.claim("results.jsonl", nested=("points",))
    point = ownership.Folder(tmp_path / "sweep" / "points" / "a")
    point.claim("summary.json")
    (point.path / "summary.json").write_text("{}")
    point.seal()
    sweep.seal()
    other = tmp_path / "sweep" / "points" / "the-users"
    other.mkdir()
    (other / "data.csv").write_text("mine")  # no manifest: not ecoadapt's
    assert sweep.remove() == []  # the user's folder stays, and so does points/
    assert not (point.path).exists() and (other / "data.csv").read_text() == "mine"
    (other / "data.csv").unlink()
    other.rmdir()
    assert sweep.remove() == ["points"]
    assert not (tmp_path / "sweep" / "points").exists()


def _summary() -> dict:
    """A run's summary built from the real schema."""
    from ecoadapt.results.summary import EvalSummary, RunSummary

    run = RunSummary(
        status="completed", config={"output": {"dir": "runs/x"}}, time_s=2.0, tokens_per_s=100.0,
        eval=EvalSummary(4.5, 4.0, 90.0, 54.6, 0.1, 0.2, 100, 4),
        energy={"train_joules": 10.0, "method": "estimated", "mj_per_token": 2.5},
    )  # fmt: skip
    return run.to_dict()
