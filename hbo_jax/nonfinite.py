"""Stops a run whose updates keep coming out non-finite (`train.max_nonfinite_steps`).

The optimizer skips an update whose gradients hold a NaN or inf (`step.make_optimizer`)
and never gives up on its own, so the parameters stay those of the last finite step.
This guard, on the host, stops the run once `limit` updates in a row were skipped: a
run that only produces NaN (a learning rate far too high, broken data) would otherwise
burn its whole budget without learning. It reads the device only at points where the
loop waits for it anyway (log lines, checkpoints), so finite steps are not slowed; the
stop can therefore come up to `train.log_every` steps after the limit is reached.
"""

from __future__ import annotations

import logging
from typing import Callable

import jax

from hbo_jax.errors import NonFiniteError

log = logging.getLogger("hbo_jax")


class NonFiniteGuard:
    """Watches the train step's `nonfinite_streak` metric and raises `NonFiniteError` at the limit.

    Args:
        limit: Skipped updates in a row that stop the run (`train.max_nonfinite_steps`).
        checkpoints: Where the run's checkpoints are, for the message.
        on_stop: Called before raising (the run closes its checkpointer and trackers).
    """

    def __init__(self, limit: int, checkpoints: str, on_stop: Callable[[], None] = lambda: None):
        self.limit = limit
        self.checkpoints = checkpoints
        self.on_stop = on_stop
        self._streaks: list = []  # device scalars since the last check (no host sync per step)

    def observe(self, metrics: dict) -> None:
        """Takes the step's `nonfinite_streak` out of its metrics (a run-length, not to be summed)."""
        streak = metrics.pop("nonfinite_streak", None)
        if streak is not None:
            self._streaks.append(streak)

    def check(self, step: int, skipped: int = 0, span: str = "") -> None:
        """Logs the skipped updates and raises once the longest streak seen reached the limit.

        Args:
            step: The step just finished.
            skipped: Updates skipped in the interval just logged (0: nothing to log).
            span: The interval, for the warning (`steps 11-20`).
        """
        if skipped:
            log.warning("%s: %d update(s) skipped for a non-finite loss or gradients", span or f"step {step}",
                        skipped)
        if not self._streaks:
            return
        worst = max(int(x) for x in jax.device_get(self._streaks))
        self._streaks = []
        if worst >= self.limit:
            self.on_stop()
            raise NonFiniteError(
                f"stopped at step {step}: {worst} updates in a row had a non-finite loss or gradients "
                f"(train.max_nonfinite_steps={self.limit}). Each was skipped, so the parameters are those of the "
                f"last finite step; no checkpoint is written once the limit is reached, and the newest one in "
                f"{self.checkpoints} is kept. Lower train.learning_rate or check the data, then run again "
                "(it resumes from there)")
