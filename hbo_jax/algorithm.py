"""The seam between the training loop and a training method.

A training method (HBO and every sampling strategy; ScaleBiO) is an `Algorithm`:
it owns its state as named PyTrees (what a checkpoint saves), its jitted step(s), what
happens after a step (actor updates, records for `mixing.jsonl`), the parameters that
are evaluated and exported, and the programs the memory planner compiles. The loop in
`hbo_jax.train` knows only this interface, so a new method is a new class registered
here, not a branch in the loop.

Methods are chosen by the top-level config key `algorithm` (default `sampling`, which
reads `mixing.*`). The registry holds factories by import path, so reading the config
never imports JAX.
"""

from __future__ import annotations

import abc
import importlib
from dataclasses import dataclass
from typing import Any, Callable

# name -> "module:attribute" (imported on use) or the class itself (tests, plug-ins).
_REGISTRY: dict[str, str | type] = {"sampling": "hbo_jax.mixing.sampling_algorithm:SamplingAlgorithm",
                                     "scalebio": "hbo_jax.mixing.scalebio:ScaleBiO"}


# name -> the config section the algorithm reads (the report compares runs on it alone).
_SECTIONS: dict[str, str] = {"sampling": "mixing", "scalebio": "scalebio"}


def register(name: str, algorithm: str | type, section: str | None = None) -> None:
    """Makes `algorithm=<name>` select `algorithm` (a class or a "module:Class" path).

    `section`: the top-level config section it reads its settings from, if any.
    """
    _REGISTRY[name] = algorithm
    if section:
        _SECTIONS[name] = section


def config_sections() -> dict[str, str]:
    """algorithm name -> the config section it reads (algorithms that read one)."""
    return dict(_SECTIONS)


def names() -> list[str]:
    return sorted(_REGISTRY)


def algorithm_class(name: str) -> type["Algorithm"]:
    """The class registered under `name`.

    Raises:
        ValueError: for a name nobody registered (the config layer turns it into a
            ConfigError naming the key).
    """
    if name not in _REGISTRY:
        raise ValueError(f"algorithm={name!r} is not one of {names()}")
    target = _REGISTRY[name]
    if isinstance(target, str):
        module, _, attr = target.partition(":")
        target = getattr(importlib.import_module(module), attr)
    return target


@dataclass
class RunContext:
    """What every algorithm is built from: the run's config, devices, data and base model.

    Attributes:
        cfg: The run's `Config`.
        mesh: The device mesh.
        data: The prepared mixture (`PreparedData`).
        graphdef: The model's static graph.
        params: The starting parameters (the train step may donate them).
        pack_rows: Rows of a packed batch (0 = no packing).
    """

    cfg: Any
    mesh: Any
    data: Any
    graphdef: Any
    params: Any
    pack_rows: int = 0


@dataclass(frozen=True)
class PlanContext:
    """What the memory planner knows of a run without weights or data (shapes only).

    Attributes:
        cfg: The run's `Config`.
        mesh: The device mesh.
        graphdef: The model's static graph.
        params: The model's parameters as ShapeDtypeStructs in the run's shardings.
        num_datasets: Subsets in the mixture.
        batch: Callable(rows, *, ref_nll=False, packing=False) -> abstract batch dict.
    """

    cfg: Any
    mesh: Any
    graphdef: Any
    params: Any
    num_datasets: int
    batch: Callable[..., dict]


class Algorithm(abc.ABC):
    """A training method run by the loop in `hbo_jax.train`.

    Subclasses set `schedule` (the probabilities the sampler draws batches from; an
    algorithm may change it after a step) in `__init__(ctx: RunContext)`.

    Attributes:
        label: What the progress bar calls the run (e.g. the strategy).
        schedule: `ProbabilitySchedule` the sampler reads; shared, updated in place.
        batch_fields: Extra per-row batch fields the step needs (e.g. `ref_nll`).
        mixing_seconds: Wall-clock spent on work other than the train step proper
            (rewards, actor updates), for the logged mixing share.
        mean_metrics: Further scalar metrics of `step` that `metrics.jsonl` gets as their
            mean over the log interval.
    """

    label: str = ""
    schedule: Any
    batch_fields: frozenset[str] = frozenset()
    mixing_seconds: float = 0.0
    mean_metrics: tuple[str, ...] = ()

    @abc.abstractmethod
    def state(self) -> dict[str, Any]:
        """Named PyTrees saved in a checkpoint; `train` is the TrainState of the evaluated model."""

    @abc.abstractmethod
    def load_state(self, trees: dict[str, Any], meta: dict) -> None:
        """Takes restored trees (shaped like `state()`) and this algorithm's `meta()` back."""

    @abc.abstractmethod
    def step(self, done: int, batch) -> tuple[dict, list[dict]]:
        """Runs the train step that completes step `done` and what follows it.

        Returns:
            (metrics, records): the step's metrics as device arrays (summed over a log
            interval by the loop: `loss`, `grad_norm`, `tokens` and the per-group
            `group_*` sums), and records for `mixing.jsonl` (each with `step`,
            `p_global`, `p_local`), usually none.
        """

    @property
    def params(self):
        """The parameters to evaluate and export."""
        return self.state()["train"].params

    def start_probabilities(self) -> tuple:
        """(p_global, p_local) the run starts with, for `probabilities_start.json` and the plots."""
        return self.schedule.at(0)

    def traced_state(self) -> dict[str, Any]:
        """The replicated state every process must hold identically (`distributed.trace` digests it)."""
        return {k: v for k, v in self.state().items() if k != "train"}

    def start(self) -> None:
        """A fresh run, after the starting model was evaluated and before step 1."""

    def resumed(self, step: int) -> list[dict]:
        """Records to log again after a resume at `step` (e.g. a replayed schedule's future)."""
        return []

    def meta(self) -> dict:
        """Host-side state for the checkpoint's JSON metadata (must round-trip exactly)."""
        return {}

    def summary(self) -> dict:
        """Fields this algorithm adds to `summary.json`."""
        return {}

    @classmethod
    def programs(cls, plan: PlanContext) -> list[tuple]:
        """(name, compiled program) of every device program a run compiles, for `hbo_jax.memory`;
        a third element, when given, is the bytes of the run's device state the program does
        not take but that stays on the device while it runs (it counts toward the peak)."""
        return []
