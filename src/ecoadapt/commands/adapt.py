"""`ecoadapt adapt`: continued pre-training from config to run directory, as a recipe of steps.

    prepare   model, corpus, what trains, precision (before anything is written)
    evaluate  held-out loss before training
    train     the loop, with budgets, signals, periodic evaluation and checkpoints
    evaluate  held-out loss after training
    save      the adapter or the model
    measure   energy, memory and MFU of each window, for the whole job
    task      the downstream task, base vs adapted (rank 0)
    summary   summary.json, written last

Every check that can fail on bad input runs before the run directory is created; from then on a
failure still writes ``summary.json`` with ``status: failed`` and the error. Under data
parallelism every rank runs this same recipe on its shard; rank 0 alone prints and writes.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import os
import time
from pathlib import Path
from typing import Any

import torch

from ecoadapt.commands import finish, run_summary
from ecoadapt.commands.run_summary import Measured, Training
from ecoadapt.config import RunConfig, dump, paths
from ecoadapt.core import storage
from ecoadapt.core.errors import UserError
from ecoadapt.core.progress import Progress, say
from ecoadapt.data import readers
from ecoadapt.data.batches import BlockLoader
from ecoadapt.forecast.first_steps import FirstSteps
from ecoadapt.measure import energy, environment, memory
from ecoadapt.measure.budget import Budget
from ecoadapt.measure.phases import Phases
from ecoadapt.model import export, parallel, pretrained
from ecoadapt.model import precision_choice as precision_choice_module
from ecoadapt.results import rundir
from ecoadapt.results.summary import RunSummary
from ecoadapt.results.trackers import Trackers
from ecoadapt.task import base_cache, downstream, harness
from ecoadapt.train import checkpoint, head_first, micro_batch
from ecoadapt.train.early_stop import EarlyStop, TargetLoss
from ecoadapt.train.heldout import HeldOut, heldout
from ecoadapt.train.interrupt import Interrupts
from ecoadapt.train.loop import Hooks, Loop, StepLog, TrainResult, each, fit, total_steps
from ecoadapt.train.micro_batch import MicroBatchChoice
from ecoadapt.train.prepare import mfu, prepare
from ecoadapt.train.stopping import StopRule

GENERAL_PAIRS = 16  # batches the general text is split into at least, for the paired interval


def adapt(cfg: RunConfig, base: Path | None = None) -> RunSummary:
    """Run continued pre-training as ``cfg`` says and return the summary (also in summary.json).

    Args:
        cfg: the checked configuration.
        base: the config file's folder (relative corpus paths are looked up there first).

    Raises:
        UserError: bad input found before the run directory is created.
    """
    paths.anchor_task_files(cfg, base)  # before anything compares or records the config
    environment.read_before_loading()
    out = Path(cfg.output.dir)
    # Cheap checks first: a typo in a path fails in milliseconds, not after loading a model.
    rank = int(os.environ.get("RANK", "0"))  # torchrun's; the process group starts later
    precision_choice = _auto_precision(cfg)
    hold = contextlib.ExitStack()  # rank 0's lock on the run folder, from the resume decision on
    try:
        return _decide_and_run(cfg, base, out, rank, precision_choice, hold)
    finally:
        hold.close()


def _decide_and_run(
    cfg: RunConfig,
    base: Path | None,
    out: Path,
    rank: int,
    precision_choice: dict[str, Any] | None,
    hold: contextlib.ExitStack,
) -> RunSummary:
    """The resume decision, taken under the folder's lock where there is a folder (two runs
    started together on it cannot both resume it), then the run."""
    locked = rank == 0 and out.is_dir()
    if locked:
        hold.enter_context(rundir.locked(out))
    unlocked_main = rank == 0 and not locked
    resume = rundir.resume_point(out, cfg.to_dict(), cfg.output.overwrite, cfg.output.resume, unlocked_main)
    if resume.finished:  # the same command again: nothing left to do
        if locked:
            finish.clean_up(out)
        say(f"{out}: this run has finished; its summary is kept (--set output.overwrite=true runs it again)")
        return RunSummary.from_dir(out)
    if resume.after_training:
        if rank != 0:  # the task and the summary are rank 0's
            return RunSummary(status="completed", config=cfg.to_dict(), rank=rank)
        return finish.resume_after_training(cfg, out)
    readers.resolve(cfg.data.train, base)
    # A hub id is fetched here, once, before anything else (a GGUF file is converted in the load's window).
    pretrained.resolve_model(cfg.model, lean=False)
    if cfg.task.train:  # every record, before an adaptation that a bad task file would waste
        downstream.check(cfg.task)
    if cfg.task.harness:  # every task loads and its data reads, likewise
        harness.check(cfg.task)
    world, device = parallel.setup(cfg.parallel.strategy, cfg.train.device, cfg.parallel.timeout_s)
    if world.strategy == "fsdp" and cfg.lora.merge:
        raise UserError("lora.merge is not available with parallel.strategy = fsdp; merge the saved adapter afterwards")
    adapt_run = None
    try:
        adapt_run = AdaptRun(cfg, world, device, base, precision_choice, hold if locked else None)
        return adapt_run.execute(out, resume)
    finally:
        if adapt_run is not None:
            adapt_run.release_wrapper()
        parallel.teardown(barrier=False)  # after an error a peer may never reach a barrier


def _auto_precision(cfg: RunConfig) -> dict[str, Any] | None:
    """precision.mode: auto resolved in ``cfg`` before anything compares configs; its matmul
    probe (a CPU's, measured once and cached) metered in the window of the same benchmark MFU
    uses, ``peak_flops``, whose joules the run then reports as its own overhead."""
    if cfg.precision.mode != "auto":
        return None
    device = parallel.pick_device(cfg.train.device)
    tracker = energy.EnergyTracker.for_config(cfg.measure, device.type, device.index, 0, say)
    with Phases(tracker).window("peak_flops", memory=None):
        choice = precision_choice_module.resolve(cfg, device)
    assert choice is not None
    return {**choice, "energy_windows": tracker.snapshot()}


class AdaptRun:
    """One adapt run on one rank: the steps of the recipe, and the state they share.

    Constructing it prepares the run (meters, the model, the corpus's blocks, the recipe:
    nothing is written yet); every attribute is created here. :meth:`execute` then opens the
    run folder and runs the steps in order: evaluate, train, evaluate, save, measure, then the
    judges and the summary (:mod:`ecoadapt.commands.finish`).
    """

    def __init__(
        self,
        cfg: RunConfig,
        world: parallel.World,
        device: torch.device,
        base: Path | None = None,
        precision: dict[str, Any] | None = None,
        hold: contextlib.ExitStack | None = None,
    ) -> None:
        """Prepare the run.

        Args:
            cfg: the checked configuration.
            world: this rank's place in the job.
            device: where it trains.
            base: the config file's folder (relative corpus paths are looked up there first).
            precision: precision.mode: auto's choice, with its probe's energy windows.
            hold: the run folder's lock, when the resume decision took it.
        """
        self.cfg, self.world, self.device = cfg, world, device
        # The meters, first: loading the model is in their windows.
        self.tracker = energy.EnergyTracker.for_config(
            cfg.measure, device.type, device.index, world.local_rank, self.log
        )
        self.memory = memory.MemoryWindows(device)
        self.phases = Phases(self.tracker, self.memory)
        self.precision_choice = precision  # precision.mode: auto's choice
        if precision is not None:  # its matmul probe's joules: the tool's own, in the run's account
            self.tracker.carry(precision.pop("energy_windows", {}))
        # What the steps fill in as they run.
        self.first_steps: FirstSteps | None = None  # the in-run forecast's watcher, once training starts
        self.batch_choice: MicroBatchChoice | None = None  # train.micro_batch_size: auto's choice
        self.trackers = Trackers([], Path(), "", "", {})  # log.to, opened with the run directory
        self.summary = RunSummary(status="failed", config=cfg.to_dict(), rank=world.rank)
        self.run_dir = Path(cfg.output.dir)
        self._input_ids: dict[str, str] | None = None  # what _inputs() found, once
        # The run folder's lock, held by rank 0 while the run uses it (taken for the resume
        # decision where the folder existed, else when it is created).
        self._locked = hold is not None
        self._hold = hold if hold is not None else contextlib.ExitStack()
        # The prepared run: model, blocks, recipe.
        if device.type == "cuda" and cfg.train.max_memory_gb is not None:
            memory.cap_cuda_memory(device, cfg.train.max_memory_gb)
        if cfg.measure.idle_s > 0:
            self.log(f"measuring idle power for {cfg.measure.idle_s:g} s ...")
            self.log(f"idle power: {self.tracker.measure_idle(cfg.measure.idle_s):.1f} W")
        self.p = prepare(cfg, base, device, world, self.tracker, self.log, self.memory)
        self.eval_blocks = self.p.blocks.eval[: cfg.data.eval_max_blocks]
        self.steps = total_steps(cfg.train, len(self.p.blocks.train) // world.size)

    def log(self, message: str) -> None:
        """A line of narration, from rank 0 only."""
        if self.world.is_main:
            say(message)

    def execute(self, out: Path, resume: rundir.ResumePoint) -> RunSummary:
        """Open the run folder and run the recipe; a failure once the folder exists is summarised."""
        try:
            return self._execute(out, resume)
        finally:
            self.p.recipe.policy.restore()  # process-wide TF32 settings as they were
            self._hold.close()  # the run folder's lock

    def _execute(self, out: Path, resume: rundir.ResumePoint) -> RunSummary:
        resumed = checkpoint.load(resume.checkpoint) if resume.checkpoint is not None else None
        if resumed is not None:
            self._check_inputs(resumed["extra"].get("inputs"))
        if self.world.is_main:
            r = self.p.recipe
            room = checkpoint.room_needed(self.cfg, r.model, r.policy, r.plan.lora)
            rundir.check_room(out, room, "the checkpoints and the saved model")
        self._open_run_dir(out, resume, resumed)
        try:
            return self._recipe(resumed)
        except BaseException as e:
            if self.world.is_main:
                self.summary.status, self.summary.error = "failed", f"{type(e).__name__}: {e}"
                self.summary.environment = environment.describe(self.device)
                self.summary.save(self.run_dir / "summary.json")
                self.trackers.finish(self.summary)
            raise

    def _inputs(self) -> dict[str, str]:
        """What the run trains on, by content: the corpus's token store and the model's files."""
        if self._input_ids is None:
            store = Path(self.p.blocks.stats["store"]).name  # its name is the key of its contents
            self._input_ids = {"corpus token store": store, "model files": base_cache.model_identity(self.cfg.model)}
        return self._input_ids

    def _check_inputs(self, recorded: dict[str, str] | None) -> None:
        """A checkpoint resumes only on the corpus and model it was made on.

        Raises:
            UserError: naming what changed since the checkpoint.
        """
        if recorded is None:  # a checkpoint of an earlier version: nothing to compare
            return
        changed = [what for what, key in self._inputs().items() if recorded.get(what) != key]
        if changed:
            raise UserError(
                f"output.dir: {self.cfg.output.dir} holds a checkpoint made on other {' and '.join(changed)} "
                "(edited in place, or a new snapshot); restore them to resume, or --set output.overwrite=true "
                "to start again"
            )

    def _open_run_dir(self, out: Path, resume: rundir.ResumePoint, resumed: dict[str, Any] | None) -> None:
        if self.world.is_main and not self._locked and resumed is not None:
            self._hold.enter_context(rundir.locked(out))  # before anything in it is removed
        if resumed is not None:
            at = int(resumed["loop"]["steps"])
            self.log(f"resuming from the checkpoint at step {at} of {self.steps}")
            if self.world.is_main:
                rundir.truncate_jsonl(out / "metrics.jsonl", at)
                (out / "summary.json").unlink(missing_ok=True)  # the interrupted one: no longer true
            self.tracker.carry(resumed["extra"]["energy_windows"])
            self.summary.resumed_from_step = at
        elif self.world.is_main:
            if not self._locked:  # the folder was made while this run prepared: is the decision still true?
                self._hold.enter_context(rundir.locked(out))
                again = rundir.resume_point(out, self.cfg.to_dict(), self.cfg.output.overwrite, False, False)
                if again != resume:
                    raise UserError(
                        f"output.dir: {out} was taken by another run started at the same time; "
                        "rerun the same command once it has ended"
                    )
            rundir.create(out, resume.restart)
            storage.atomic_write_text(out / "config.yaml", dump(self.cfg))
        self.run_dir = out
        if self.world.is_main:
            log = self.cfg.log
            self.trackers = Trackers(log.to, out, out.name, log.project, self.cfg.to_dict())

    def _recipe(self, resumed: dict[str, Any] | None) -> RunSummary:
        before = (
            HeldOut.from_dict(resumed["extra"]["before"])
            if resumed is not None
            else self.evaluate("eval", general=True)
        )
        self.log(f"held-out loss before: {before.loss:.4f}")
        training = self.train(before, resumed)
        result = training.result
        if result.stopped_by == "interrupted":
            return run_summary.interrupted(self, training)
        if result.stopped_by:
            self.log(
                f"stopped by {result.stopped_by} after {result.steps} of {self.steps} steps; evaluating and saving"
            )
        # A signal from here to the record that training is done lets each phase finish (they
        # take seconds): the model is saved, and the rerun goes on with the task.
        with Interrupts() as late:
            after = self.evaluate("eval_after", general=True)
            self.log(f"held-out loss after: {after.loss:.4f} (before {before.loss:.4f})")
            if before.general is not None and after.general is not None:
                self.log(f"general-text loss after: {after.general.loss:.4f} (before {before.general.loss:.4f})")
            saved = self.save()
            measured = self.measure(result)
            # All ranks leave the process group together, here: rank 0 may go on alone for a long
            # time (the task), and a worker that exits while its peer still holds the group can
            # abort in gloo's threads.
            self.release_wrapper()
            parallel.teardown(barrier=True)
            if not self.world.is_main:
                return RunSummary(status="completed", config=self.summary.config, rank=self.world.rank)
            job_energy = copy.deepcopy(measured.energy)  # before the task joins it
            run_summary.fill(self, training, before, after, saved, measured)
            if self.first_steps is not None:
                self.summary.forecast = self.first_steps.beside_measured(self.summary)
            judge_inputs = self._judge_inputs(saved)
            finish.record_trained(self.run_dir, self.summary, job_energy)
            (self.run_dir / rundir.CHECKPOINT_FILE).unlink(missing_ok=True)  # phases.json resumes from here on
        if late.received is not None and self.cfg.task.judged:
            return run_summary.interrupted_after_training(self, late.name or "SIGTERM")
        return finish.finish(self.cfg, self.run_dir, self.summary, job_energy, judge_inputs, self.trackers)

    def _judge_inputs(self, saved: list[str]) -> finish.JudgeInputs | None:
        """What the judges need: the tokenizer, the adapted weights on demand (the whole LM's
        when the harness judges), the device, the meter."""
        if not self.cfg.task.judged:
            return None
        whole = bool(self.cfg.task.harness)
        backbone = self._backbone(saved, whole)
        if backbone is not None and not saved:  # a resumed task needs it, and nothing else holds it
            finish.keep_backbone(self.run_dir, backbone)
        if backbone is None and not saved:
            return None
        get = (lambda: backbone) if backbone is not None else (lambda: downstream.adapted_backbone(self.cfg, whole))
        return finish.JudgeInputs(self.p.loaded.tokenizer, get, self.device, self.tracker)

    # -- the steps --------------------------------------------------------------------------

    def evaluate(self, window: str, within: str | None = None, general: bool = False) -> HeldOut:
        """Held-out loss now, in its own energy and memory windows; with ``general``, the general
        text's too (data.general_eval), in the same window.

        Every rank evaluates every held-out block: no communication, and the numbers are those
        a single process gets (FSDP needs all ranks in each forward pass anyway).
        """
        r, objective, rows = self.p.recipe, self.p.loaded.objective, micro_batch.eval_rows(self.cfg, self.device)
        with self.phases.window(window, within=within, memory="eval"):
            domain = heldout(r.model, self.eval_blocks, objective, r.mask, rows, r.policy, self.device)
            g = self.p.general
            if not general or g is None:
                return domain
            # Smaller batches when there are few blocks: the change before/after pairs by batch.
            rows = max(1, min(rows, len(g.blocks) // GENERAL_PAIRS))
            return domain.with_general(heldout(r.model, g.blocks, objective, r.mask, rows, r.policy, self.device))

    def train(self, before: HeldOut, resumed: dict[str, Any] | None) -> Training:
        """The training loop (after the head-first steps, if any) in its own energy and memory
        windows (closed however training ends)."""
        with self.phases.window("train", clock=self.p.recipe.compiled):
            return self._train_in_window(before, resumed)

    def _train_in_window(self, before: HeldOut, resumed: dict[str, Any] | None) -> Training:
        cfg, p, r, world = self.cfg, self.p, self.p.recipe, self.world
        head = head_first.train_head(cfg, self.p, self.device, self.log) if resumed is None else None
        torch.manual_seed(cfg.train.seed)  # dropout masks depend on the seed alone
        objective, rows = p.loaded.objective, cfg.train.micro_batch_size
        loader = BlockLoader(p.blocks.train, rows, objective, r.mask, cfg.train.seed, world.rank, world.size)
        loop = Loop.create(r.model, self.steps, cfg.train, r.policy, objective, self.device, world.size, p.loaded.fresh)
        stopper = EarlyStop(cfg.train.early_stop, cfg.train.early_stop_delta)
        target = TargetLoss(cfg.train.target_loss) if cfg.train.target_loss is not None else None
        checkpoints = None
        if world.strategy != "fsdp":  # FSDP shards would need a distributed checkpoint format
            checkpoints = checkpoint.RunCheckpoints(
                self.run_dir / rundir.CHECKPOINT_FILE,
                loader,
                world.is_main,
                lambda: {
                    "before": before.as_dict(),
                    "energy_windows": self.tracker.snapshot(),
                    "early_stop": stopper.state(),
                    "inputs": self._inputs(),
                },
            )
        if resumed is not None:
            assert checkpoints is not None
            checkpoints.resume(loop, resumed)
            stopper.load_state(resumed["extra"]["early_stop"])
        self.batch_choice = micro_batch.choose(
            cfg, parallel.unwrap(r.model), r.policy, self.device, self.steps - loop.result.steps,
            r.compiled.what == "blocks" and r.compiled.fallback is None, world.size,
        )  # fmt: skip
        budget = Budget(cfg.budget, self._job_training_joules, self.steps, self.log, tokens_scale=world.size)
        progress = Progress(self.steps) if world.is_main else None
        with Interrupts() as interrupts:
            rule = StopRule(world, interrupts, budget, self._periodic_eval, cfg.train.eval_every, stopper, target)
            watch = self._watch_first_steps()
            hooks = Hooks(lambda record: self._on_log(record, progress), rule, checkpoints)
            hooks.after_step = each(*(w.after_step for w in (watch, self.batch_choice) if w is not None))
            if self.batch_choice is not None:
                hooks.before_step = self.batch_choice.before_step
            if watch is not None:
                watch.start()
            try:
                result = fit(loop, loader, hooks)
            finally:
                if progress is not None:
                    progress.close()
        return Training(result, loader, budget, stopper, interrupts, checkpoints, head, target)

    def _watch_first_steps(self) -> FirstSteps | None:
        """The in-run forecast's watcher of the first steps (measure.forecast, one process)."""
        if not self.cfg.measure.forecast or self.world.size > 1:
            return None
        recipe = self.p.recipe
        self.first_steps = FirstSteps(
            self.cfg, self.steps, self.tracker, self.memory, self.device, parallel.unwrap(recipe.model), recipe.policy,
            lambda: recipe.compiled.compile_s, self.p.rss_before_load, self.log,
        )  # fmt: skip
        return self.first_steps

    def _job_training_joules(self) -> float:
        """Training joules so far, summed over every rank (a collective under parallelism)."""
        return parallel.all_sum(self.tracker.running("train"), self.world, self.device)

    def _on_log(self, record: StepLog, progress: Progress | None) -> None:
        line: dict[str, Any] = dict(record.__dict__)
        # The same condition on every rank: the sum is a collective, and a rank without a meter
        # of its own (RAPL is read by local rank 0 alone) still takes part, adding 0 J.
        if self.cfg.measure.energy != "off":  # cumulative training energy of the job
            line["energy_j"] = self._job_training_joules()  # every rank logs at the same steps
            line["energy_method"] = self.tracker.method
        if progress is not None:
            storage.append_jsonl(self.run_dir / "metrics.jsonl", line)
            self.trackers.log(line, record.step)
            progress.update(record.step, record.loss, record.tokens_per_s)

    def _periodic_eval(self, result: Any) -> float:
        t0 = time.perf_counter()
        scores = self.evaluate("eval_periodic", within="train")
        result.excluded_s += time.perf_counter() - t0  # evaluation is not training time
        if self.world.is_main:
            storage.append_jsonl(self.run_dir / "metrics.jsonl", {"step": result.steps, "eval_loss": scores.loss})
            self.trackers.log({"eval_loss": scores.loss}, result.steps)
        self.log(f"[eval] step {result.steps}: held-out loss {scores.loss:.4f}")
        return scores.loss

    def save(self) -> list[str]:
        """The adapter or model into the run directory (gathered from the shards under FSDP)."""
        saved: list[str] = []
        with self.phases.window("save", memory=None) as window:
            gathered = parallel.full_state_dict(self.p.recipe.model, self.world)  # FSDP: a collective, on every rank
            if self.cfg.output.save_model and self.world.is_main:
                inner = parallel.unwrap(self.p.recipe.model)
                if not checkpoint.all_finite(inner):  # the step guards make this unreachable; never save NaN
                    raise RuntimeError("non-finite weights after training: not saved")
                saved = export.save(
                    inner, self.p.loaded.tokenizer, self.run_dir, self.p.recipe.plan.lora, self.cfg.lora.merge, gathered
                )
        self.p.phases["save_s"] = window.seconds
        return saved

    def measure(self, result: TrainResult) -> Measured:
        """Energy, memory and MFU of the job (collectives: every rank calls it)."""
        with self.phases.window("peak_flops", memory=None):  # the tool's own: measured once per device
            per_rank_mfu = mfu(self.p, self.cfg, self.device, result.tokens / max(result.time_s, 1e-9))
        return Measured(
            memory=memory.combine_ranks(parallel.gather(self.memory.report(self.p.rss_before_load), self.world)),
            energy=energy.combine_ranks(
                parallel.gather(self.tracker.summary(self.cfg.measure.grid_g_co2_per_kwh), self.world)
            ),
            flops=per_rank_mfu,
            tokens_per_s=result.tokens * self.world.size / max(result.time_s, 1e-9),
        )

    def release_wrapper(self) -> None:
        """Drop DDP's wrapper while the group lives: freed after it, gloo's destructor deadlocked
        on the GIL at a rank's exit. The model stays (the task reads it)."""
        if self.world.distributed:
            self.p.recipe.model = parallel.unwrap(self.p.recipe.model)
            gc.collect()

    def _backbone(self, saved: list[str], whole: bool) -> dict[str, Any] | None:
        """The adapted weights for the judges (the backbone's, or ``whole`` the LM's): from
        memory, or (FSDP, which holds them in shards) as saved; None when FSDP saved nothing."""
        if self.world.strategy != "fsdp":
            return downstream.backbone_state(parallel.unwrap(self.p.recipe.model), whole)
        if not saved:
            self.log(
                "note: with FSDP the task reads the saved model; output.save_model is off: run `ecoadapt evaluate`"
            )
        return None
