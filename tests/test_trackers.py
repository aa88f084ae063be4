"""log.to (issue 28): the records of metrics.jsonl and the summary's headline reach the
dashboards users watch, read back from the real libraries' local stores."""

import json
import sqlite3
import struct
import sys

import pytest

from ecoadapt.core.errors import UserError
from ecoadapt.results.trackers import Trackers, numbers
from helpers.runs import adapt_summary


def run_sets(tmp_path, model, corpus, trackers):
    return {
        "model.name_or_path": model, "data.train": corpus, "data.text_field": "caption", "data.max_seq_len": 16,
        "train.max_steps": 4, "train.micro_batch_size": 4, "train.log_every": 2, "train.eval_every": 2,
        "measure.energy": "estimate", "measure.forecast": False, "output.save_model": False,
        "output.dir": tmp_path / "run", "log.to": json.dumps(trackers), "log.project": "eco-test",
    }  # fmt: skip


def test_numbers_flatten_records_and_leave_out_labels():
    assert numbers({"loss": 1.5, "step": 2, "energy_method": "estimated", "ok": True, "m": {"a": 1}}) == {
        "loss": 1.5, "step": 2.0, "m/a": 1.0,
    }  # fmt: skip


def test_a_tracker_whose_library_is_missing_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # what Python does for a package that is not there
    with pytest.raises(UserError, match=r"log.to: wandb needs its library: pip install wandb"):
        Trackers(["wandb"], tmp_path, "run", "p", {})


def test_tensorboard_gets_every_record_and_the_headline(tmp_path, tiny_llama, corpus_jsonl):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    summary = adapt_summary(tmp_path, run_sets(tmp_path, tiny_llama, corpus_jsonl, ["tensorboard"]))
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert {"loss", "lr", "tokens_per_s", "energy_j", "eval_loss"} <= set(scalars)
    assert [e.step for e in events.Scalars("loss")] == [2, 4] and [e.step for e in events.Scalars("eval_loss")] == [
        2,
        4,
    ]
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [r["loss"] for r in records if "loss" in r]
    assert [e.value for e in events.Scalars("loss")] == pytest.approx(logged, rel=1e-6)
    train_joules = events.Scalars("summary/train_joules")[0].value
    assert train_joules == pytest.approx(summary["energy"]["train_joules"], rel=1e-6)
    assert "summary/energy_method/text_summary" in events.Tags()["tensors"]  # the label beside the joules


def test_mlflow_gets_every_record_and_the_headline(tmp_path, tiny_llama, corpus_jsonl, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    store = tmp_path / "mlruns"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # the plain-files store: nothing to install
    summary = adapt_summary(tmp_path, run_sets(tmp_path, tiny_llama, corpus_jsonl, ["mlflow"]))
    client = mlflow.tracking.MlflowClient(tracking_uri=store.as_uri())
    experiment = client.get_experiment_by_name("eco-test")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "run" and run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [2, 4]
    assert run.data.metrics["summary/mj_per_token"] == pytest.approx(summary["energy"]["mj_per_token"], rel=1e-6)
    assert run.data.tags["energy_method"] == "estimated" and run.data.params["train/max_steps"] == "4"


def wandb_records(path):
    """The history rows and summary updates of an offline W&B run file (a LevelDB-style log of
    the Record protobufs W&B syncs later; no reader ships with the library)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, chunks, records = path.read_bytes(), 7, 32768, b"", []  # 7: W&B's header
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunks, pos = chunks + data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(chunks)
            records.append(record)
            chunks = b""
        elif kind == 0:
            break

    def items(entries):
        return {e.key or "/".join(e.nested_key): json.loads(e.value_json) for e in entries}

    history = [items(r.history.item) for r in records if r.WhichOneof("record_type") == "history"]
    summary = [items(r.summary.update) for r in records if r.WhichOneof("record_type") == "summary"]
    return history, summary


def test_wandb_offline_gets_every_record_and_the_headline(tmp_path, tiny_llama, corpus_jsonl, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    summary = adapt_summary(tmp_path, run_sets(tmp_path, tiny_llama, corpus_jsonl, ["wandb"]))
    (run_file,) = (tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb")
    history, updates = wandb_records(run_file)
    losses = {row["_step"]: row["loss"] for row in history if "loss" in row}
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert losses == pytest.approx({r["step"]: r["loss"] for r in records if "loss" in r})
    headline = next(u for u in updates if "mj_per_token" in u)
    assert headline["mj_per_token"] == pytest.approx(summary["energy"]["mj_per_token"])
    assert headline["energy_method"] == "estimated"


def test_trackio_gets_every_record_and_the_headline(tmp_path, tiny_llama, corpus_jsonl, monkeypatch):
    store = tmp_path / "trackio"
    monkeypatch.setenv("TRACKIO_DIR", str(store))  # read when trackio is first imported
    pytest.importorskip("trackio")
    import trackio.sqlite_storage
    import trackio.utils

    for module in (trackio.utils, trackio.sqlite_storage):  # and if it was imported before
        monkeypatch.setattr(module, "TRACKIO_DIR", store)
    summary = adapt_summary(tmp_path, run_sets(tmp_path, tiny_llama, corpus_jsonl, ["trackio"]))
    with sqlite3.connect(store / "eco-test.db") as db:
        rows = db.execute("select step, metrics from metrics where run_name = 'run' order by step").fetchall()
    logged = [(step, json.loads(metrics)) for step, metrics in rows]
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(s, m["loss"]) for s, m in logged if "loss" in m] == [
        (r["step"], r["loss"]) for r in records if "loss" in r
    ]
    assert [s for s, m in logged if "eval_loss" in m] == [2, 4]
    headline = next(m for _, m in logged if "summary/mj_per_token" in m)
    assert headline["summary/mj_per_token"] == pytest.approx(summary["energy"]["mj_per_token"])
