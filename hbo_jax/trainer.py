"""The training loop: batches into an `Algorithm`'s step, periodic work as hooks.

Everything that happens every N steps (the metrics log, evaluation, checkpoints, the
mixing log, the progress bar) is a hook added with `add_hook(fn, every=N)`, so the loop
itself stays a few lines and knows no method or strategy by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

from hbo_jax.algorithm import Algorithm


@dataclass
class StepInfo:
    """What hooks see after a step.

    Attributes:
        step: Steps completed (1 after the first step).
        metrics: The step's metrics (device arrays; see `Algorithm.step`).
        records: The algorithm's records for the mixing log from this step.
        last: Whether this is the run's final step.
    """

    step: int
    metrics: dict
    records: list[dict] = field(default_factory=list)
    last: bool = False


@dataclass(frozen=True)
class _Hook:
    fn: Callable[[StepInfo], None]
    every: int
    at_end: bool

    def due(self, info: StepInfo) -> bool:
        return info.step % self.every == 0 or (self.at_end and info.last)


class Trainer:
    """Runs an algorithm's steps from `start` to `total_steps`, calling hooks after each.

    Args:
        algorithm: The training method.
        batches: Iterator of global batches, one per step.
        start: Steps already done (a resumed run).
        total_steps: Steps of the whole run.
        should_stop: Called with the steps done after a step's hooks, while steps remain;
            True ends the loop early (a stop signal).
    """

    def __init__(self, algorithm: Algorithm, batches: Iterator, start: int, total_steps: int,
                 should_stop: Callable[[int], bool] = lambda done: False):
        self.algorithm, self.batches = algorithm, batches
        self.start, self.total_steps = start, total_steps
        self.should_stop = should_stop
        self._hooks: list[_Hook] = []

    def add_hook(self, fn: Callable[[StepInfo], None], *, every: int = 1, at_end: bool = False) -> None:
        """Calls `fn(info)` after every `every`-th step (and after the last one if `at_end`).

        Hooks run in the order they were added; `every` <= 0 means never.
        """
        if every > 0:
            self._hooks.append(_Hook(fn, every, at_end))

    def train(self) -> int | None:
        """Runs the remaining steps; returns None when done, or the step where a stop ended it."""
        for s in range(self.start, self.total_steps):
            done = s + 1
            metrics, records = self.algorithm.step(done, next(self.batches))
            info = StepInfo(done, metrics, records, last=done == self.total_steps)
            for hook in self._hooks:
                if hook.due(info):
                    hook.fn(info)
            if not info.last and self.should_stop(done):
                return done
        return None
