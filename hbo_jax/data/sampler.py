"""Hierarchical sampler: dataset ~ p_global, bucket ~ p_local[dataset], example w/o replacement.

Every global batch slot draws its (dataset, bucket) leaf with counter-based randomness
(`hbo_jax.rng.generator(seed, Stream.SAMPLER, step)`), so the plan for step s depends
only on the seed, s, the probability in force at s, and the leaf cursors. Each leaf is
walked through a permutation drawn from `Stream.LEAF_PERMUTATION` keyed by (leaf, leaf
epoch) and reshuffled when exhausted. All hosts compute the same global plan and load
only their rows. A training run's seed is its data seed (`train.data_seed`).

Probabilities live in a `ProbabilitySchedule` (the history of `(from_step, p_global,
p_local)`), part of the sampler's JSON state, so a restored sampler replays the stream.
The Grain iterator runs in the main process: an actor update reaches the next draw.
"""

from __future__ import annotations

import copy
from typing import Any, Sequence

import grain
import numpy as np

from hbo_jax.rng import Stream, generator


class ProbabilitySchedule:
    """Piecewise-constant sampling probabilities over training steps."""

    def __init__(self, p_global: np.ndarray, p_local: np.ndarray):
        self.entries: list[dict[str, Any]] = []
        self.set(0, p_global, p_local)

    def set(self, from_step: int, p_global, p_local) -> None:
        pg = np.asarray(p_global, np.float64)
        pl = np.asarray(p_local, np.float64)
        if pg.ndim != 1 or pl.shape[0] != pg.shape[0] or pl.ndim != 2:
            raise ValueError(f"bad probability shapes {pg.shape} / {pl.shape}")
        if not (np.all(np.isfinite(pg)) and np.all(np.isfinite(pl))) or pg.min() < 0 or pl.min() < 0:
            raise ValueError("probabilities must be finite and non-negative")
        entry = {"from_step": int(from_step), "p_global": (pg / pg.sum()).tolist(),
                 "p_local": (pl / pl.sum(1, keepdims=True)).tolist()}
        if self.entries and from_step < self.entries[-1]["from_step"]:
            raise ValueError(f"schedule entries must not go back in time ({from_step})")
        if self.entries and from_step == self.entries[-1]["from_step"]:
            self.entries[-1] = entry
        else:
            self.entries.append(entry)

    def at(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        entry = self.entries[0]
        for e in self.entries:
            if e["from_step"] > step:
                break
            entry = e
        return np.asarray(entry["p_global"]), np.asarray(entry["p_local"])

    def to_json(self) -> list[dict]:
        return copy.deepcopy(self.entries)

    @classmethod
    def from_json(cls, entries: list[dict]) -> "ProbabilitySchedule":
        obj = cls.__new__(cls)
        obj.entries = copy.deepcopy(entries)
        return obj


class HierarchicalSampler:
    """Plans global batches of (dataset, bucket, example index) triples."""

    def __init__(self, leaves: Sequence[Sequence[np.ndarray]], batch_size: int, seed: int,
                 schedule: ProbabilitySchedule):
        self.leaves = [[np.asarray(l, np.int64) for l in row] for row in leaves]
        self.num_datasets = len(self.leaves)
        self.num_buckets = len(self.leaves[0])
        self.batch_size = batch_size
        self.seed = seed
        self.schedule = schedule
        self.sizes = np.array([[len(l) for l in row] for row in self.leaves])
        g = self.sizes.size
        self.step = 0
        self.epoch = np.zeros(g, np.int64)
        self.pos = np.zeros(g, np.int64)
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    def _perm(self, leaf: int, epoch: int) -> np.ndarray:
        key = (leaf, epoch)
        if key not in self._perms:
            if len(self._perms) > 4 * self.sizes.size:
                self._perms.clear()
            n = self.sizes.flat[leaf]
            self._perms[key] = generator(self.seed, Stream.LEAF_PERMUTATION, leaf, epoch).permutation(n)
        return self._perms[key]

    def draw_groups(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(dataset [B], bucket [B]) for a step: a pure function of seed, step and schedule."""
        pg, pl = self.schedule.at(step)
        pl = pl * (self.sizes > 0)  # never draw from an empty leaf
        pg = pg * (pl.sum(1) > 0)
        rng = generator(self.seed, Stream.SAMPLER, step)
        u = rng.random((self.batch_size, 2))
        cum_g = np.cumsum(pg)
        dataset = np.minimum(np.searchsorted(cum_g, u[:, 0] * cum_g[-1], side="right"), len(pg) - 1)
        cum_l = np.cumsum(pl[dataset], axis=1)
        bucket = (u[:, 1:] * cum_l[:, -1:] >= cum_l).sum(1)
        return dataset, np.minimum(bucket, self.num_buckets - 1)

    def next_plan(self) -> dict[str, np.ndarray]:
        """Draws the next global batch plan and advances the leaf cursors."""
        dataset, bucket = self.draw_groups(self.step)
        leaf = dataset * self.num_buckets + bucket
        index = np.empty(self.batch_size, np.int64)
        for r, g in enumerate(leaf):
            index[r] = self.leaves[dataset[r]][bucket[r]][self._perm(g, self.epoch[g])[self.pos[g]]]
            self.pos[g] += 1
            if self.pos[g] == self.sizes.flat[g]:
                self.epoch[g] += 1
                self.pos[g] = 0
        plan = {"step": self.step, "dataset": dataset, "bucket": bucket, "group_id": leaf.astype(np.int32),
                "index": index}
        self.step += 1
        return plan

    def get_state(self) -> dict:
        return {"step": self.step, "epoch": self.epoch.tolist(), "pos": self.pos.tolist(),
                "seed": self.seed, "schedule": self.schedule.to_json(),
                "sizes": self.sizes.tolist()}

    def set_state(self, state: dict) -> None:
        if state["sizes"] != self.sizes.tolist() or state["seed"] != self.seed:
            raise ValueError("sampler state belongs to other data (leaf sizes or seed differ)")
        self.step = int(state["step"])
        self.epoch = np.asarray(state["epoch"], np.int64)
        self.pos = np.asarray(state["pos"], np.int64)
        # In place: whoever updates the schedule (the training method) holds this object.
        self.schedule.entries = ProbabilitySchedule.from_json(state["schedule"]).entries


class _PlanIterator(grain.DatasetIterator):
    def __init__(self, sampler: HierarchicalSampler):
        super().__init__()
        self.sampler = sampler

    def __next__(self):
        return self.sampler.next_plan()

    def get_state(self):
        return self.sampler.get_state()

    def set_state(self, state):
        self.sampler.set_state(state)


class PlanDataset(grain.IterDataset):
    """Grain view of a HierarchicalSampler: an endless stream of batch plans."""

    def __init__(self, sampler: HierarchicalSampler):
        super().__init__()
        self.sampler = sampler

    def __iter__(self):
        return _PlanIterator(self.sampler)


def batch_iterator(sampler: HierarchicalSampler, stores: Sequence, seq_len: int, pad_id: int,
                   rows: slice, ref_nll: Sequence[np.ndarray] | None = None, pack_rows: int = 0,
                   pack_stats: dict | None = None):
    """Grain iterator of host-local training batches: plan -> gather this host's rows -> pad.

    With `ref_nll` (per subset, per example), each row also carries its reference NLL.
    With `pack_rows` > 0, this host's examples are packed (`hbo_jax.data.packing.pack`)
    into that many rows instead of one row each (a step that does not fit on some host
    overflows to one row per example on every host); `group_id` and `ref_nll` stay one
    per example, and `pack_stats` (if given) accumulates steps, overflow steps, examples,
    truncated examples, token slots and real tokens.
    """
    from hbo_jax.data.packing import pack, step_rows, truncated
    from hbo_jax.data.store import collate

    def load(plan):
        sel = range(sampler.batch_size)[rows]
        examples = [stores[plan["dataset"][r]][plan["index"][r]] for r in sel]
        if pack_rows:
            n = step_rows(plan, stores, sampler.batch_size, len(sel), seq_len, pack_rows)
            batch = pack(examples, seq_len, pad_id, n, first_index=sel.start)
            if pack_stats is not None:
                for key, v in (("steps", 1), ("overflow_steps", int(n != pack_rows)),
                               ("examples", len(examples)), ("truncated", truncated(examples, seq_len)),
                               ("slots", batch["segment_ids"].size),
                               ("tokens", int(np.count_nonzero(batch["segment_ids"])))):
                    pack_stats[key] = pack_stats.get(key, 0) + v
        else:
            batch = collate(examples, seq_len, pad_id)
        batch["group_id"] = plan["group_id"][rows]
        if ref_nll is not None:
            batch["ref_nll"] = np.array([ref_nll[plan["dataset"][r]][plan["index"][r]] for r in sel], np.float32)
        return batch

    return iter(PlanDataset(sampler).map(load))
