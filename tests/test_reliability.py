"""A run that dies loses at most the steps since its last checkpoint, never corrupts its outputs,
never trains on or saves NaN weights, and shrinks its micro-batch when memory runs out."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from ecoadapt.cli import main
from ecoadapt.config import TrainConfig
from ecoadapt.core import ownership
from ecoadapt.core.errors import UserError
from ecoadapt.model import parallel
from ecoadapt.results import rundir
from ecoadapt.train import checkpoint
from ecoadapt.train.loop import Hooks, fit
from helpers.fakes import refuse_batches_over, tiny_loop
from helpers.runs import write_config

SRC = str(Path(__file__).resolve().parents[1] / "src")


def start(config: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": SRC}
    return subprocess.Popen(
        [sys.executable, "-m", "ecoadapt", "adapt", str(config), *extra],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(condition, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the run ended before the test could stop it: {proc.communicate()}"
        assert time.monotonic() < deadline, "timed out waiting for the run"
        time.sleep(0.005)


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "model" / "model.safetensors")


def resumable_config(tmp_path, tiny_bert, corpus_jsonl, name, **train):
    # 300 steps of a tiny BERT with dropout: long enough (a few seconds) to be stopped mid-way;
    # masked LM and dropout make the resume depend on every RNG state being restored.
    path = write_config(
        tmp_path,
        tiny_bert,
        corpus_jsonl,
        train={"max_steps": 300, "log_every": 1, "lr": 1e-3, **train},
        output={"dir": str(tmp_path / name)},
        measure={"energy": "estimate"},
    )
    return path.rename(tmp_path / f"{name}.yaml")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_bert):
    """The uninterrupted run's final weights."""
    tmp = tmp_path_factory.mktemp("reference")
    corpus = tmp / "corpus.jsonl"
    from helpers.tiny_models import sentences

    corpus.write_text("".join(json.dumps({"caption": s}) + "\n" for s in sentences(400)))
    config = resumable_config(tmp, tiny_bert, corpus, "run")
    proc = start(config)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return corpus, weights(tmp / "run"), json.loads((tmp / "run" / "summary.json").read_text())


@pytest.mark.slow
def test_sigkill_then_rerun_resumes_to_the_same_weights(tmp_path, tiny_bert, reference):
    corpus, expected, full = reference
    config = resumable_config(tmp_path, tiny_bert, corpus, "run", save_every=20)
    run = tmp_path / "run"
    proc = start(config)
    wait_for(lambda: (run / rundir.CHECKPOINT_FILE).exists(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "summary.json").exists() and not (run / "model").exists()
    saved_at = torch.load(run / rundir.CHECKPOINT_FILE, weights_only=True)["loop"]["steps"]
    assert 20 <= saved_at < 300 and saved_at % 20 == 0

    proc = start(config)  # the same command again
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 300
    assert summary["resumed_from_step"] >= saved_at
    got = weights(run)
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)  # exact: CPU, fp32, same seed
    assert summary["eval"]["loss"] == full["eval"]["loss"]
    assert summary["tokens"] == full["tokens"]
    steps = [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert steps == list(range(1, 301))  # the steps after the checkpoint were logged once, again
    assert not (run / rundir.CHECKPOINT_FILE).exists()  # finished: the optimizer state is dropped


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])  # SIGHUP: a closed terminal or ssh session
def test_a_stop_signal_checkpoints_and_exits_interrupted_then_resumes(tmp_path, tiny_bert, reference, sig):
    corpus, expected, _ = reference
    config = resumable_config(tmp_path, tiny_bert, corpus, "run")  # no periodic checkpoints
    run = tmp_path / "run"
    proc = start(config)
    wait_for(lambda: (run / "metrics.jsonl").exists() and (run / "metrics.jsonl").stat().st_size > 0, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err
    assert "Traceback" not in err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["signal"] == signal.Signals(sig).name
    assert 0 < summary["steps"] < 300 and summary["checkpoint"] == rundir.CHECKPOINT_FILE
    assert not (run / "model").exists()

    assert main(["adapt", str(config), "--resume"]) == 0
    final = json.loads((run / "summary.json").read_text())
    assert final["resumed_from_step"] == summary["steps"]
    got = weights(run)
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def poison(model, calls):
    """Make the forward passes numbered in ``calls`` (1-based) produce NaN hidden states (at the
    final norm, which every loss path goes through)."""
    seen = {"n": 0}

    def hook(module, args, output):
        seen["n"] += 1
        return output * float("nan") if seen["n"] in calls else output

    dict(parallel.unwrap(model).named_modules())["model.norm"].register_forward_hook(hook)


def test_an_injected_nan_step_is_skipped_and_training_goes_on(tmp_path, tiny_llama):
    cfg = TrainConfig(max_steps=8, micro_batch_size=2, lr=1e-2, log_every=1)
    loop, loader, checkpoints = tiny_loop(tiny_llama, tmp_path, cfg)
    poison(loop.model, {4})
    result = fit(loop, loader, Hooks(checkpoints=checkpoints))
    assert result.steps == 8 and result.nonfinite_steps == 1 and result.rollbacks == 0
    assert checkpoint.all_finite(loop.model)
    assert all(torch.isfinite(torch.tensor(log.loss)) for log in result.logs if log.step != 4)
    assert result.logs[-1].loss < result.logs[0].loss  # it kept learning


def test_a_run_of_nans_rolls_back_to_the_checkpoint_at_a_lower_lr(tmp_path, tiny_llama):
    cfg = TrainConfig(max_steps=10, micro_batch_size=2, lr=1e-2, log_every=1, save_every=4, nonfinite_patience=3)
    loop, loader, checkpoints = tiny_loop(tiny_llama, tmp_path, cfg)
    poison(loop.model, {5, 6, 7})  # steps 5-7: three in a row after the checkpoint at step 4
    lr_at_4 = {}

    def note_lr(result):
        if result.steps == 4:
            lr_at_4["lr"] = loop.optimizer.param_groups[0]["lr"]
        return None

    result = fit(loop, loader, Hooks(should_stop=note_lr, checkpoints=checkpoints))
    assert result.rollbacks == 1 and result.lr_scale == 0.5 and result.nonfinite_steps == 3
    assert result.steps == 10  # steps 5-10 were trained again after the rollback
    assert checkpoint.all_finite(loop.model)
    assert loop.scheduler.base_lrs[0] == pytest.approx(0.5 * 1e-2)
    # After the rollback to step 4, the next step ran at half step 5's planned rate.
    step5 = [log for log in result.logs if log.step == 5]
    assert step5[-1].lr < lr_at_4["lr"]


def test_nans_without_a_checkpoint_stop_with_a_clear_error(tmp_path, tiny_llama):
    cfg = TrainConfig(max_steps=6, micro_batch_size=2, log_every=1, nonfinite_patience=2)
    loop, loader, checkpoints = tiny_loop(tiny_llama, tmp_path, cfg)
    poison(loop.model, {2, 3})
    with pytest.raises(UserError, match="not finite for 2 steps in a row.*set train.save_every"):
        fit(loop, loader, Hooks(checkpoints=checkpoints))
    assert checkpoint.all_finite(loop.model)  # the skipped steps changed nothing


def test_out_of_memory_halves_the_micro_batch_with_the_same_effective_batch(tmp_path, tiny_llama):
    auto = TrainConfig(max_steps=5, micro_batch_size=4, lr=1e-2, auto_micro_batch=True)
    loop, loader, _ = tiny_loop(tiny_llama, tmp_path, auto)
    refuse_batches_over(loop.model, 1)
    result = fit(loop, loader)
    assert result.steps == 5 and result.micro_batch_splits == 4
    assert [(e["micro_batch_before"], e["micro_batch_after"]) for e in result.memory_events] == [(4, 2), (2, 1)]
    assert result.tokens == 5 * 4 * 16  # every block of every step was trained on

    # The same rows in the same steps as asking for micro-batches of 1 x 4 accumulation.
    small = TrainConfig(max_steps=5, micro_batch_size=1, grad_accum=4, lr=1e-2)
    plain, plain_loader, _ = tiny_loop(tiny_llama, tmp_path, small)
    fit(plain, plain_loader)
    for a, b in zip(loop.params, plain.params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_out_of_memory_without_auto_micro_batch_says_what_to_set(tmp_path, tiny_llama):
    cfg = TrainConfig(max_steps=2, micro_batch_size=4)
    loop, loader, _ = tiny_loop(tiny_llama, tmp_path, cfg)
    refuse_batches_over(loop.model, 2)
    with pytest.raises(UserError, match="out of memory at step 1 with 4 blocks.*train.auto_micro_batch=true"):
        fit(loop, loader)


def test_cpu_memory_guard_stops_when_nothing_fits(tmp_path, tiny_llama):
    cfg = TrainConfig(max_steps=2, micro_batch_size=4, auto_micro_batch=True, max_memory_gb=0.001)
    loop, loader, _ = tiny_loop(tiny_llama, tmp_path, cfg)
    with pytest.raises(UserError, match="memory guard at step 1 with 1 blocks.*does not fit even one block"):
        fit(loop, loader)
    assert [e["micro_batch_after"] for e in loop.result.memory_events] == [2, 1]


def test_checkpoint_round_trip_restores_every_state(tmp_path, tiny_llama):
    cfg = TrainConfig(max_steps=6, micro_batch_size=2, lr=1e-2, save_every=3)
    loop, loader, checkpoints = tiny_loop(tiny_llama, tmp_path, cfg, lora=True)
    fit(loop, loader, Hooks(checkpoints=checkpoints))
    state = checkpoint.load(tmp_path / rundir.CHECKPOINT_FILE)
    assert state["loop"]["steps"] == 6 and len(state["weights"]) == len(loop.params)
    assert all("lora_" in name for name in state["weights"])  # an adapter checkpoint is the adapter

    fresh, fresh_loader, fresh_checkpoints = tiny_loop(tiny_llama, tmp_path, cfg, lora=True)
    fresh_checkpoints.resume(fresh, state)
    assert fresh.result.steps == 6 and fresh_loader.state_dict()["position"] == loader.state_dict()["position"]
    assert fresh.scheduler.last_epoch == loop.scheduler.last_epoch
    for a, b in zip(fresh.params, loop.params, strict=True):
        assert torch.equal(a, b)


def test_a_signal_at_the_last_step_resumes_to_a_finished_run(tmp_path, tiny_llama):
    """Found by the fault harness: SIGTERM seen at the last step wrote a checkpoint of a loop
    "stopped by interrupted", and every rerun, with no step left, ended interrupted again."""
    cfg = TrainConfig(max_steps=4, micro_batch_size=2, lr=1e-2)
    loop, loader, checkpoints = tiny_loop(tiny_llama, tmp_path, cfg)
    stop = Hooks(checkpoints=checkpoints, should_stop=lambda r: "interrupted" if r.steps == 4 else None)
    assert fit(loop, loader, stop).stopped_by == "interrupted"
    state = checkpoint.load(tmp_path / rundir.CHECKPOINT_FILE)
    assert state["loop"]["steps"] == 4 and state["loop"]["stopped_by"] == "interrupted"

    fresh, fresh_loader, fresh_checkpoints = tiny_loop(tiny_llama, tmp_path, cfg)
    fresh_checkpoints.resume(fresh, state)
    result = fit(fresh, fresh_loader, Hooks(checkpoints=fresh_checkpoints))
    assert result.steps == 4 and result.stopped_by is None  # finished: the rerun goes on to evaluate and save


def test_a_damaged_checkpoint_is_reported_not_loaded(tmp_path):
    bad = tmp_path / rundir.CHECKPOINT_FILE
    bad.write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(UserError, match="not a readable checkpoint.*delete it to restart"):
        checkpoint.load(bad)


def test_resume_point_decisions(tmp_path):
    run = tmp_path / "run"
    cfg = {"train": {"lr": 0.1}, "budget": {"time_s": None}, "output": {"overwrite": False}}
    assert rundir.resume_point(run, cfg, False, False) == rundir.ResumePoint()
    with pytest.raises(UserError, match="holds no checkpoint"):
        rundir.resume_point(run, cfg, False, True)
    ownership.Folder(run).claim(*rundir.RUN_ENTRIES)  # as a run claims them, before it writes them
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    (run / "metrics.jsonl").write_text("")
    assert rundir.resume_point(run, cfg, False, False).restart  # killed before a checkpoint
    (run / rundir.CHECKPOINT_FILE).write_bytes(b"")
    assert rundir.resume_point(run, cfg, False, False).checkpoint == run / rundir.CHECKPOINT_FILE
    longer = {**cfg, "budget": {"time_s": 60}}  # a budget may change on resume
    assert rundir.resume_point(run, longer, False, False).checkpoint == run / rundir.CHECKPOINT_FILE
    with pytest.raises(UserError, match=r"different config \(train.lr\)"):
        rundir.resume_point(run, {**cfg, "train": {"lr": 0.2}}, False, False)
    (run / "summary.json").write_text(json.dumps({"status": "completed"}))
    assert rundir.resume_point(run, cfg, False, False).finished  # the same command again: nothing to do
    with pytest.raises(UserError, match=r"holds a finished run \(completed\) with a different config \(train.lr\)"):
        rundir.resume_point(run, {**cfg, "train": {"lr": 0.2}}, False, False)
    # output.overwrite on a run of ecoadapt's: start again, removing what ecoadapt wrote there.
    assert rundir.resume_point(run, cfg, True, False) == rundir.ResumePoint(restart=True)
    # The same files without the record of them are nobody's to remove: refused.
    (run / ownership.MANIFEST).unlink()
    with pytest.raises(UserError, match="holds files ecoadapt did not write"):
        rundir.resume_point(run, cfg, True, False)


def test_not_enough_disk_is_reported_before_training(tmp_path):
    with pytest.raises(UserError, match=rf"{tmp_path} has .* GiB free, the checkpoints need about"):
        rundir.check_room(tmp_path / "run" / "deeper", 10**18, "the checkpoints")
    rundir.check_room(tmp_path / "run", 1, "the checkpoints")  # a byte fits


def test_adapt_refuses_a_disk_without_room_and_writes_nothing(tmp_path, tiny_bert, corpus_jsonl, capsys, monkeypatch):
    path = write_config(tmp_path, tiny_bert, corpus_jsonl, train={"save_every": 2})

    # The run's filesystem holds 1 KiB: the checkpoints of even a tiny BERT do not fit.
    def disk_usage(p):
        return type("U", (), {"free": 1024 if Path(p) == tmp_path else 10**12})()

    monkeypatch.setattr(rundir.shutil, "disk_usage", disk_usage)
    assert main(["adapt", str(path)]) == 2
    assert "GiB free, the checkpoints and the saved model need about" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    # The token store's disk: checked before anything is tokenized.
    monkeypatch.setattr(rundir.shutil, "disk_usage", lambda p: type("U", (), {"free": 1024})())
    assert main(["adapt", str(path), "--set", f"data.cache_dir={tmp_path / 'elsewhere'}"]) == 2
    err = capsys.readouterr().err
    assert "elsewhere has 0.00 GiB free; the tokenized corpus needs about" in err and "data.cache_dir" in err
    assert not (tmp_path / "run").exists()
