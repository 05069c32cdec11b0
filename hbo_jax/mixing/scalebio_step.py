"""ScaleBiO's jitted step: u, w and the data-weight logits lambda updated together.

The first-order penalty (minimax) form the reference code solves is

    min over (lambda, w), max over u:  L1(w) + alpha * (L2(w, lambda) - L2(u, lambda))

with p = softmax(lambda), L1 the token-mean loss on a validation batch and L2 the
p-weighted train loss: sum over sources s of p_s * (mean over the examples of s in the
global batch of each example's mean response-token loss); a source absent from the
batch contributes 0. One step, on one global train batch B_t and one validation batch
V_t, with every gradient taken at (u_t, w_t, lambda_t) (simultaneous descent-ascent):

  u      descends on L2(u)                    (three forward+backward passes a step:
  w      descends on alpha * L2(w) + L1(w)     u on B_t, w on B_t and on V_t)
  lambda descends on alpha * (L2(w) - L2(u)), whose gradient has the closed form
         alpha * (diag p - p p^T) (m^w - m^u), m = per-source mean losses on B_t,
         so no derivative through lambda is taken (`lambda_grad`).

Gradients reach the optimizers in units of grad L2: u gets grad L2(u), w gets
grad L2(w) + grad L1(w) / alpha. The reference feeds AdamW alpha times these, clipped at
alpha (`--clip_model`); clipping g at 1 and running Adam with eps / alpha is the same
update (Adam's step is invariant to the scale of its gradients but for eps), and keeps
the clip a static threshold that XLA fuses into the update (`make_optimizers`).
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import struct

from hbo_jax import lisa
from hbo_jax.parallel import batch_sharding, replicated
from hbo_jax.step import (Batch, TrainState, apply_update, clip_by_global_norm, example_nll, group_stats,
                          masked_mean_loss, nonfinite_metrics, skip_nonfinite, token_nll)

# torch.optim.AdamW's defaults: the reference sets only the learning rate and (u, w) the weight decay.
_B1, _B2, _EPS = 0.9, 0.999, 1e-8


@struct.dataclass
class LambdaState:
    """The data-weight logits [S] (p = softmax) and their AdamW state, replicated."""

    logits: jax.Array
    opt_state: Any


class Optimizers(NamedTuple):
    """The optimizers of u, w (`SkipNonFinite`: a non-finite update is skipped) and lambda."""

    u: Any
    w: Any
    lam: Any


class Selection(NamedTuple):
    """Which parameters a step trains: `view(params, active)` -> the trainable tree (what the
    gradient and the optimizer state cover), `write_back(params, trainable, active)` -> params,
    and `token_nll(graphdef, params, trainable, active, input_ids, targets)` -> per-token NLL
    of the model whose trainable part is `trainable` (differentiated in `trainable`).

    `FULL` trains every parameter (`active` is None). `LISA` trains the view of the active
    stacked blocks plus the always-trained embeddings, norm and head (`hbo_jax.lisa`), with
    `active` the block indices, an input of the step.
    """

    view: Callable[[Any, Any], Any]
    write_back: Callable[[Any, Any, Any], Any]
    token_nll: Callable[..., jax.Array]


FULL = Selection(view=lambda params, active: params, write_back=lambda params, trainable, active: trainable,
                 token_nll=lambda graphdef, params, trainable, active, ids, targets: token_nll(
                     graphdef, trainable, ids, targets))
# The frozen stack serves the inactive blocks inside the scanned body, so no second copy of
# the blocks is made and the gradient covers the view only.
LISA = Selection(view=lisa.view, write_back=lisa.write_back, token_nll=lisa.lisa_token_nll)


def reference_schedule(peak: float, steps: int, warmup_ratio: float, tau: float = 1.0,
                       outer_iters: int = 1) -> Callable:
    """The reference's learning rate at update t: linear warm-up over int(steps * ratio) updates
    from 0, then cosine to 0 at `steps`, times tau^-i in outer iteration i."""
    warmup = int(steps * warmup_ratio)
    inner = max(steps // outer_iters, 1)

    def lr(count):
        t = jnp.asarray(count, jnp.float32)
        cosine = 0.5 * (1.0 + jnp.cos(math.pi * (t - warmup) / max(steps - warmup, 1)))
        base = peak * jnp.where(t < warmup, t / max(warmup, 1), cosine)
        return base * tau ** -outer_iteration(count, inner, outer_iters).astype(jnp.float32)

    return lr


def outer_iteration(step, inner: int, outer_iters: int) -> jax.Array:
    """The outer iteration (of `outer_iters`, `inner` steps each) that step `step` (0-based) is in."""
    return jnp.minimum(jnp.asarray(step, jnp.int32) // inner, outer_iters - 1)


def alpha_at(sc, steps: int, step) -> jax.Array:
    """alpha in force at step `step` (0-based): the reference multiplies it by tau before each outer iteration."""
    i = outer_iteration(step, max(steps // sc.outer_iters, 1), sc.outer_iters)
    return sc.alpha * sc.tau ** (i + 1).astype(jnp.float32)


def make_optimizers(sc, steps: int) -> Optimizers:
    """AdamW for u, w (clipped, in grad-L2 units: module docstring) and lambda, on the reference's schedules.

    With LISA (`sc.lisa_layers` > 0) the models' Adam moments cover the trainable view
    only, with one bias-correction count per active block slot (`lisa.lisa_moments`);
    the rest of torch's AdamW (decoupled weight decay, then the learning rate) is
    `optax.adamw`'s own chain.
    """
    sched = lambda peak: reference_schedule(peak, steps, sc.warmup_ratio, sc.tau, sc.outer_iters)
    clip = clip_by_global_norm(sc.clip) if sc.clip > 0 else optax.identity()
    # eps / alpha: the reference's eps on alpha-scaled gradients (exact while alpha is constant).
    eps = _EPS / sc.alpha

    def adamw(peak):
        if not sc.lisa_layers:
            return optax.adamw(sched(peak), _B1, _B2, eps, weight_decay=sc.wd_uw)
        return optax.chain(lisa.lisa_moments(sc.lisa_layers, _B1, _B2, eps), optax.add_decayed_weights(sc.wd_uw),
                           optax.scale_by_learning_rate(sched(peak)))

    model = lambda peak: skip_nonfinite(optax.chain(clip, adamw(peak)))
    lam = optax.adamw(sched(sc.lr_lambda), _B1, _B2, _EPS, weight_decay=sc.wd_lambda)
    return Optimizers(model(sc.lr_u), model(sc.lr_w), lam)


def init_lambda(num_sources: int, tx, mesh) -> LambdaState:
    """Logits 0 (p uniform), replicated."""
    logits = jax.device_put(jnp.zeros((num_sources,), jnp.float32), replicated(mesh))
    return jax.device_put(LambdaState(logits, tx.init(logits)), replicated(mesh))


def source_means(ex_nll: jax.Array, source: jax.Array, num_sources: int) -> tuple[jax.Array, jax.Array]:
    """(mean example loss per source [S], examples per source [S]) over the global batch; 0 where absent."""
    sums = jax.ops.segment_sum(ex_nll, source, num_segments=num_sources)
    counts = jax.ops.segment_sum(jnp.ones_like(ex_nll), source, num_segments=num_sources)
    return jnp.where(counts > 0, sums / jnp.maximum(counts, 1.0), 0.0), counts


def example_weights(p: jax.Array, source: jax.Array, counts: jax.Array, uniform: bool) -> jax.Array:
    """Each example's weight in the train loss L2 [B].

    uniform (batches uniform over the pooled examples): p_s / c_s, so L2 = sum_s p_s * m_s
    (the reference); otherwise the batch was drawn with p already: 1 / B, the plain mean.
    """
    if uniform:
        return p[source] / jnp.maximum(counts[source], 1.0)
    return jnp.full(source.shape, 1.0 / source.shape[0], jnp.float32)


def lambda_grad(p: jax.Array, m_w: jax.Array, m_u: jax.Array, alpha) -> jax.Array:
    """Gradient of alpha * (L2(w) - L2(u)) in lambda: alpha * (diag p - p p^T) (m^w - m^u)."""
    d = m_w - m_u
    return alpha * p * (d - jnp.dot(p, d))


def make_scalebio_step(graphdef, txs: Optimizers, mesh, num_datasets: int, num_buckets: int, sc, steps: int,
                       shardings: tuple, uniform: bool, selection: Selection = FULL) -> Callable:
    """Returns jitted `step(u, w, lam, batch, val, active=None) -> (u, w, lam, metrics)`.

    `u` and `w` are TrainStates (their optimizer states cover `selection.view` of the
    parameters), `lam` a LambdaState; all three are donated. `batch` is a training batch
    (`hbo_jax.step`), `val` a validation batch (input_ids, targets, loss_mask). `active`
    is what `selection` needs ({"u": ..., "w": ...}; None for every parameter).

    metrics: `loss` (w's token-mean train loss), `grad_norm` (w's, in grad-L2 units, before
    clipping), `tokens`, w's per-group sums (`group_stats`), `nonfinite`/`nonfinite_streak`
    (u or w skipped), and L1, L2_w, L2_u, gap = L2_w - L2_u, grad_norm_u.
    """
    groups = num_datasets * num_buckets

    def step(u: TrainState, w: TrainState, lam: LambdaState, batch: Batch, val: Batch, active=None):
        act_u, act_w = (None, None) if active is None else (active["u"], active["w"])
        alpha = alpha_at(sc, steps, w.step)
        p = jax.nn.softmax(lam.logits)
        source = batch["group_id"] // num_buckets
        counts = jax.ops.segment_sum(jnp.ones(source.shape, jnp.float32), source, num_segments=num_datasets)
        weights = example_weights(p, source, counts, uniform)

        def train_nll(params, trainable, act):
            nll = selection.token_nll(graphdef, params, trainable, act, batch["input_ids"], batch["targets"])
            return nll, example_nll(nll, batch["loss_mask"])[0]

        def loss_u(trainable):
            _, ex = train_nll(u.params, trainable, act_u)
            return jnp.sum(weights * ex), ex

        def loss_w(trainable):
            nll, ex = train_nll(w.params, trainable, act_w)
            val_nll = selection.token_nll(graphdef, w.params, trainable, act_w, val["input_ids"], val["targets"])
            l1 = masked_mean_loss(val_nll, val["loss_mask"])
            return jnp.sum(weights * ex) + l1 / alpha, (nll, ex, l1)

        (_, ex_u), g_u = jax.value_and_grad(loss_u, has_aux=True)(selection.view(u.params, act_u))
        (_, (nll_w, ex_w, l1)), g_w = jax.value_and_grad(loss_w, has_aux=True)(selection.view(w.params, act_w))
        m_u, _ = source_means(jax.lax.stop_gradient(ex_u), source, num_datasets)
        m_w, _ = source_means(jax.lax.stop_gradient(ex_w), source, num_datasets)

        new_u, opt_u = apply_update(txs.u, g_u, u.opt_state, selection.view(u.params, act_u))
        new_w, opt_w = apply_update(txs.w, g_w, w.opt_state, selection.view(w.params, act_w))
        g_lam = lambda_grad(p, m_w, m_u, alpha)
        upd, opt_lam = txs.lam.update(g_lam, lam.opt_state, lam.logits)

        mask = batch["loss_mask"]
        l2_w, l2_u = jnp.dot(p, m_w), jnp.dot(p, m_u)
        nf_u, nf_w = nonfinite_metrics(opt_u), nonfinite_metrics(opt_w)
        metrics = {"loss": masked_mean_loss(nll_w, mask), "grad_norm": optax.tree.norm(g_w), "tokens": jnp.sum(mask),
                   "nonfinite": jnp.maximum(nf_u["nonfinite"], nf_w["nonfinite"]),
                   "nonfinite_streak": jnp.maximum(nf_u["nonfinite_streak"], nf_w["nonfinite_streak"]),
                   "L1": l1, "L2_w": l2_w, "L2_u": l2_u, "gap": l2_w - l2_u, "grad_norm_u": optax.tree.norm(g_u)}
        metrics.update(group_stats(ex_w, jnp.sum(nll_w * mask, -1), jnp.sum(mask, -1), batch["group_id"], groups))
        u = TrainState(u.step + 1, selection.write_back(u.params, new_u, act_u), opt_u)
        w = TrainState(w.step + 1, selection.write_back(w.params, new_w, act_w), opt_w)
        return u, w, LambdaState(optax.apply_updates(lam.logits, upd), opt_lam), metrics

    bs = batch_sharding(mesh)
    in_batch = {"input_ids": bs, "targets": bs, "loss_mask": bs, "group_id": batch_sharding(mesh, 1)}
    in_val = {"input_ids": bs, "targets": bs, "loss_mask": bs}
    su, sw, slam = shardings
    rep = replicated(mesh)
    active_in = () if selection is FULL else (rep,)  # LISA's {"u": [gamma], "w": [gamma]} block indices
    return jax.jit(step, in_shardings=(su, sw, slam, in_batch, in_val, *active_in), out_shardings=(su, sw, slam, rep),
                   donate_argnums=(0, 1, 2), keep_unused=True)
