"""LISA layer sampling: only `num_active` transformer blocks train at a time, and only they
have gradients and optimizer moments.

LISA (layerwise importance sampling, as ScaleBiO uses it) keeps the embeddings, the final
norm and the head always trainable and, every `interval` steps, draws `num_active` of the
model's L blocks uniformly without replacement; the others are frozen until the next draw.
The reference torch code freezes layers but keeps every block's Adam state, so it saves
no memory (the LISA authors' own runs dropped the state by restarting each interval).
Here the blocks are stacked (`model.scan_layers`) and:

- `view(params, active)` gathers the trainable view: the always-trainable parameters plus
  the active blocks' slices, `{"outer": {...}, "blocks": stacked [num_active, ...]}`;
  `write_back` scatters it into the stack (in place when the params are donated).
- `lisa_token_nll` runs the model from the frozen stack, taking the active layers'
  parameters from the view inside the scanned body (`LayerOverride`): differentiating it
  with respect to the view gives gradients for the view only, and no second copy of the
  blocks is ever made.
- `lisa_moments` is Adam over the view, one bias-correction count per active slot, so the
  optimizer state is the view's size. On a switch the block moments are reset (default),
  or kept on the host per layer and brought back when the layer is drawn again
  (`HostMoments`).
- `LisaSchedule` draws the layers from (seed, stream, switch index) alone, so a resumed
  run needs no extra state and the draws never depend on the hardware; two models share
  a choice with the same stream and draw independently with different streams.
- `active` is a device array: switching layers never recompiles.

`LisaSwitcher` follows one model's draws over a run (its indices put on the device once
per draw, its moments reset or swapped on a switch); `LisaRunner` ties it into a plain
fine-tuning step with the metrics of `hbo_jax.step.make_train_step`, and ScaleBiO runs
one for u and one for w.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from hbo_jax.models.llama import LayerOverride
from hbo_jax.parallel import replicated
from hbo_jax.step import (ADAM_BETAS, TrainState, abstract_train_state, apply_update, init_train_state,
                          make_optimizer, masked_mean_loss, step_metrics, token_nll, train_batch_shardings)

BLOCKS = "layers"  # the model's stacked blocks (`LlamaLM.layers` with scan_layers)


def check_stacked(spec) -> None:
    """Raises ValueError unless the model's blocks are stacked (LISA picks layers by index)."""
    if not getattr(spec, "scan_layers", False):
        raise ValueError("LISA needs stacked transformer blocks: set model.scan_layers=true")


# ----------------------------------------------------------------------------- draws


@dataclasses.dataclass(frozen=True)
class LisaSchedule:
    """Which blocks are active at each step: `num_active` of `num_layers`, redrawn every `interval` steps.

    The draw for switch k (steps k*interval .. (k+1)*interval - 1) is uniform without
    replacement from a generator seeded by (seed, stream, k) only. Two models (ScaleBiO's
    u and w) share their choice with the same `stream` and draw independently with
    different ones (the reference code draws independently).

    Attributes:
        num_layers: L, the model's blocks.
        num_active: Blocks trainable at a time (the reference's default 2; its math runs use 4).
        interval: Steps between draws (the reference's default 20).
        seed: The run's seed.
        stream: Separates the draws of models that choose independently.
    """

    num_layers: int
    num_active: int
    interval: int = 20
    seed: int = 0
    stream: int = 0

    def __post_init__(self):
        if not 1 <= self.num_active <= self.num_layers:
            raise ValueError(f"LISA: num_active={self.num_active} must be in 1..num_layers={self.num_layers}")
        if self.interval < 1:
            raise ValueError(f"LISA: interval={self.interval} must be >= 1")

    def switch(self, step: int) -> int:
        """The draw in force at `step` (steps counted from 0)."""
        return step // self.interval

    def active(self, step: int) -> np.ndarray:
        """The active layers at `step`: int32 [num_active], ascending."""
        rng = np.random.default_rng([self.seed, self.stream, self.switch(step)])
        return np.sort(rng.choice(self.num_layers, self.num_active, replace=False)).astype(np.int32)

    def switches_at(self, step: int) -> bool:
        """Whether a new draw starts at `step` (not at step 0, where training starts)."""
        return step > 0 and step % self.interval == 0


# ----------------------------------------------------------------------------- the view


def view(params, active: jax.Array) -> dict:
    """The trainable view: `{"outer": the always-trainable params, "blocks": the active blocks}`.

    Args:
        params: The model's `nnx.Param` state with stacked blocks.
        active: int32 [num_active], the active layers.

    Returns:
        `outer` holds every top-level parameter but the blocks (embeddings, final norm,
        head), as the same objects; `blocks` the active layers' slices, stacked in the
        order of `active`.
    """
    raw = params.raw_mapping
    return {"outer": {k: v for k, v in raw.items() if k != BLOCKS},
            "blocks": jax.tree.map(lambda x: jnp.take(x, active, axis=0), raw[BLOCKS])}


def write_back(params, trainable: dict, active: jax.Array):
    """`params` with the view written into it: the active layers' slices and the outer parameters.

    Under `jax.jit` with `params` donated, the stack is updated in place.
    """
    raw = params.raw_mapping
    blocks = jax.tree.map(lambda x, t: x.at[active].set(t.astype(x.dtype)), raw[BLOCKS], trainable["blocks"])
    return nnx.State({**raw, **trainable["outer"], BLOCKS: blocks})


def view_shardings(param_shardings) -> dict:
    """The shardings of `view`'s output from the params' (the layer axis is never sharded)."""
    raw = param_shardings.raw_mapping
    return {"outer": {k: v for k, v in raw.items() if k != BLOCKS}, "blocks": raw[BLOCKS]}


def lisa_token_nll(graphdef, params, trainable: dict, active: jax.Array, input_ids, targets,
                   positions=None, segment_ids=None) -> jax.Array:
    """Per-token NLL [B, T] of the model whose trainable view is `trainable` (`view`'s form).

    The frozen stack in `params` serves the inactive layers, the view's slices the active
    ones, so `jax.grad` with respect to `trainable` never touches the frozen blocks.
    """
    frozen = jax.lax.stop_gradient(params)
    model_params = nnx.State({**frozen.raw_mapping, **trainable["outer"]})
    return token_nll(graphdef, model_params, input_ids, targets, positions, segment_ids,
                     override=LayerOverride(active, trainable["blocks"]))


# ----------------------------------------------------------------------------- optimizer


class LisaAdamState(NamedTuple):
    """Adam moments over the trainable view, with one step count per active block slot.

    count: `{"outer": int32 [], "blocks": int32 [num_active]}`; a slot's count restarts
        with its moments, so a freshly drawn block gets Adam's bias correction from 1.
    mu, nu: Shaped like the view.
    """

    count: dict
    mu: Any
    nu: Any


def lisa_moments(num_active: int, b1: float = ADAM_BETAS[0], b2: float = ADAM_BETAS[1],
                 eps: float = 1e-8) -> optax.GradientTransformation:
    """`optax.scale_by_adam` over `view`'s output, run once per active block slot (vmapped).

    The outer parameters' Adam is exactly `optax.scale_by_adam`; each block slot is its
    own Adam with its own count, which `reset_block_moments` and `HostMoments` restart or
    restore per layer.
    """
    adam = optax.scale_by_adam(b1, b2, eps)

    def init(params):
        # Only tree maps over `params`: optax.tree_utils.tree_map_params finds mu and nu by it.
        zeros = optax.tree.zeros_like(params)
        count = {"outer": jnp.zeros([], jnp.int32), "blocks": jnp.zeros([num_active], jnp.int32)}
        return LisaAdamState(count, zeros, optax.tree.zeros_like(params))

    def update(updates, state, params=None):
        del params
        part = lambda key: optax.ScaleByAdamState(state.count[key], state.mu[key], state.nu[key])  # noqa: E731
        outer, so = adam.update(updates["outer"], part("outer"))
        blocks, sb = jax.vmap(adam.update)(updates["blocks"], part("blocks"))
        return ({"outer": outer, "blocks": blocks},
                LisaAdamState({"outer": so.count, "blocks": sb.count}, {"outer": so.mu, "blocks": sb.mu},
                              {"outer": so.nu, "blocks": sb.nu}))

    return optax.GradientTransformation(init, update)


def make_lisa_optimizer(lr: float, steps: int, warmup: int, weight_decay: float, clip: float, num_active: int):
    """`hbo_jax.step.make_optimizer` (schedule, clip, weight decay, non-finite skip) with `lisa_moments`."""
    return make_optimizer(lr, steps, warmup, weight_decay, clip, moments=lisa_moments(num_active))


def _is_lisa(x) -> bool:
    return isinstance(x, LisaAdamState)


def _map_lisa(opt_state, fn):
    return jax.tree.map(lambda s: fn(s) if _is_lisa(s) else s, opt_state, is_leaf=_is_lisa)


def reset_block_moments(opt_state):
    """The optimizer state with every block slot's moments and count at zero (outer kept)."""
    def reset(s: LisaAdamState) -> LisaAdamState:
        zero = lambda tree: {**tree, "blocks": jax.tree.map(jnp.zeros_like, tree["blocks"])}  # noqa: E731
        return LisaAdamState(zero(s.count), zero(s.mu), zero(s.nu))

    return _map_lisa(opt_state, reset)


def block_moments(opt_state) -> dict:
    """{"count", "mu", "nu"}: the block slots' part of the LISA Adam state."""
    found = []
    _map_lisa(opt_state, lambda s: found.append(s) or s)
    (s,) = found
    return {"count": s.count["blocks"], "mu": s.mu["blocks"], "nu": s.nu["blocks"]}


def with_block_moments(opt_state, moments: dict):
    """The optimizer state with the block slots' count, mu and nu replaced by `moments`."""
    def put(s: LisaAdamState) -> LisaAdamState:
        return LisaAdamState(*({**getattr(s, k), "blocks": moments[k]} for k in ("count", "mu", "nu")))

    return _map_lisa(opt_state, put)


class HostMoments:
    """Every layer's block moments on the host, for `keep_moments`: a layer leaving the active
    set leaves its moments here and gets them back when it is drawn again.

    Host memory: two fp32 copies of the stacked blocks (mu and nu) and a count per layer.
    `state()` / `load_state()` give and take the arrays for a checkpoint, so a resume is
    exact with them too.
    """

    def __init__(self, opt_state, num_layers: int):
        slots = jax.tree.map(lambda x: np.zeros((num_layers, *x.shape[1:]), x.dtype), block_moments(opt_state))
        self.store = slots

    def swap(self, opt_state, old: np.ndarray, new: np.ndarray):
        """Stores the slots of layers `old` and loads those of layers `new` into the optimizer state."""
        current = block_moments(opt_state)
        host = jax.device_get(current)

        def put(store, slots):
            store[np.asarray(old)] = slots

        jax.tree.map(put, self.store, host)
        loaded = jax.tree.map(lambda store, x: jax.device_put(store[np.asarray(new)], x.sharding), self.store, current)
        return with_block_moments(opt_state, loaded)

    def state(self) -> dict:
        return self.store

    def load_state(self, store: dict) -> None:
        self.store = jax.tree.map(np.asarray, store)


# ----------------------------------------------------------------------------- train step


def init_lisa_state(params, tx, mesh, num_active: int) -> TrainState:
    """TrainState(step 0, the full params, the optimizer state over a `num_active`-block view)."""
    trainable = jax.jit(view, out_shardings=view_shardings(jax.tree.map(lambda x: x.sharding, params)))(
        params, jnp.arange(num_active, dtype=jnp.int32))
    state = init_train_state(trainable, tx, mesh)
    return TrainState(state.step, params, state.opt_state)


def abstract_lisa_state(params, tx, mesh, num_active: int) -> TrainState:
    """`init_lisa_state`'s TrainState as ShapeDtypeStructs, from abstract sharded params (planning)."""
    shardings = jax.tree.map(lambda x: x.sharding, params)
    trainable = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                             jax.eval_shape(view, params, jnp.zeros(num_active, jnp.int32)), view_shardings(shardings))
    state = abstract_train_state(trainable, tx, mesh)
    return TrainState(state.step, params, state.opt_state)


def make_lisa_train_step(graphdef, tx, mesh, num_groups: int, state_sharding, packing: bool = False) -> Callable:
    """Jitted `step(state, batch, active) -> (state, metrics)`: fine-tuning of the view only.

    The batch and metrics are `hbo_jax.step.make_train_step`'s (`loss`, `grad_norm` of the
    view's gradient, `tokens`, the non-finite counters, the `group_*` sums). `active` is
    a replicated int32 [num_active] device array; the state (params donated, updated in
    place) is `init_lisa_state`'s.
    """

    def step(state: TrainState, batch, active):
        seg = batch["segment_ids"] if packing else None
        pos = batch["positions"] if packing else None

        def loss_fn(trainable):
            nll = lisa_token_nll(graphdef, state.params, trainable, active, batch["input_ids"], batch["targets"],
                                 pos, seg)
            return masked_mean_loss(nll, batch["loss_mask"]), nll

        trainable = view(state.params, active)
        (loss, nll), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
        trainable, opt_state = apply_update(tx, grads, state.opt_state, trainable)
        params = write_back(state.params, trainable, active)
        metrics = step_metrics(loss, nll, grads, opt_state, batch, num_groups, packing)[0]
        return TrainState(state.step + 1, params, opt_state), metrics

    return jax.jit(step, in_shardings=(state_sharding, train_batch_shardings(mesh, packing), replicated(mesh)),
                   out_shardings=(state_sharding, replicated(mesh)), donate_argnums=(0,), keep_unused=True)


class LisaSwitcher:
    """One model's LISA layers over a run: its draws, the active indices on the device, and
    what a new draw does to its block moments (reset, or swapped with the host-kept ones).

    Args:
        schedule: The model's layer draws.
        mesh: The device mesh (the indices are replicated on it).
        opt_state: The model's LISA optimizer state (shapes of the host-kept moments).
        opt_sharding: Its shardings (the reset keeps them).
        keep_moments: Keep each layer's moments on the host across switches (default: reset).
    """

    def __init__(self, schedule: LisaSchedule, mesh, opt_state=None, opt_sharding=None, keep_moments: bool = False):
        self.schedule, self.mesh = schedule, mesh
        self._reset = jax.jit(reset_block_moments, out_shardings=opt_sharding, donate_argnums=0)
        self.host = HostMoments(opt_state, schedule.num_layers) if keep_moments else None
        self._active = (None, None)  # (draw, its indices on the device): put once per draw

    def active(self, step: int) -> jax.Array:
        """The active layers at `step` as a replicated device array."""
        draw = self.schedule.switch(step)
        if self._active[0] != draw:
            self._active = (draw, jax.device_put(self.schedule.active(step), replicated(self.mesh)))
        return self._active[1]

    def switch(self, step: int, opt_state):
        """`opt_state` ready for step `step`: its block moments reset or swapped when a new draw starts there."""
        if not self.schedule.switches_at(step):
            return opt_state
        if self.host is None:
            return self._reset(opt_state)
        return self.host.swap(opt_state, self.schedule.active(step - 1), self.schedule.active(step))


class LisaRunner:
    """Plain fine-tuning with LISA: draws, switches and the train step, driven by the step count.

    Args:
        graphdef: The model's graph (stacked blocks).
        tx: The optimizer (`make_lisa_optimizer` with the schedule's `num_active`).
        mesh: The device mesh.
        num_groups: Groups of the batch's `group_id`.
        state: The run's `init_lisa_state` TrainState (for its shardings).
        schedule: The layer draws.
        keep_moments: Keep each layer's moments on the host across switches (default: reset).
        packing: Packed batches.
    """

    def __init__(self, graphdef, tx, mesh, num_groups: int, state: TrainState, schedule: LisaSchedule,
                 keep_moments: bool = False, packing: bool = False):
        check_stacked(nnx.merge(graphdef, state.params).spec)
        shardings = jax.tree.map(lambda x: x.sharding, state)
        self._step = make_lisa_train_step(graphdef, tx, mesh, num_groups, shardings, packing)
        self.layers = LisaSwitcher(schedule, mesh, state.opt_state, shardings.opt_state, keep_moments)

    def step(self, done: int, state: TrainState, batch) -> tuple[TrainState, dict]:
        """Takes step `done` (0-based): switches the layers first when a new draw starts there."""
        state = TrainState(state.step, state.params, self.layers.switch(done, state.opt_state))
        return self._step(state, batch, self.layers.active(done))


def compile_lisa_step(graphdef, params, tx, mesh, num_active: int, batch: dict, num_groups: int = 1,
                      packing: bool = False):
    """The LISA train step compiled from shapes (`params` and `batch` as sharded ShapeDtypeStructs),
    for the memory planner and benchmarks (`compiled.memory_analysis()`)."""
    state = abstract_lisa_state(params, tx, mesh, num_active)
    step = make_lisa_train_step(graphdef, tx, mesh, num_groups, jax.tree.map(lambda x: x.sharding, state), packing)
    active = jax.ShapeDtypeStruct((num_active,), jnp.int32, sharding=replicated(mesh))
    return step.lower(state, batch, active).compile()
