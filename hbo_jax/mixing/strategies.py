"""The host-side Mixer of the sampling strategies, and their probability schedules.

The Mixer holds the actors' state (`MixerState`), runs the probes and actor updates on
the schedule its `Strategy` (`hbo_jax.mixing.strategy`) sets, times them (the run
reports the share of wall-clock spent on mixing) and hands new probabilities to the
sampler.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from hbo_jax.config import ConfigError, MixingConfig
from hbo_jax.data.sampler import ProbabilitySchedule
from hbo_jax.mixing import actors, global_rewards, rewards
from hbo_jax.mixing.strategy import Strategy, prior
from hbo_jax.parallel import replicated, round_up_rows, sums_from_json, sums_to_json
from hbo_jax.records import dumps
from hbo_jax.step import make_example_nll_fn

log = logging.getLogger(__name__)


def save_schedule(path, schedule: ProbabilitySchedule, names: Sequence[str]) -> None:
    """Writes a run's probability schedule (what `strategy=replay` reads)."""
    Path(path).write_text(dumps({"subsets": list(names), "entries": schedule.to_json()}, indent=1))


def load_schedule(source: str, names: Sequence[str], num_buckets: int) -> ProbabilitySchedule:
    """Reads `schedule.json` from a run directory or a file; checks it fits this mixture."""
    path = Path(source).expanduser()
    if path.is_dir():
        path = path / "schedule.json"
    if not path.is_file():
        raise ConfigError(f"mixing.replay_from={source}: {path} not found (a finished run writes schedule.json)")
    data = json.loads(path.read_text())
    if data["subsets"] != list(names):
        raise ConfigError(f"mixing.replay_from={source}: recorded subsets {data['subsets']} differ from "
                          f"this mixture's {list(names)}")
    k = len(data["entries"][0]["p_local"][0])
    if k != num_buckets:
        raise ConfigError(f"mixing.replay_from={source}: recorded K={k} buckets, data.num_buckets={num_buckets}")
    return ProbabilitySchedule.from_json(data["entries"])


def apply_floor(p: np.ndarray, floor: float) -> np.ndarray:
    """(1 - n * floor) * p + floor along the last axis: every entry >= floor, sums kept at 1.

    `config_checks.validate` has checked floor * n < 1 for the datasets and the buckets.
    """
    n = p.shape[-1]
    if floor <= 0:
        return p
    return (1.0 - n * floor) * p + floor


def probe_cost_share(global_rows: int, local_rows: int, cfg: MixingConfig, train_batch: int) -> float:
    """Estimated compute of the probes relative to training, in forward-pass units.

    A training row and a gradient probe cost a forward and a backward (about 3 forwards);
    a local probe is a forward only. Per update interval: probes / (interval * batch).
    """
    probe = 3.0 * global_rows / cfg.global_every + 1.0 * local_rows / cfg.local_every
    return probe / (3.0 * train_batch)


def probe_counts(cfg: MixingConfig, d: int, k: int, train_batch: int, global_probes: bool,
                 local_probes: bool) -> tuple[int, int, float]:
    """(global probes per bucket, local probes per group, estimated share) under the budget.

    With `mixing.probe_budget` > 0 the larger of the two probe costs is cut one probe at a
    time (never below 1 per bucket or group) until the estimate fits the budget.
    """
    g, loc = cfg.global_probes_per_bucket, cfg.local_probes_per_group
    share = lambda g, loc: probe_cost_share(d * k * g if global_probes else 0, d * k * loc if local_probes else 0,
                                            cfg, train_batch)
    while cfg.probe_budget > 0 and share(g, loc) > cfg.probe_budget and (g > 1 or loc > 1):
        g_cost = share(g, 1) - share(1, 1) if global_probes else 0.0
        l_cost = share(1, loc) - share(1, 1) if local_probes else 0.0
        if g > 1 and (g_cost >= l_cost or loc == 1):
            g -= 1
        else:
            loc -= 1
    return g, loc, share(g, loc)


_LOCAL_KEYS = ("group_ppl_ratio", "group_examples")  # local_source=train
_GLOBAL_KEYS = ("group_gradnorm", "gradnorm_examples")  # global_source=train


def _add(acc: dict | None, new: dict) -> dict:
    """Key-wise sum of reward statistics (keys absent from one side are taken as they are)."""
    acc = dict(acc or {})
    for key, v in new.items():
        acc[key] = v if key not in acc else acc[key] + v
    return acc


class Mixer:
    """Owns the MixerState; computes rewards and updates the actors every N steps.

    It observes every train step's metrics (`observe`) and keeps, on device, the reward
    statistics its train-sourced rewards need since their last update; those partial
    sums travel with a checkpoint (`saved_statistics` / `load_statistics`).
    """

    def __init__(self, strategy: Strategy, cfg: MixingConfig, sizes, leaves, stores, graphdef,
                 mesh, seq_len: int, pad_id: int, data_seed: int, dev_stores: Sequence | None = None,
                 train_batch: int = 0):
        self.strategy = strategy
        self.leaves, self.stores, self.mesh = leaves, stores, mesh
        self.seq_len, self.pad_id, self.data_seed = seq_len, pad_id, data_seed  # probes draw from the data seed
        self.num_datasets, self.num_buckets = len(leaves), len(leaves[0])
        self.train_gradnorm = strategy.train_gradnorm
        global_probes = strategy.global_probes
        local_probes = strategy.progress_ratio and not strategy.ratio_from_train
        g, loc, share = probe_counts(cfg, self.num_datasets, self.num_buckets, max(train_batch, 1),
                                     global_probes, local_probes)
        if (g, loc) != (cfg.global_probes_per_bucket, cfg.local_probes_per_group):
            log.info("mixing.probe_budget=%.3f: probes cut to %d per bucket (global) and %d per group (local)",
                     cfg.probe_budget, g, loc)
        if cfg.probe_budget and share > cfg.probe_budget:
            log.warning("mixing.probe_budget=%.3f cannot be met with one probe per bucket and group "
                        "(estimate %.3f); raise mixing.global_every / local_every", cfg.probe_budget, share)
        self.cfg = dataclasses.replace(cfg, global_probes_per_bucket=g, local_probes_per_group=loc)
        cfg = self.cfg
        self.estimated_probe_share = share if train_batch else None
        p0 = prior(sizes, strategy.temperature)
        # Replicated on every device of the mesh: each host holds the same policy.
        self.state = jax.device_put(
            actors.init_mixer(p0, self.num_buckets, cfg.local_probes_per_group, cfg.actor_lr,
                              flat=strategy.flat), replicated(mesh))
        # Priors of the KL guardrail: the T prior globally, uniform (or the flat prior) locally.
        self._prior_logp = (jax.device_put(self.state.global_logits, replicated(mesh)),
                            jax.nn.log_softmax(self.state.local_logits.reshape(-1)).reshape(
                                self.state.local_logits.shape) if strategy.flat
                            else jnp.full(self.state.local_logits.shape, -np.log(self.num_buckets)))
        self.seconds = 0.0
        self._stats: dict | None = None  # train-sourced reward sums since their last update
        self._clock: dict[int, float] = {}  # time_norm_steps
        self._warned: set[str] = set()
        make = global_rewards.MAKERS.get(strategy.global_reward) if global_probes else None
        self._global_fn = make(graphdef, mesh, self.num_datasets) if make else None
        self._dev_batch = None
        if strategy.global_actor and strategy.global_reward == "dev_cosine":
            if not dev_stores or not any(len(s) for s in dev_stores):
                raise ConfigError(f"mixing.strategy={strategy.name}: the dev-gradient reward needs eval "
                                  "examples (<subset>.eval.jsonl files)")
            picks = rewards.dev_probes(dev_stores, cfg.global_probes_per_bucket * self.num_buckets, data_seed)
            self._dev_batch = rewards.probe_batch(dev_stores, picks, seq_len, pad_id)
        self._nll = make_example_nll_fn(graphdef, mesh) if strategy.progress_ratio else None
        self._local_batch = self._local_alone = None
        if local_probes:
            picks = rewards.fixed_local_probes(leaves, cfg.local_probes_per_group, data_seed)
            self._local_batch = rewards.probe_batch(stores, picks, seq_len, pad_id)
            if cfg.local_reward == "ifd_ratio":
                self._local_alone = rewards.probe_batch(stores, picks, seq_len, pad_id, response_alone=True)

    @property
    def chunk(self) -> int:
        return round_up_rows(self.cfg.local_probes_per_group * self.num_buckets, self.mesh)

    def _probe_statistic(self, params) -> np.ndarray:
        """The local probes' statistic under `params`, [D, K, M] (NLL, or IFD for ifd_ratio)."""
        nll = rewards.batched_example_nll(self._nll, params, self._local_batch, self.chunk, self.mesh)
        alone = (rewards.batched_example_nll(self._nll, params, self._local_alone, self.chunk, self.mesh)
                 if self._local_alone is not None else None)
        shape = (self.num_datasets, self.num_buckets, self.cfg.local_probes_per_group)
        return rewards.probe_statistic(self.cfg.local_reward, nll, alone).reshape(shape)

    def start(self, params) -> None:
        """Records the local probe sets' statistic under the starting model (theta0)."""
        if self._local_batch is None:
            return
        t0 = time.perf_counter()
        ref = self._probe_statistic(params)
        self.state = self.state.replace(local_ref_nll=jax.device_put(ref.astype(np.float32), replicated(self.mesh)))
        self.seconds += time.perf_counter() - t0

    def due(self, step: int) -> tuple[bool, bool]:
        """Whether the global / local actor updates after `step` completed steps (never at 0)."""
        g, loc = self.strategy.actor("global"), self.strategy.actor("local", "flat")
        return (g is not None and step > 0 and step % g.every == 0,
                loc is not None and step > 0 and step % loc.every == 0)

    def wants_example_gradnorm(self, done: int, total_steps: int) -> bool:
        """Whether the train step ending at `done` completed steps feeds the global reward
        (`mixing.global_source=train`: the last `global_train_steps` before an update that
        will happen, i.e. before `total_steps`)."""
        if not self.train_gradnorm:
            return False
        m, left = self.cfg.global_train_steps, (-done) % self.cfg.global_every
        return (m == 0 or left < m) and done + left < total_steps

    def time_norm_steps(self, done: int, state, after: bool) -> None:
        """Bills the norm steps' extra time to mixing (`global_source=train`).

        Called before each train step and, for norm steps, after it. The M norm steps
        before an update are timed against the M plain steps before them (two host syncs
        per interval); the excess goes into `seconds`. Not measured when
        `global_train_steps` is 0 or more than half of `global_every`.
        """
        m, f = self.cfg.global_train_steps, self.cfg.global_every
        if not self.train_gradnorm or m == 0 or 2 * m > f:
            return
        phase = (-done) % f  # steps left until the update, after this one
        if not after and phase in (2 * m - 1, m - 1):
            jax.block_until_ready(state)
            self._clock = ({} if phase == 2 * m - 1 else self._clock) | {phase: time.perf_counter()}
        elif after and phase == 0 and len(self._clock) == 2:
            jax.block_until_ready(state)
            t_plain, t_norm = self._clock[2 * m - 1], self._clock[m - 1]
            self.seconds += max(0.0, (time.perf_counter() - t_norm) - (t_norm - t_plain))
            self._clock = {}

    def _train_gradnorm(self, train_stats) -> np.ndarray:
        """[D] mean per-example gradient norm of each dataset's training examples since the
        last global update; a dataset that drew none gets the others' mean (no signal)."""
        shape = (self.num_datasets, self.num_buckets)
        if not train_stats or "group_gradnorm" not in train_stats:  # no statistics: the update is skipped
            return np.full(self.num_datasets, np.nan)
        total = np.asarray(train_stats["group_gradnorm"], np.float64).reshape(shape).sum(1)
        n = np.asarray(train_stats["gradnorm_examples"], np.float64).reshape(shape).sum(1)
        r = np.where(n > 0, total / np.maximum(n, 1.0), np.nan)
        seen = n > 0
        if seen.any() and not seen.all():
            log.debug("global reward: datasets %s drew no examples; given the mean", np.flatnonzero(~seen).tolist())
            r[~seen] = r[seen].mean()
        return r

    @property
    def uses_train_stats(self) -> bool:
        return self.strategy.ref_nll

    def observe(self, metrics: dict) -> dict:
        """Takes a train step's metrics; returns them without the mixer's private outputs.

        The statistics a train-sourced reward needs are summed on device (no host sync).
        """
        gradnorm = metrics.pop("group_gradnorm", None)
        if self.uses_train_stats:
            self._stats = _add(self._stats, {key: metrics[key] for key in _LOCAL_KEYS})
        if gradnorm is not None:
            self._stats = _add(self._stats, dict(zip(_GLOBAL_KEYS, (gradnorm, metrics["group_examples"]))))
        return metrics

    def saved_statistics(self) -> dict | None:
        """The partial sums as JSON (values and dtypes), so a checkpoint carries them exactly."""
        return sums_to_json(self._stats)

    def load_statistics(self, saved: dict | None) -> None:
        """Restores `saved_statistics()` (also the older form: plain float32 lists)."""
        self._stats = sums_from_json(saved, self.mesh)

    def _local_ratio(self, params, train_stats) -> tuple[np.ndarray, np.ndarray]:
        """(per-group [D, K], per-dataset [D]) progress ratio to theta0 (`mixing.local_reward`),
        from the fixed probes or from training statistics (PPL ratio only)."""
        shape = (self.num_datasets, self.num_buckets)
        if self.uses_train_stats:
            s = np.asarray(train_stats["group_ppl_ratio"], np.float64).reshape(shape)
            n = np.asarray(train_stats["group_examples"], np.float64).reshape(shape)
            # Per dataset: its buckets pooled, as one row of "buckets" = datasets.
            return rewards.train_ppl_ratio(s, n), rewards.train_ppl_ratio(s.sum(1)[None], n.sum(1)[None])[0]
        ratio = rewards.local_ratio(self.cfg.local_reward, self._probe_statistic(params),
                                    np.asarray(jax.device_get(self.state.local_ref_nll)))
        return ratio, ratio.mean(1)  # equal probe counts per bucket

    def update(self, step: int, params) -> dict | None:
        """Runs the due updates; returns a mixing-log record, or None when nothing was due.

        Train-sourced rewards read the observed sums (`local_source=train`:
        `group_ppl_ratio` and `group_examples` since the last local update;
        `global_source=train`: `group_gradnorm` and `gradnorm_examples` since the last
        global update); the sums an update consumed restart from zero.
        """
        do_global, do_local = self.due(step)
        if not (do_global or do_local):
            return None
        train_stats = self._stats
        # Let the queued train steps finish first, so their time is not billed to mixing.
        jax.block_until_ready((params, train_stats))
        t0 = time.perf_counter()
        record: dict = {"step": step}
        c = self.cfg
        want_ratio = do_local or (do_global and self.strategy.global_reward == "ppl_ratio")
        ratio, ratio_ds = self._local_ratio(params, train_stats) if want_ratio else (None, None)
        if ratio is not None:
            record["ppl_ratio"] = ratio.tolist()  # consumed: train-stat sums restart from here
        if do_global:
            if self.train_gradnorm:
                r = jax.device_put(self._train_gradnorm(train_stats).astype(np.float32), replicated(self.mesh))
            elif self._global_fn is not None:
                picks = rewards.draw_global_probes(self.leaves, c.global_probes_per_bucket, self.data_seed, step)
                batch = rewards.probe_batch(self.stores, picks, self.seq_len, self.pad_id)
                batch = rewards.pad_per_dataset(batch, self.num_datasets, self.mesh)
                args = rewards.to_device(batch, self.mesh)
                if self._dev_batch is not None:
                    args += rewards.to_device(rewards.pad_per_dataset(self._dev_batch, 1, self.mesh), self.mesh)
                r = self._global_fn(params, *args)
            else:  # MoS "Diff": the dataset's PPL ratio, raw (higher = less learned = more sampling)
                r = jax.device_put(ratio_ds.astype(np.float32), replicated(self.mesh))
            self.state, used = actors.update_global(self.state, r, lr=c.actor_lr, inner_steps=c.inner_steps, ema=c.ema,
                                                    kl=c.kl_to_prior, prior_logp=self._prior_logp[0])
            record["reward_global"] = np.asarray(jax.device_get(used)).tolist()
        if do_local:
            # HBO: relative to the dataset's bucket mean; MoS+ (flat): raw, across all groups.
            r = ratio if self.strategy.flat else rewards.relative(ratio)
            self.state = actors.update_local(self.state, jax.device_put(r.astype(np.float32), replicated(self.mesh)),
                                             lr=c.actor_lr, inner_steps=c.inner_steps, flat=self.strategy.flat,
                                             kl=c.kl_to_prior, prior_logp=self._prior_logp[1])
            record["reward_local"] = r.tolist()
        pg, pl = self.probabilities()
        record.update(p_global=pg.tolist(), p_local=pl.tolist(),
                      skipped=int(jax.device_get(self.state.num_skipped)))
        used = (_LOCAL_KEYS if ratio is not None else ()) + (_GLOBAL_KEYS if do_global and self.train_gradnorm else ())
        self._stats = {key: v for key, v in (self._stats or {}).items() if key not in used} or None
        dt = time.perf_counter() - t0
        self.seconds += dt
        record["seconds"] = dt
        return record

    def probabilities(self) -> tuple[np.ndarray, np.ndarray]:
        """The sampling distribution: the actors' probabilities with the floor applied."""
        pg, pl = actors.probabilities(self.state, flat=self.strategy.flat)
        pg, pl = apply_floor(pg, self.cfg.min_prob), apply_floor(pl, self.cfg.min_prob)
        for name, p in (("global", pg[None]), ("local", pl)):
            if self.strategy.dynamic and p.shape[-1] > 1 and name not in self._warned and (p.max(-1) > 0.9).any():
                self._warned.add(name)
                log.warning("the %s sampling distribution is collapsing (max p %.3f > 0.9); "
                            "consider mixing.min_prob or a lower mixing.actor_lr", name, float(p.max()))
        return pg, pl
