"""When training ends early: a signal, a budget, or early stopping; decided once for every rank.

Under data parallelism each rank sees its own signals, clocks and meters, so a decision taken
per rank could let one rank stop (or run a periodic evaluation, with collectives inside) while
another goes on: a hang until the collective timeout. Here every rank takes part in the same
collectives in the same order at every step (the job's joules are summed first, whatever the
rest decides), rank 0's decision is broadcast, and periodic evaluations happen at fixed steps
on every rank.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from ecoadapt.measure.budget import Budget, Progressed
from ecoadapt.model import parallel
from ecoadapt.train.early_stop import EarlyStop, TargetLoss


class Interruptions(Protocol):
    """A signal listener (see :class:`ecoadapt.train.interrupt.Interrupts`)."""

    def check(self, _result: object = None) -> str | None:
        """ "interrupted" once a signal came, else None."""


class StopRule:
    """The loop's ``should_stop``: the same reason on every rank, after every optimizer step.

    Args:
        world: this process's place in the job.
        interrupts: the signal listener.
        budget: the run's budgets (checked on every rank: its energy figure is a collective).
        evaluate: held-out loss now (every rank evaluates: FSDP needs all of them in a forward
            pass); called every ``eval_every`` steps.
        eval_every: train.eval_every (None: no periodic evaluation).
        stopper: early stopping on those losses.
        target: train.target_loss on those losses (None: no target).
    """

    def __init__(
        self,
        world: parallel.World,
        interrupts: Interruptions,
        budget: Budget,
        evaluate: Callable[[Progressed], float] | None,
        eval_every: int | None,
        stopper: EarlyStop,
        target: TargetLoss | None = None,
    ) -> None:
        self.world = world
        self.target = target
        self.interrupts = interrupts
        self.budget = budget
        self.evaluate = evaluate
        self.eval_every = eval_every
        self.stopper = stopper

    def __call__(self, result: Progressed) -> str | None:
        """The reason training ends after this step, or None."""
        signal = self.interrupts.check()
        limit = self.budget.check(result) if self.budget.active else None  # on every rank: a collective
        reason = parallel.broadcast(signal or limit, self.world)  # rank 0 decides for everyone
        if reason:
            return reason
        if self.evaluate is None or self.eval_every is None or result.steps % self.eval_every:
            return None
        loss = self.evaluate(result)
        if self.target is not None:  # the job's joules: a collective, at the same step on every rank
            tokens, joules = result.tokens * self.world.size, self.budget.spent_joules()
            if self.target.check(result.steps, loss, tokens, joules):
                return parallel.broadcast("target_loss", self.world)
        stop = self.stopper.update(result.steps, loss)
        return parallel.broadcast("early_stop" if stop else None, self.world)
