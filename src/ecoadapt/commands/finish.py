"""The adapt recipe's last phase: the downstream task and the final summary, resumable.

Once training has ended and the model is saved, the run records that in ``phases.json`` (the
summary so far, and the job's energy before the task). From there a kill loses nothing that
is done: a rerun of the same command finds ``phases.json`` and comes straight here, without
loading the training set or training again; the task goes on from the seed it was on (each
scored seed is recorded in ``task_seeds.jsonl`` as it ends), and the final ``summary.json`` is
written as an uninterrupted run writes it.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ecoadapt.config import RunConfig
from ecoadapt.core import storage
from ecoadapt.core.progress import say
from ecoadapt.measure import energy
from ecoadapt.measure.energy import EnergyTracker
from ecoadapt.measure.phases import Phases
from ecoadapt.model import pretrained
from ecoadapt.model.parallel import pick_device
from ecoadapt.reports import model_card
from ecoadapt.results import rundir
from ecoadapt.results.judged import HarnessResult, Judged, JudgedT, TaskResult
from ecoadapt.results.summary import RunSummary
from ecoadapt.results.trackers import Trackers
from ecoadapt.task import downstream, harness
from ecoadapt.train.interrupt import Interrupts
from ecoadapt.train.prepare import Prepared

PHASES_FILE = "phases.json"  # training and saving done: the summary so far
SEEDS_FILE = "task_seeds.jsonl"  # each task seed scored so far
HARNESS_FILE = "harness.jsonl"  # each model the harness scored so far
BACKBONE_DIR = ".task-backbone"  # the adapted backbone, for a task that must resume, when nothing was saved

Backbone = Callable[[], dict[str, Any]]


@dataclass
class JudgeInputs:
    """What the judges (the labelled task, the harness) need of a run.

    Attributes:
        tokenizer: the model's tokenizer.
        weights: the adapted weights on demand (from memory, or read from the run folder), read
            at most once.
        device: where the judges score.
        tracker: the energy tracker their windows are measured by.
    """

    tokenizer: Any
    weights: Backbone
    device: Any
    tracker: EnergyTracker


def record_trained(run_dir: Path, summary: RunSummary, job_energy: dict[str, Any] | None) -> None:
    """Record that training and saving are done (the summary so far, the job's energy)."""
    storage.write_json(run_dir / PHASES_FILE, {"summary": summary.to_dict(), "job_energy": job_energy})


def keep_backbone(run_dir: Path, backbone: dict[str, Any]) -> None:
    """Write the adapted backbone where a resumed task finds it (when no model was saved)."""
    from safetensors.torch import save

    seen: set[int] = set()
    tensors = {}
    for k, v in backbone.items():  # a tied head shares its embedding's storage, which safetensors refuses
        v = v.contiguous()
        tensors[k] = v.clone() if v.untyped_storage().data_ptr() in seen else v
        seen.add(v.untyped_storage().data_ptr())
    data = save(tensors)
    storage.atomic_write(run_dir / BACKBONE_DIR / "backbone.safetensors", lambda f: f.write(data))


def finish(
    cfg: RunConfig,
    run_dir: Path,
    summary: RunSummary,
    job_energy: dict[str, Any] | None,
    inputs: JudgeInputs | None,
    trackers: Trackers | None = None,
) -> RunSummary:
    """Run the judges the config names (the labelled task, the harness), then write model cards
    and the final summary.

    Args:
        summary: the summary filled with everything but the judges' results.
        job_energy: the job's energy section before the judges (every rank's, summed).
        inputs: what the judges need (None: nothing to judge with, as FSDP that saved nothing).
        trackers: log.to, open since training (None: opened here for the headline).
    """
    if cfg.task.judged and inputs is not None:
        tokenizer, device, tracker = inputs.tokenizer, inputs.device, inputs.tracker
        weights = _once(inputs.weights)  # read once (from disk, when resuming) for every judge
        seeds_file, harness_file = run_dir / SEEDS_FILE, run_dir / HARNESS_FILE
        try:
            with Interrupts() as interrupts:
                stop = interrupts.name_if_received
                if cfg.task.train:
                    summary.task = judge_in_window(
                        "task", tracker,
                        lambda: downstream.compare(cfg, tokenizer, weights(), device, tracker, seeds_file, stop),
                        _kept_failure("task", summary, TaskResult),
                    )  # fmt: skip
                if cfg.task.harness:
                    summary.harness = judge_in_window(
                        "harness", tracker,
                        lambda: harness.compare(cfg, tokenizer, weights(), device, tracker, harness_file, stop),
                        _kept_failure("harness", summary, HarnessResult),
                    )  # fmt: skip
        except (downstream.TaskStopped, harness.HarnessStopped) as e:  # phases.json and the records resume it
            summary.status, summary.signal = "interrupted", e.signal_name
            summary.save(run_dir / "summary.json")
            what = "the task stopped between seeds" if isinstance(e, downstream.TaskStopped) else e.args[0]
            say(f"{e.signal_name}: {what.removeprefix(e.signal_name + ': ')}; rerun the same command to finish it")
            return summary
        gain = summary.eval.loss_before - summary.eval.loss if summary.eval else None
        summary.energy = energy_summary(
            job_energy, {"task": summary.task, "harness": summary.harness}, summary.tokens or 0, gain
        )
    model_card.write(run_dir, summary)  # with the judges' results: they ran first
    summary.save(run_dir / "summary.json")
    if trackers is None:  # the task resumed in a new process: the headline goes to a new tracker run
        trackers = Trackers(cfg.log.to, run_dir, run_dir.name, cfg.log.project, cfg.to_dict())
    trackers.finish(summary)
    clean_up(run_dir)
    return summary


def _once(get: Backbone) -> Backbone:
    """``get``, called at most once (its value kept)."""
    kept: list[dict[str, Any]] = []

    def once() -> dict[str, Any]:
        if not kept:
            kept.append(get())
        return kept[0]

    return once


def clean_up(run_dir: Path) -> None:
    """Finished: what resuming needed is no longer needed (the model is saved). Also called
    when a finished run is found again, for a kill between its summary and this clean-up."""
    for name in (rundir.CHECKPOINT_FILE, PHASES_FILE, SEEDS_FILE, HARNESS_FILE):
        (run_dir / name).unlink(missing_ok=True)
    shutil.rmtree(run_dir / BACKBONE_DIR, ignore_errors=True)


def resume_after_training(cfg: RunConfig, run_dir: Path) -> RunSummary:
    """A rerun of a run killed after its model was saved: the task from the seed it was on,
    then the final summary; nothing is trained or saved again."""
    recorded = storage.read_json(run_dir / PHASES_FILE)
    summary = RunSummary.from_dict(recorded["summary"], str(run_dir / PHASES_FILE))
    summary.resumed_from_step = summary.steps
    say(f"resuming after training: {summary.steps} steps trained and the model saved; the task goes on")
    inputs = None
    if cfg.task.judged:
        device = pick_device(cfg.train.device)
        tracker = EnergyTracker.for_config(cfg.measure, device.type, device.index, 0, say)
        whole = bool(cfg.task.harness)
        weights = lambda: downstream.adapted_backbone(cfg, whole)  # noqa: E731
        inputs = JudgeInputs(pretrained.load_tokenizer(cfg.model), weights, device, tracker)
    return finish(cfg, run_dir, summary, recorded["job_energy"], inputs)


def judge_in_window(
    window_name: str,
    tracker: EnergyTracker,
    judge: Callable[[], JudgedT],
    on_failure: Callable[[Exception, dict[str, Any] | None], JudgedT] | None = None,
) -> JudgedT:
    """A judge's result (the labelled task's, the harness's) with the energy of its own window,
    plus what an earlier, killed attempt of it scored; a signal's stop propagates.

    Args:
        on_failure: turns any other failure and the failed window's energy (None if the window
            never opened) into a result; None: the failure propagates.
    """
    window = None
    try:
        with Phases(tracker).window(window_name, memory=None) as window:
            result = judge()
    except (downstream.TaskStopped, harness.HarnessStopped):
        raise
    except Exception as e:  # after training, a judge's failure must not lose the run: on_failure keeps it
        if on_failure is None:
            raise
        measured = window.energy if window is not None else None
        return on_failure(e, measured.as_dict() if measured is not None else None)
    assert window.energy is not None
    result.energy = _with_earlier_seeds(window.energy.as_dict(), result)
    return result


def _kept_failure(
    window_name: str, summary: RunSummary, failed: Callable[..., JudgedT]
) -> Callable[[Exception, dict[str, Any] | None], JudgedT]:
    """What a judge's failure becomes after training (``failed``: its result type, given status,
    error, retry and energy): the adaptation's measured sections are kept."""
    saved = bool(summary.model and summary.model.saved)
    retry = "ecoadapt evaluate CONFIG" if saved else "save the model (output.save_model) to retry"

    def failure(e: Exception, energy: dict[str, Any] | None) -> JudgedT:
        error = f"{type(e).__name__}: {e}"
        say(f"{window_name} failed: {error}; the adaptation's results are kept. Retry: ecoadapt evaluate CONFIG")
        return failed(status="failed", error=error, energy=energy, retry=retry)

    return failure


def _with_earlier_seeds(measured: dict[str, Any], result: Judged) -> dict[str, Any]:
    """A judge's window's energy plus that of what an earlier, killed attempt scored (the task's
    seeds, the harness's models)."""
    if isinstance(result, TaskResult):
        earlier = [x for s in result.per_seed for x in (s.base, s.adapted) if x is not None and x.get("recorded")]
    else:
        earlier = list(result.resumed_records)
    if not earlier:
        return measured
    return {
        **measured,
        "joules": measured["joules"] + sum(s.get("joules", 0.0) for s in earlier),
        "seconds": measured["seconds"] + sum(s.get("seconds", 0.0) for s in earlier),
        "resumed_seeds": len(earlier),
    }


def energy_summary(
    job: dict[str, Any] | None, judged: dict[str, Judged | None], tokens: int, loss_gain: float | None
) -> dict[str, Any] | None:
    """The job's energy with the judges' windows (``judged``: window name -> that judge's result,
    run on rank 0 after the ranks were summed)."""
    if job is None:
        return None
    windows = {name: result.energy for name, result in judged.items() if result is not None and result.energy}
    for name, measured in windows.items():
        job["phases"][name] = {k: measured[k] for k in ("joules", "seconds")}
    if windows:
        energy.with_totals(job)
    return energy.with_training_figures(job, tokens, loss_gain)


def notes(cfg: RunConfig, p: Prepared) -> list[str]:
    """What the user should know about how this run adapted."""
    notes = []
    if p.loaded.fresh:
        protected = []
        if cfg.train.head_first_steps:
            protected.append(f"trained alone first for {cfg.train.head_first_steps} steps")
        if cfg.train.body_lr_scale != 1.0:
            protected.append(f"the pretrained weights at {cfg.train.body_lr_scale:g} x train.lr")
        notes.append(
            f"the model had no trained head for this objective: {len(p.loaded.fresh)} parameter tensors were newly "
            "initialised ("
            + ("; ".join(protected) if protected else "no protection: see train.head_first_steps, train.body_lr_scale")
            + ")"
        )
    return notes
