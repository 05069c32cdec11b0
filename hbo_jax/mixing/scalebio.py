"""ScaleBiO as a training method (`algorithm=scalebio`): data weights learned against a validation set.

An auxiliary model u and the main model w start from the same base; the logits lambda of
the data weights p = softmax(lambda) start at 0 (uniform). Each step updates all three
on one training batch and one validation batch (`hbo_jax.mixing.scalebio_step`); w is
the model that is evaluated, exported and checkpointed as `train`.

Batches (`scalebio.sampling`): `uniform` draws them uniformly over the pooled training
examples and p reweights the loss, as the reference does; `weights` has the hierarchical
sampler draw subsets with p_global = p (refreshed after every step) and examples
uniformly within a subset, and the loss is the plain mean. With `scalebio.local_actors`
(sampling=weights only) HBO's local actors choose the difficulty buckets inside each
subset as the sampling strategies do with `mixing.local_source=train` (`local_actors`):
ScaleBiO decides across subsets, HBO within them.

Outputs: p and lambda in `mixing.jsonl` every `train.log_every` steps and at the end
(as `p_global`, with the sampler's `p_local`, so the plots and the report read them),
L1, L2_w, L2_u and their gap in `metrics.jsonl`, and the learned weights as a static
schedule in `scalebio_weights.json` (`mixing.strategy=replay mixing.replay_from=<that
file>` trains on them; `python -m hbo_jax.mixing.draw` draws a fixed-size set from them).

LISA (`scalebio.lisa_layers` > 0, stacked blocks): u and w each train `lisa_layers`
blocks at a time plus the embeddings, final norm and head, redrawn every
`lisa_interval` steps (`ScaleBiOLisa`); their optimizer states cover that view only.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from hbo_jax import lisa
from hbo_jax.algorithm import Algorithm, PlanContext, RunContext
from hbo_jax.data.sampler import ProbabilitySchedule
from hbo_jax.data.validation import ValidationBatches, training_duplicates, validation_examples
from hbo_jax.mixing.scalebio_step import FULL, LISA, LambdaState, init_lambda, make_optimizers, make_scalebio_step
from hbo_jax.mixing.strategies import Mixer, save_schedule
from hbo_jax.mixing.strategy import resolve
from hbo_jax.parallel import check_batch_size, global_batch_from_host, host_slice, replicated
from hbo_jax.rng import Stream
from hbo_jax.step import abstract_train_state, init_train_state, state_shardings

log = logging.getLogger(__name__)

WEIGHTS_FILE = "scalebio_weights.json"


def softmax(logits) -> np.ndarray:
    """p = softmax(lambda) on the host, in float64."""
    z = np.asarray(logits, np.float64)
    e = np.exp(z - z.max())
    return e / e.sum()


def _copy(tree):
    """A second copy of the parameters on the same devices and shardings (u and w start equal)."""
    return jax.jit(lambda t: jax.tree.map(jnp.copy, t))(tree)


def _lambda_shardings(lam, mesh):
    return jax.tree.map(lambda _: replicated(mesh), lam)


def local_actors(ctx: RunContext) -> Mixer:
    """HBO's local actors alone, for `scalebio.local_actors`: the sampling strategies' Mixer
    with the local-only strategy (`hbo_local`) rewarded from the training batches.

    Its state, update and reward are the sampling strategies' with `mixing.local_source=train`:
    logits over each subset's difficulty buckets, updated every `mixing.local_every` steps
    (`mixing.actor_lr`, `inner_steps`, `kl_to_prior`; `min_prob` floors p_local) from the PPL
    ratio of w on the training batches to the scoring pass's NLLs, relative to the subset's
    bucket mean. Its global actor is a fixed uniform prior nobody reads (ScaleBiO's p is the
    subsets' distribution); the `mixing.*` keys of a global actor are not read.
    """
    cfg, data = ctx.cfg, ctx.data
    mc = dataclasses.replace(cfg.mixing, strategy="hbo_local", local_source="train", temperature=math.inf,
                             global_reward="auto", global_source="probes", replay_from="")
    return Mixer(resolve(mc), mc, data.sizes, data.leaves(), data.train, ctx.graphdef, ctx.mesh, cfg.data.seq_len,
                 data.pad_id, cfg.train.resolved_data_seed, train_batch=cfg.train.batch_size)


def _num_layers(params) -> int:
    return jax.tree.leaves(params.raw_mapping[lisa.BLOCKS])[0].shape[0]


class ScaleBiOLisa:
    """LISA for u and w: their layer draws, and what a switch does to their block moments.

    u draws from stream LISA_U; w from LISA_W, or LISA_U too with `lisa_shared_choice`
    (the reference draws independently). The draws depend on (seed, stream, switch index)
    alone, so a resumed run recomputes them; host-kept moments (`lisa_moments=host`) go
    into the checkpoint as the trees `lisa_host_u` and `lisa_host_w`.
    """

    def __init__(self, sc, num_layers: int, seed: int, mesh, opt_shardings: dict, opt_states: dict):
        streams = {"u": Stream.LISA_U, "w": Stream.LISA_U if sc.lisa_shared_choice else Stream.LISA_W}
        keep = sc.lisa_moments == "host"
        if keep and jax.process_count() > 1:  # HostMoments gathers the block moments on one host
            raise ValueError("scalebio.lisa_moments=host runs on one process only: use lisa_moments=reset")
        self.models = {k: lisa.LisaSwitcher(lisa.LisaSchedule(num_layers, sc.lisa_layers, sc.lisa_interval, seed,
                                                              int(s)), mesh, opt_states.get(k), opt_shardings[k], keep)
                       for k, s in streams.items()}
        self.host = {k: m.host for k, m in self.models.items()} if keep else None

    @property
    def schedules(self) -> dict:
        return {k: m.schedule for k, m in self.models.items()}

    def active(self, step: int) -> dict:
        """{"u": [gamma], "w": [gamma]} block indices at `step` (0-based), replicated."""
        return {k: m.active(step) for k, m in self.models.items()}

    def switch(self, step: int, name: str, opt_state):
        """`opt_state` of model `name` ready for step `step`: its block moments reset or swapped on a new draw."""
        return self.models[name].switch(step, opt_state)

    def state(self) -> dict:
        """The host-kept moments as arrays on the host's CPU device (a checkpoint restores arrays by their
        sharding); a copy, so only checkpoints ask for it (`ScaleBiO.params` does not)."""
        if self.host is None:
            return {}
        cpu = jax.devices("cpu")[0]
        return {f"lisa_host_{k}": jax.device_put(h.state(), cpu) for k, h in self.host.items()}

    def load_state(self, trees: dict) -> None:
        for k, h in (self.host or {}).items():
            h.load_state(jax.tree.map(np.array, trees[f"lisa_host_{k}"]))  # writable host copies


class ScaleBiO(Algorithm):
    """u, w and the data-weight logits, trained together (module docstring)."""

    label = "scalebio"
    mean_metrics = ("L1", "L2_w", "L2_u", "gap", "grad_norm_u")

    def __init__(self, ctx: RunContext):
        cfg, data, mesh, tc, sc = ctx.cfg, ctx.data, ctx.mesh, ctx.cfg.train, ctx.cfg.scalebio
        self.cfg, self.names, self.k, self.total_steps = cfg, list(data.names), data.num_buckets, tc.steps
        self.mesh, self.run_dir = mesh, Path(cfg.run_dir)
        self.uniform = sc.sampling == "uniform"
        self.val_rows = sc.val_batch_size or tc.batch_size
        check_batch_size("scalebio.val_batch_size", self.val_rows, mesh)
        examples = validation_examples(cfg, data)
        dup = training_duplicates(examples, data.train)
        if dup:
            log.warning("scalebio: %d of the %d validation examples have the same tokens as a training example",
                        dup, len(examples))
        log.info("scalebio: %d validation examples, %d a step; sampling=%s", len(examples), self.val_rows,
                 sc.sampling)
        self.val = ValidationBatches(examples, self.val_rows, cfg.data.seq_len, data.pad_id, tc.resolved_data_seed)
        self.txs = make_optimizers(sc, tc.steps)
        if sc.lisa_layers:
            lisa.check_stacked(cfg.model)
            init = lambda params, tx: lisa.init_lisa_state(params, tx, mesh, sc.lisa_layers)  # noqa: E731
        else:
            init = lambda params, tx: init_train_state(params, tx, mesh)  # noqa: E731
        self.w = init(_copy(ctx.params), self.txs.w)
        self.u = init(ctx.params, self.txs.u)
        self.lam = init_lambda(len(self.names), self.txs.lam, mesh)
        shardings = (state_shardings(self.u), state_shardings(self.w), _lambda_shardings(self.lam, mesh))
        self.lisa = None
        if sc.lisa_layers:
            self.lisa = ScaleBiOLisa(sc, _num_layers(self.w.params), tc.resolved_data_seed, mesh,
                                     {"u": shardings[0].opt_state, "w": shardings[1].opt_state},
                                     {"u": self.u.opt_state, "w": self.w.opt_state})
            log.info("scalebio: LISA, %d of %d blocks of u and of w at a time, redrawn every %d steps (%s choice, "
                     "moments %s on a switch)", sc.lisa_layers, _num_layers(self.w.params), sc.lisa_interval,
                     "shared" if sc.lisa_shared_choice else "independent",
                     "reset" if self.lisa.host is None else "kept on the host")
        # HBO's local actors (`local_actors`): the batches carry each row's starting NLL for their reward.
        self.local = local_actors(ctx) if sc.local_actors else None
        self.batch_fields = frozenset({"ref_nll"}) if self.local else frozenset()
        self._step = make_scalebio_step(ctx.graphdef, self.txs, mesh, len(self.names), self.k, sc, tc.steps,
                                        shardings, self.uniform, LISA if sc.lisa_layers else FULL,
                                        ref_nll=self.local is not None)
        sizes = np.array([[len(leaf) for leaf in row] for row in data.leaves()], np.float64)
        # Without local actors: uniform over a subset's examples; with them: the actors' start (uniform over buckets).
        self.p_local = self.local.probabilities()[1] if self.local else sizes / sizes.sum(1, keepdims=True)
        p0 = sizes.sum(1) / sizes.sum() if self.uniform else softmax(np.zeros(len(self.names)))
        self.schedule = ProbabilitySchedule(p0, self.p_local)

    def state(self) -> dict:
        return {"train": self.w, "u": self.u, "lambda": self.lam, **(self.lisa.state() if self.lisa else {}),
                **({"mixer": self.local.state} if self.local else {})}

    def load_state(self, trees: dict, meta: dict) -> None:
        self.w, self.u, self.lam = trees["train"], trees["u"], trees["lambda"]
        if self.lisa:
            self.lisa.load_state(trees)
        if self.local:  # the actors, their reward sums since the last update, and the p_local they give
            self.local.state = trees["mixer"]
            self.local.load_statistics(meta.get("mix_acc"))
            self.p_local = self.local.probabilities()[1]

    def meta(self) -> dict:
        return {"mix_acc": self.local.saved_statistics()} if self.local else {}

    @property
    def mixing_seconds(self) -> float:
        return self.local.seconds if self.local else 0.0

    @property
    def params(self):
        return self.w.params

    def start_probabilities(self) -> tuple:
        return softmax(np.zeros(len(self.names))), self.p_local  # lambda starts at 0

    def traced_state(self) -> dict:
        return {"lambda": self.lam, **({"mixer": self.local.state} if self.local else {})}

    def p(self) -> np.ndarray:
        """The current data weights p = softmax(lambda) (identical on every process: lambda is replicated)."""
        return softmax(jax.device_get(self.lam.logits))

    def step(self, done: int, batch) -> tuple[dict, list[dict]]:
        val = global_batch_from_host(self.val.host_batch(done - 1, host_slice(self.val_rows)), self.mesh)
        if self.lisa is None:
            self.u, self.w, self.lam, metrics = self._step(self.u, self.w, self.lam, batch, val)
        else:  # step done - 1 (0-based): a new draw first resets or swaps the block moments
            self.u, self.w = (s.replace(opt_state=self.lisa.switch(done - 1, k, s.opt_state))
                              for k, s in (("u", self.u), ("w", self.w)))
            self.u, self.w, self.lam, metrics = self._step(self.u, self.w, self.lam, batch, val,
                                                           self.lisa.active(done - 1))
        rewards = {}
        if self.local is not None:
            metrics, rewards = self._local_update(done, metrics)
        # A local update is logged at its step, with its rewards, as the sampling strategies log theirs.
        log_now = done % self.cfg.train.log_every == 0 or done == self.total_steps or bool(rewards)
        if self.uniform and not log_now:
            return metrics, []
        p = self.p()
        if not self.uniform and done < self.total_steps:  # the next batch is drawn with the new p
            self.schedule.set(done, p, self.p_local)
        if not log_now:
            return metrics, []
        host = jax.device_get({k: metrics[k] for k in self.mean_metrics})
        record = {"step": done, "p_global": p.tolist(), "p_local": self.p_local.tolist(),
                  "lambda": np.asarray(jax.device_get(self.lam.logits), np.float64).tolist(),
                  **{k: float(v) for k, v in host.items()}, **rewards}
        self.save_weights(p)
        return metrics, [record]

    def _local_update(self, done: int, metrics: dict) -> tuple[dict, dict]:
        """The local actors take the step's statistics and, when due (never after the last step), update
        p_local. Returns (metrics, the update's `reward_local` and `ppl_ratio` for mixing.jsonl, or {})."""
        metrics = self.local.observe(dict(metrics))
        record = self.local.update(done, self.w.params) if done < self.total_steps else None
        if record is None:
            return metrics, {}
        self.p_local = np.asarray(record["p_local"], np.float64)
        return metrics, {k: record[k] for k in ("reward_local", "ppl_ratio")}

    def save_weights(self, p: np.ndarray) -> None:
        """The learned weights as a one-entry schedule (`mixing.replay_from` reads it)."""
        if jax.process_index() == 0:
            save_schedule(self.run_dir / WEIGHTS_FILE, ProbabilitySchedule(p, self.p_local), self.names)

    def summary(self) -> dict:
        p = self.p()
        weights = dict(zip(self.names, p.tolist()))
        local = {"local_actor_updates": int(jax.device_get(self.local.state.num_updates)[1])} if self.local else {}
        return {"strategy": "scalebio", "sampling": self.cfg.scalebio.sampling, **local,
                "scalebio_weights": weights, "scalebio_lambda": jax.device_get(self.lam.logits).tolist(),
                "scalebio_weights_file": str(self.run_dir / WEIGHTS_FILE),
                # What the report shows as the final mixture: the learned weights, whichever batches were drawn.
                "p_global_final": weights,
                "sampled_p_global_final": dict(zip(self.names, self.schedule.at(self.total_steps)[0].tolist()))}

    @classmethod
    def programs(cls, plan: PlanContext) -> list[tuple[str, object, int]]:
        """The u-step, the w-step and the lambda step (`ScaleBiOStep`), each with the state it does not take."""
        cfg, mesh, sc = plan.cfg, plan.mesh, plan.cfg.scalebio
        txs = make_optimizers(sc, cfg.train.steps)
        if sc.lisa_layers:  # the optimizer states cover the view: gamma blocks and the outer parameters
            u, w = (lisa.abstract_lisa_state(plan.params, tx, mesh, sc.lisa_layers) for tx in (txs.u, txs.w))
        else:
            u, w = (abstract_train_state(plan.params, tx, mesh) for tx in (txs.u, txs.w))
        rep = replicated(mesh)
        logits = jax.ShapeDtypeStruct((plan.num_datasets,), jnp.float32, sharding=rep)
        lam = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep),
                           jax.eval_shape(lambda x: LambdaState(x, txs.lam.init(x)), logits))
        shardings = (state_shardings(u), state_shardings(w), _lambda_shardings(lam, mesh))
        step = make_scalebio_step(plan.graphdef, txs, mesh, plan.num_datasets, cfg.data.num_buckets, sc,
                                  cfg.train.steps, shardings, sc.sampling == "uniform",
                                  LISA if sc.lisa_layers else FULL, ref_nll=sc.local_actors)
        val = {k: v for k, v in plan.batch(sc.val_batch_size or cfg.train.batch_size).items()
               if k in ("input_ids", "targets", "loss_mask")}
        active = jax.ShapeDtypeStruct((sc.lisa_layers,), jnp.int32, sharding=rep)
        extra = ({"u": active, "w": active},) if sc.lisa_layers else ()
        return step.compile(u, w, lam, plan.batch(cfg.train.batch_size, ref_nll=sc.local_actors), val, *extra)
