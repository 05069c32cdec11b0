"""Jitted train and forward steps over the mesh.

A batch is a dict of global arrays, rows sharded over (data, fsdp):
  input_ids [B, T] int32, targets [B, T] int32, loss_mask [B, T] float32,
  group_id [B] int32 (= dataset * K + bucket).
The loss is the token mean of the response-only NLL (paper Eq. 1). The train step also
returns per-group statistics reduced with `segment_sum`; since the batch is a global
array, the sums are global on every host without any explicit collective.

A packed batch (`data.packing`, see `hbo_jax.data.packing`) has R rows of several
examples each, plus positions [R, T] and segment_ids [R, T] (global example index + 1,
0 = padding); group_id (and ref_nll) stay one per example [B]. Per-example sums are then
segment sums over segment_ids, so the loss and every group statistic match the unpacked
batch.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from hbo_jax.models.ghost import Ghost
from hbo_jax.models.llama import LayerOverride
from hbo_jax.parallel import batch_sharding, replicated

Batch = dict[str, jax.Array]


@struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


def token_nll(graphdef, params, input_ids: jax.Array, targets: jax.Array,
              positions: jax.Array | None = None, segment_ids: jax.Array | None = None,
              ghost: Ghost | None = None, override: LayerOverride | None = None) -> jax.Array:
    """Per-token negative log-likelihood [B, T] in fp32 (packed rows: pass positions and segment_ids).

    With the model's `loss_chunk`, the logits are made `loss_chunk` positions at a time
    (not with `ghost`, whose head needs every position's logits gradient at once).
    `override`: blocks that run with other parameters (`hbo_jax.lisa`).
    """
    model = nnx.merge(graphdef, params)
    positions = positions if segment_ids is not None else None
    chunk = model.spec.loss_chunk
    if ghost is not None or not chunk or input_ids.shape[1] <= chunk:
        logits = model(input_ids, positions, segment_ids, ghost=ghost, override=override)
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return chunked_nll(model, model.hidden(input_ids, positions, segment_ids, override), targets, chunk)


def chunked_nll(model, h: jax.Array, targets: jax.Array, chunk: int) -> jax.Array:
    """Per-token NLL [B, T] from hidden states [B, T, D], unembedding `chunk` positions at a time.

    Each chunk's logits are rematerialised in the backward pass, so at most one chunk's
    [B, chunk, V] logits (and their gradient) are live instead of the whole sequence's.
    """
    b, t, _ = h.shape
    n = -(-t // chunk)
    pad = n * chunk - t  # padded positions are computed and dropped
    hs = jnp.pad(h, ((0, 0), (0, pad), (0, 0))).reshape(b, n, chunk, -1).swapaxes(0, 1)
    ts = jnp.pad(targets, ((0, 0), (0, pad))).reshape(b, n, chunk).swapaxes(0, 1)

    @jax.checkpoint
    def one(x):
        return optax.softmax_cross_entropy_with_integer_labels(model.unembed(x[0]), x[1])

    return jax.lax.map(one, (hs, ts)).swapaxes(0, 1).reshape(b, n * chunk)[:, :t]


def example_grad_norms(sq_norms: jax.Array, count: jax.Array, total_tokens: jax.Array) -> jax.Array:
    """Per-example ||grad of the example's mean NLL|| [E] from the ghost probe's gradient.

    The probe's gradient is ||grad L_e||^2 with L_e the example's share of the batch loss
    sum_t nll_t / N; the example's own mean loss is (N / count_e) L_e.
    """
    n = jnp.maximum(total_tokens, 1.0)
    return jnp.sqrt(jnp.maximum(sq_norms, 0.0)) * n / jnp.maximum(count, 1.0)


def masked_mean_loss(nll: jax.Array, mask: jax.Array) -> jax.Array:
    return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def example_nll(nll: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(mean NLL over each example's loss tokens [B], loss-token count [B])."""
    count = jnp.sum(mask, axis=-1)
    return jnp.sum(nll * mask, axis=-1) / jnp.maximum(count, 1.0), count


def packed_example_nll(nll: jax.Array, mask: jax.Array, segment_ids: jax.Array,
                       num_examples: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Packed rows -> (mean NLL [E], NLL sum [E], loss-token count [E]) per example.

    Segment 0 (padding) takes slot 0 of the segment sum and is dropped.
    """
    seg = lambda x: jax.ops.segment_sum(x.reshape(-1), segment_ids.reshape(-1),
                                        num_segments=num_examples + 1)[1:]
    tok_sum, count = seg(nll * mask), seg(mask)
    return tok_sum / jnp.maximum(count, 1.0), tok_sum, count


def group_stats(ex_nll, tok_sum, count, group_id, num_groups: int) -> dict[str, jax.Array]:
    """Per-group sums over the global batch: example NLL, token NLL, tokens, examples."""
    seg = lambda x: jax.ops.segment_sum(x, group_id, num_segments=num_groups)
    return {"group_example_nll": seg(ex_nll), "group_token_nll": seg(tok_sum),
            "group_tokens": seg(count), "group_examples": seg(jnp.ones_like(ex_nll))}


def group_ppl_ratio(ex_nll, ref_nll, group_id, num_groups: int) -> jax.Array:
    """Per-group sum of each example's PPL_theta / PPL_theta0 = exp(NLL - NLL under the
    starting model): the local HBO reward's statistic, measured on a training batch."""
    ratio = jnp.exp(jax.lax.stop_gradient(ex_nll) - ref_nll)
    return jax.ops.segment_sum(ratio, group_id, num_segments=num_groups)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """Scales the updates by min(1, max_norm / global norm); `optax.clip_by_global_norm`'s result.

    One scalar multiply per leaf lets XLA fuse the clip into the Adam update. optax's
    select-and-divide form makes it keep a clipped copy of every gradient: the compiled
    step's scratch memory was 2.0x the fp32 parameters with it and 1.03x with this
    (SmolLM2-135M and the 1.2B benchmark shape on CPU; tests/test_step.py keeps it so).
    """

    def update_fn(updates, state, params=None):
        del params
        factor = jnp.minimum(1.0, max_norm / jnp.maximum(optax.tree.norm(updates), 1e-30))
        return jax.tree.map(lambda t: t * factor.astype(t.dtype), updates), state

    return optax.GradientTransformation(optax.init_empty_state, update_fn)


# optax.apply_if_finite applies a non-finite update once more than this many came in a
# row; its int32 counter saturates at this value, so it never does. The run stops from
# the host instead (train.max_nonfinite_steps, hbo_jax/nonfinite.py).
_NEVER_GIVE_UP = int(jnp.iinfo(jnp.int32).max)


class SkipNonFinite(NamedTuple):
    """`optax.apply_if_finite(inner)` (its `init` and `update`, for any optax caller), plus `inner`.

    The train step does not call `update`: its `lax.cond` returns the updates as a whole
    new tree, which XLA cannot fuse into the parameter update, so the step would hold a
    second fp32 gradient-sized buffer (scratch 2.0x the fp32 parameters instead of 1.1x on
    the shape of tests/test_step.py; 1.05x without any skipping). `apply_update` takes the
    same decision with the same state (`optax.ApplyIfFiniteState`) around the update *and*
    its application instead (tests/test_step.py checks it against `update`).
    """

    init: Callable
    update: Callable
    inner: optax.GradientTransformation


ADAM_BETAS = (0.9, 0.95)


def make_optimizer(lr: float, steps: int, warmup: int, weight_decay: float, clip: float,
                   moments: optax.GradientTransformation | None = None) -> SkipNonFinite:
    """AdamW (b1 0.9, b2 0.95) on a warmup + cosine schedule, after clipping at `clip` (0: none).

    An update whose gradients hold a NaN or inf is skipped, as `optax.apply_if_finite`
    does: the parameters and the AdamW state stay as they were, and the optimizer state
    counts it (`nonfinite_metrics`, `total_nonfinite`).

    `moments` replaces AdamW's `optax.scale_by_adam` (the rest of `optax.adamw`'s chain,
    weight decay then the schedule, is kept), e.g. LISA's per-block Adam (`hbo_jax.lisa`).
    """
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(warmup, 1), max(steps, warmup + 1), lr * 0.1)
    if moments is None:
        adamw = optax.adamw(schedule, b1=ADAM_BETAS[0], b2=ADAM_BETAS[1], weight_decay=weight_decay)
    else:  # optax.adamw's own chain around other moments
        adamw = optax.chain(moments, optax.add_decayed_weights(weight_decay), optax.scale_by_learning_rate(schedule))
    # identity keeps the state's tree the same either way, so a resume may change `clip`
    return skip_nonfinite(optax.chain(clip_by_global_norm(clip) if clip > 0 else optax.identity(), adamw))


def skip_nonfinite(inner: optax.GradientTransformation) -> SkipNonFinite:
    """`inner` wrapped so that an update with non-finite gradients is skipped and counted (`apply_update`)."""
    tx = optax.apply_if_finite(inner, max_consecutive_errors=_NEVER_GIVE_UP)
    return SkipNonFinite(tx.init, tx.update, inner)


def apply_update(tx, grads, opt_state, params):
    """(new params, new optimizer state) after one step of `tx` on `grads`.

    For a `SkipNonFinite` optimizer: `optax.apply_if_finite`'s decision and bookkeeping
    (never giving up), with the whole update inside the branch, so that clip, AdamW and
    the parameter update stay one fused pass over the parameters.
    """
    if not isinstance(tx, SkipNonFinite):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state
    finite = jnp.all(jnp.array([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))

    def step(_):
        updates, inner = tx.inner.update(grads, opt_state.inner_state, params)
        return optax.apply_updates(params, updates), inner

    params, inner = jax.lax.cond(finite, step, lambda _: (params, opt_state.inner_state), None)
    return params, optax.ApplyIfFiniteState(
        notfinite_count=jnp.where(finite, jnp.zeros([], jnp.int32), optax.safe_increment(opt_state.notfinite_count)),
        last_finite=finite,
        total_notfinite=jnp.where(finite, opt_state.total_notfinite, optax.safe_increment(opt_state.total_notfinite)),
        inner_state=inner)


def nonfinite_metrics(opt_state) -> dict[str, jax.Array]:
    """From a `make_optimizer` state after an update: `nonfinite` (1 when that update was
    skipped) and `nonfinite_streak` (skipped updates in a row up to it); {} for other optimizers."""
    if not isinstance(opt_state, optax.ApplyIfFiniteState):
        return {}
    return {"nonfinite": jnp.logical_not(opt_state.last_finite).astype(jnp.int32),
            "nonfinite_streak": opt_state.notfinite_count}


def total_nonfinite(opt_state) -> int:
    """Updates skipped for a non-finite loss or gradients since the run started (0 for other optimizers)."""
    if not isinstance(opt_state, optax.ApplyIfFiniteState):
        return 0
    return int(jax.device_get(opt_state.total_notfinite))


def _replicate_unsharded(tree, mesh):
    """optax leaves such as `count` come out on one device; replicate them over the mesh."""
    def fix(x):
        if isinstance(x, jax.Array) and not isinstance(x.sharding, jax.sharding.NamedSharding):
            return jax.device_put(x, replicated(mesh))
        return x
    return jax.tree.map(fix, tree)


def init_train_state(params, tx, mesh) -> TrainState:
    opt_state = _replicate_unsharded(tx.init(params), mesh)
    return TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), replicated(mesh)),
                      params=params, opt_state=opt_state)


def abstract_train_state(params, tx, mesh) -> TrainState:
    """The TrainState of `init_train_state` as ShapeDtypeStructs, from abstract sharded params.

    Moments are laid out like their parameters (as `tx.init` on real arrays does); the
    rest (step counts) is replicated, as `init_train_state` puts it.
    """
    struct = lambda x, sharding: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)  # noqa: E731
    shardings = jax.tree.map(lambda x: x.sharding, params)
    opt = optax.tree_utils.tree_map_params(tx, struct, jax.eval_shape(tx.init, params), shardings,
                                           transform_non_params=lambda x: struct(x, replicated(mesh)))
    return TrainState(struct(jnp.zeros((), jnp.int32), replicated(mesh)), params, opt)


def state_shardings(state: TrainState):
    return jax.tree.map(lambda x: x.sharding, state)


def step_metrics(loss, nll, grads, opt_state, batch: Batch, num_groups: int, packing: bool):
    """(a train step's metrics, each example's mean NLL [E], its loss-token count [E]).

    The metrics every train step returns: `loss`, `grad_norm`, `tokens`, the non-finite
    counters and the per-group sums of `group_stats`.
    """
    mask = batch["loss_mask"]
    if packing:
        ex_nll, tok_sum, count = packed_example_nll(nll, mask, batch["segment_ids"], batch["group_id"].shape[0])
    else:
        (ex_nll, count), tok_sum = example_nll(nll, mask), jnp.sum(nll * mask, -1)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "tokens": jnp.sum(mask),
               **nonfinite_metrics(opt_state)}
    metrics.update(group_stats(ex_nll, tok_sum, count, batch["group_id"], num_groups))
    return metrics, ex_nll, count


def train_batch_shardings(mesh, packing: bool = False, ref_nll: bool = False) -> dict:
    """The shardings of a train batch's fields (rows over the batch axes)."""
    bs = batch_sharding(mesh)
    out = {"input_ids": bs, "targets": bs, "loss_mask": bs, "group_id": batch_sharding(mesh, 1)}
    if packing:
        out.update(positions=bs, segment_ids=bs)
    if ref_nll:
        out["ref_nll"] = batch_sharding(mesh, 1)
    return out


def make_train_step(graphdef, tx, mesh, num_groups: int, state_sharding, ref_nll: bool = False,
                    packing: bool = False, example_gradnorm: bool = False) -> Callable:
    """Returns jitted `step(state, batch) -> (state, metrics)`; the state is donated.

    With `ref_nll`, the batch carries each row's NLL under the starting model and the
    metrics add `group_ppl_ratio`: the per-group sum of PPL_theta / PPL_theta0 over the
    batch's examples (the local HBO reward, measured on the training batch for free).
    With `packing`, the batch is packed (module docstring); the metrics are the same.
    With `example_gradnorm`, the metrics add `group_gradnorm`: the per-group sum of each
    example's gradient norm (of its mean NLL), from the same backward pass
    (`hbo_jax.models.ghost`); the update is unchanged.
    """

    def step(state: TrainState, batch: Batch):
        seg = batch["segment_ids"] if packing else None
        pos = batch["positions"] if packing else None
        probe = jnp.zeros(batch["group_id"].shape, jnp.float32) if example_gradnorm else None

        def loss_fn(params, probe):
            ghost = None if probe is None else Ghost(probe, seg)
            nll = token_nll(graphdef, params, batch["input_ids"], batch["targets"], pos, seg, ghost)
            return masked_mean_loss(nll, batch["loss_mask"]), nll

        argnums = (0, 1) if example_gradnorm else 0
        (loss, nll), grads = jax.value_and_grad(loss_fn, argnums, has_aux=True)(state.params, probe)
        if example_gradnorm:
            grads, sq_norms = grads
        params, opt_state = apply_update(tx, grads, state.opt_state, state.params)
        mask = batch["loss_mask"]
        metrics, ex_nll, count = step_metrics(loss, nll, grads, opt_state, batch, num_groups, packing)
        if example_gradnorm:
            norms = example_grad_norms(sq_norms, count, jnp.sum(mask))
            metrics["group_gradnorm"] = jax.ops.segment_sum(norms, batch["group_id"], num_segments=num_groups)
        if ref_nll:
            metrics["group_ppl_ratio"] = group_ppl_ratio(ex_nll, batch["ref_nll"], batch["group_id"], num_groups)
        return TrainState(state.step + 1, params, opt_state), metrics

    in_batch = train_batch_shardings(mesh, packing, ref_nll)
    # keep_unused: the step only writes the optimizer's `last_finite`; pruning that input
    # would make the compiled program's inputs differ from the state (hbo_jax.memory plans with them).
    return jax.jit(step, in_shardings=(state_sharding, in_batch),
                   out_shardings=(state_sharding, replicated(mesh)), donate_argnums=(0,), keep_unused=True)


@dataclasses.dataclass(frozen=True)
class ExampleNll:
    """`f(params, input_ids, targets, loss_mask, columns=None) -> (example mean NLL [B], tokens [B])`.

    `columns` [B, R] (`hbo_jax.data.scoring.scored_columns`): the positions each row scores, -1
    after its last; the output head then runs on those R positions instead of all T. The head
    and its log-softmax over the vocabulary are about a fifth of a forward at SmolLM2-135M's
    shape (49K vocabulary): batch 8 x 128 tokens, 32 of them scored, 3.28 -> 2.70 s on this CPU.

    Attributes:
        everywhere: The jitted function without `columns` (its `lower` plans memory).
        at_columns: The jitted function with them.
    """

    everywhere: Callable
    at_columns: Callable

    def __call__(self, params, input_ids, targets, loss_mask, columns=None):
        if columns is None:
            return self.everywhere(params, input_ids, targets, loss_mask)
        return self.at_columns(params, input_ids, targets, loss_mask, columns)


def make_example_nll_fn(graphdef, mesh) -> ExampleNll:
    """The per-example mean NLL of a batch, jitted for `mesh` (`ExampleNll`)."""

    def everywhere(params, input_ids, targets, loss_mask):
        return example_nll(token_nll(graphdef, params, input_ids, targets), loss_mask)

    def at_columns(params, input_ids, targets, loss_mask, columns):
        model = nnx.merge(graphdef, params)
        at = jnp.maximum(columns, 0)
        h = jnp.take_along_axis(model.hidden(input_ids, None, None), at[..., None], axis=1)  # [B, R, D]
        picked = jnp.take_along_axis(targets, at, axis=1)
        chunk = model.spec.loss_chunk
        if chunk and columns.shape[1] > chunk:
            nll = chunked_nll(model, h, picked, chunk)
        else:
            nll = optax.softmax_cross_entropy_with_integer_labels(model.unembed(h), picked)
        return example_nll(nll, jnp.take_along_axis(loss_mask, at, axis=1) * (columns >= 0))

    bs = batch_sharding(mesh)
    return ExampleNll(jax.jit(everywhere, in_shardings=(None, bs, bs, bs), out_shardings=replicated(mesh)),
                      jax.jit(at_columns, in_shardings=(None, bs, bs, bs, bs), out_shardings=replicated(mesh)))
