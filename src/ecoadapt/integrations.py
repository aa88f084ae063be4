"""ecoadapt's measurement inside a ``transformers.Trainer`` script: ``EcoadaptCallback``.

For users who keep their own training scripts: the same energy meters with their labels
(measured or estimated), the training window's own peak memory (evaluation apart), tokens/s,
MFU, and the energy, time and token budgets, which stop training through
``control.should_training_stop``. It writes ``summary.json`` and ``metrics.jsonl`` in
ecoadapt's format, so ``ecoadapt report`` puts Trainer runs and ecoadapt runs in one table::

    trainer = Trainer(model=model, args=args, train_dataset=data,
                      callbacks=[EcoadaptCallback("runs/trainer", budget={"energy_j": 5000})])

Tokens are counted where the model sees them (a forward pre-hook: the attention mask's ones,
or every input id), so any data collator works; evaluation's forward passes open an
evaluation window that is kept out of training's time, energy and peak memory.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from ecoadapt.config import BudgetConfig, MeasureConfig, schema
from ecoadapt.core import storage
from ecoadapt.core.errors import UserError
from ecoadapt.core.progress import say
from ecoadapt.measure import energy, environment, flops, memory
from ecoadapt.measure.budget import BUDGETS, Budget
from ecoadapt.measure.phases import PhaseFigures, Phases
from ecoadapt.model.precision import DTYPES
from ecoadapt.results.rundir import truncate_jsonl
from ecoadapt.results.summary import EvalSummary, RunSummary


@dataclass
class _Progress:
    """What a budget reads (the Progressed protocol of ecoadapt.measure.budget)."""

    steps: int = 0
    tokens: int = 0
    time_s: float = 0.0
    stopped_by: str | None = None


class EcoadaptCallback(TrainerCallback):
    """Measure a Trainer run the way ``ecoadapt adapt`` measures its own.

    Args:
        output_dir: where summary.json and metrics.jsonl go (default: the Trainer's
            ``output_dir``/ecoadapt).
        measure: the ``measure`` section (a MeasureConfig or a dict of its keys): meter,
            estimator inputs, grid intensity, peak FLOP/s.
        budget: the ``budget`` section (BudgetConfig or dict): energy_j, time_s, tokens.
        name: the run's name in reports (default: the output folder's name).
    """

    def __init__(
        self,
        output_dir: str | Path | None = None,
        measure: MeasureConfig | dict[str, Any] | None = None,
        budget: BudgetConfig | dict[str, Any] | None = None,
        name: str | None = None,
    ) -> None:
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.measure = (
            measure if isinstance(measure, MeasureConfig) else schema.build(MeasureConfig, measure, "measure")
        )
        self.budget_cfg = budget if isinstance(budget, BudgetConfig) else schema.build(BudgetConfig, budget, "budget")
        self.name = name
        self.progress = _Progress()
        self._eval_window: contextlib.ExitStack | None = None  # open while the Trainer evaluates
        self._eval_figures = PhaseFigures("eval")
        self._eval_s = 0.0
        self._sequences = 0
        self._counted: torch.Tensor | int = 0  # tokens so far, on the model's device: no sync per forward
        self._eval_losses: list[tuple[int, float]] = []
        self._last_loss: float | None = None

    # -- the Trainer's events ---------------------------------------------------------------

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        """Open the training window: meter, memory peak, clock, token counter.

        Raises:
            UserError: a multi-process run (its figures would be one rank's, not the job's).
        """
        if getattr(args, "world_size", 1) > 1:
            raise UserError(
                f"EcoadaptCallback: this Trainer runs {args.world_size} processes; the callback measures "
                "single-process runs (its energy, tokens and memory would be one rank's, not the job's). "
                "Use `ecoadapt adapt` with parallel.nproc for data-parallel runs"
            )
        self.device = torch.device(args.device)
        self.out = self.output_dir or Path(args.output_dir) / "ecoadapt"
        self.out.mkdir(parents=True, exist_ok=True)
        self.model = model
        self.tracker = energy.EnergyTracker.for_config(self.measure, self.device.type, self.device.index, 0, say)
        earlier = self._carry_earlier(state.global_step)
        self.memory = memory.MemoryWindows(self.device)
        self.phases = Phases(self.tracker, self.memory)
        self.rss_before = memory.rss_bytes()
        self.budget = Budget(self.budget_cfg, lambda: self.tracker.running("train"), state.max_steps or 1, say)
        self._hook = model.register_forward_pre_hook(self._count, with_kwargs=True)
        # Trainer callbacks open and close the windows in separate calls: an exit stack holds them.
        self._train_window = contextlib.ExitStack()
        self._train_window.enter_context(self.phases.window("train"))
        self._counted = int(earlier.get("tokens", 0))
        self._start = time.perf_counter() - float(earlier.get("seconds", 0.0))  # the clock goes on

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Check the budgets after every optimizer step."""
        self._close_eval()
        self.progress.steps = state.global_step
        self.progress.time_s = time.perf_counter() - self._start - self._eval_s
        if not self.budget.active:
            return
        self._sync_tokens()  # one device sync per optimizer step, only when a budget reads it
        reason = self.budget.check(self.progress)
        if reason is not None and self.progress.stopped_by is None:
            self.progress.stopped_by = reason
            say(f"ecoadapt: budget {reason} reached after {state.global_step} steps; stopping training")
            control.should_training_stop = True

    def on_evaluate(
        self, args: Any, state: Any, control: Any, metrics: dict[str, float] | None = None, **kw: Any
    ) -> None:
        """Close the evaluation window; keep the held-out loss."""
        self._close_eval()
        if metrics and "eval_loss" in metrics:
            self._eval_losses.append((state.global_step, float(metrics["eval_loss"])))

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kw: Any) -> None:
        """One metrics.jsonl record per Trainer log (loss, lr, tokens, seconds, joules)."""
        logs = logs or {}
        self._sync_tokens()
        if "loss" in logs:
            self._last_loss = float(logs["loss"])
        seconds = time.perf_counter() - self._start - self._eval_s
        record = {
            "step": state.global_step,
            **{k: v for k, v in logs.items() if isinstance(v, (int, float))},
            "tokens": self.progress.tokens,
            "seconds": seconds,
            "tokens_per_s": self.progress.tokens / seconds if seconds > 0 else 0.0,
        }
        if self.tracker.meter is not None:
            record.update(energy_j=self.tracker.running("train"), energy_method=self.tracker.method)
        storage.append_jsonl(self.out / "metrics.jsonl", record)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Close the windows and write summary.json."""
        self._close_eval()
        self._sync_tokens()
        self.progress.steps = state.global_step
        self.progress.time_s = time.perf_counter() - self._start - self._eval_s
        self._train_window.close()
        self._hook.remove()
        summary = self._summary(args, state)
        summary.save(self.out / "summary.json")
        say(f"ecoadapt: {summary.status}; summary in {self.out / 'summary.json'}")

    # -- helpers ----------------------------------------------------------------------------

    def _carry_earlier(self, step: int) -> dict[str, Any]:
        """A Trainer resumed from its checkpoint at ``step`` goes on from there: the records up
        to it are kept (later ones, logged after the checkpoint, are dropped) and what they
        measured (joules, tokens, seconds) counts in this run's figures and budgets. A run from
        step 0 starts a new file. Returns the last kept record ({} when none)."""
        path = self.out / "metrics.jsonl"
        if step == 0:
            path.unlink(missing_ok=True)  # this run's records only
            return {}
        truncate_jsonl(path, step)
        kept = storage.read_jsonl(path)
        last = kept[-1] if kept else {}
        if last:
            self.tracker.carry({"train": (float(last.get("energy_j", 0.0)), float(last.get("seconds", 0.0)))})
            say(f"ecoadapt: resumed at step {step}; {len(kept)} earlier records kept and counted")
        return last

    def _count(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Count the tokens of a training forward pass; open the evaluation window on an
        evaluation one."""
        if not module.training:
            if self._eval_window is None:
                self._eval_window = contextlib.ExitStack()
                self._eval_figures = self._eval_window.enter_context(self.phases.window("eval", within="train"))
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor):
            self._counted = self._counted + mask.sum()  # stays on the device until _sync_tokens
        elif isinstance(ids, torch.Tensor):
            self._counted = self._counted + ids.numel()
        if isinstance(ids, torch.Tensor) and ids.ndim == 2:
            self._sequences += ids.shape[0]
            self._seq_len = ids.shape[1]

    def _sync_tokens(self) -> None:
        """Move the device-side token count into ``progress.tokens`` (a device-host sync)."""
        self.progress.tokens = int(self._counted)

    def _close_eval(self) -> None:
        if self._eval_window is not None:
            self._eval_window.close()
            self._eval_s += self._eval_figures.seconds
            self._eval_window = None

    def _summary(self, args: Any, state: Any) -> RunSummary:
        p = self.progress
        tokens_per_s = p.tokens / p.time_s if p.time_s > 0 else 0.0
        energy_part = self.tracker.summary(self.measure.grid_g_co2_per_kwh)
        if energy_part is not None:
            energy.with_training_figures(energy_part, p.tokens)
        flops_part = self._mfu(args, tokens_per_s)
        config = {
            "name": self.name or (self.out.parent.name if self.out.name == "ecoadapt" else self.out.name),
            "source": "transformers.Trainer with ecoadapt.integrations.EcoadaptCallback",
            "model": {"name_or_path": getattr(getattr(self.model, "config", None), "_name_or_path", "")},
            "trainer": {k: str(getattr(args, k, None)) for k in ("learning_rate", "per_device_train_batch_size",
                        "gradient_accumulation_steps", "max_steps", "num_train_epochs", "bf16", "fp16")},
            "budget": asdict(self.budget_cfg),
            "output": {"dir": str(self.out)},
        }  # fmt: skip
        return RunSummary(
            status="stopped_by_budget" if p.stopped_by in BUDGETS else "completed",
            config=config,
            stopped_by=p.stopped_by,
            budget=self.budget.summary(p),
            steps=p.steps,
            tokens=p.tokens,
            time_s=p.time_s,
            tokens_per_s=tokens_per_s,
            train_loss=self._last_loss,
            eval=self._eval(),
            energy=energy_part,
            memory=self.memory.report(self.rss_before),
            mfu=flops_part["mfu"] if flops_part else None,
            flops=flops_part,
            environment=environment.describe(self.device),
        )

    def _eval(self) -> EvalSummary | None:
        """Held-out loss before (an evaluation at step 0: ``eval_on_start``) and after."""
        if not self._eval_losses:
            return None
        first_step, before = self._eval_losses[0]
        last = self._eval_losses[-1][1]
        if first_step != 0:
            say(
                f"ecoadapt: loss_before is the first evaluation's, at step {first_step} "
                "(eval_on_start=True gives step 0's)"
            )
        return EvalSummary(before, last, math.exp(min(before, 50)), math.exp(min(last, 50)), None, None, None, None)

    def _mfu(self, args: Any, tokens_per_s: float) -> dict[str, Any] | None:
        """MFU from the model's shapes (PaLM convention; every position through the LM head)."""
        from ecoadapt.model.pretrained import transformer_blocks

        config = getattr(self.model, "config", None)
        if not tokens_per_s or config is None or not hasattr(config, "hidden_size") or not self._sequences:
            return None
        try:
            _, blocks = transformer_blocks(self.model)
        except Exception:  # a model ecoadapt cannot find the blocks of: no MFU rather than a wrong one
            return None
        dtype = DTYPES["bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"]
        return flops.model_mfu(
            self.model,
            blocks,
            self._seq_len,
            config.hidden_size,
            tokens_per_s,
            self.device,
            dtype,
            self.measure.peak_flops,
        )
