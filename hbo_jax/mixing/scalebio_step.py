"""ScaleBiO's step: u, w and the data-weight logits lambda updated together.

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

The step runs as four compiled programs, one pass each where a pass is taken (u's; w's
on B_t; w's on V_t with w's update; lambda's closed form), so the device's peak is one
pass's temporaries over the run's state, not the three passes' together (`ScaleBiOStep`).
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
from hbo_jax.step import (Batch, TrainState, apply_update, clip_by_global_norm, example_nll, group_ppl_ratio,
                          group_stats, masked_mean_loss, nonfinite_metrics, skip_nonfinite, token_nll,
                          train_batch_shardings)

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
    `token_nll(graphdef, params, trainable, active, input_ids, targets)` -> per-token NLL
    of the model whose trainable part is `trainable` (differentiated in `trainable`), and
    `view_shardings(param_shardings)` -> the trainable tree's shardings (its gradient's).

    `FULL` trains every parameter (`active` is None). `LISA` trains the view of the active
    stacked blocks plus the always-trained embeddings, norm and head (`hbo_jax.lisa`), with
    `active` the block indices, an input of the step.
    """

    view: Callable[[Any, Any], Any]
    write_back: Callable[[Any, Any, Any], Any]
    token_nll: Callable[..., jax.Array]
    view_shardings: Callable[[Any], Any]


FULL = Selection(view=lambda params, active: params, write_back=lambda params, trainable, active: trainable,
                 token_nll=lambda graphdef, params, trainable, active, ids, targets: token_nll(
                     graphdef, trainable, ids, targets), view_shardings=lambda shardings: shardings)
# The frozen stack serves the inactive blocks inside the scanned body, so no second copy of
# the blocks is made and the gradient covers the view only.
LISA = Selection(view=lisa.view, write_back=lisa.write_back, token_nll=lisa.lisa_token_nll,
                 view_shardings=lisa.view_shardings)


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


def _weighted_train_loss(graphdef, selection: Selection, num_datasets: int, num_buckets: int, uniform: bool):
    """`loss(params, trainable, logits, batch, active) -> (L2, (token NLL [B, T], example NLL [B]))`:
    the p-weighted train loss of the model whose trainable part is `trainable`."""

    def loss(params, trainable, logits, batch: Batch, act):
        source = batch["group_id"] // num_buckets
        counts = jax.ops.segment_sum(jnp.ones(source.shape, jnp.float32), source, num_segments=num_datasets)
        weights = example_weights(jax.nn.softmax(logits), source, counts, uniform)
        nll = selection.token_nll(graphdef, params, trainable, act, batch["input_ids"], batch["targets"])
        ex = example_nll(nll, batch["loss_mask"])[0]
        return jnp.sum(weights * ex), (nll, ex)

    return loss


def _active(rest):
    return rest[0] if rest else None  # LISA's block indices; none for FULL


def _model_programs(graphdef, txs: Optimizers, selection: Selection, num_datasets: int, num_buckets: int,
                    uniform: bool, sc, steps: int) -> tuple[Callable, Callable, Callable]:
    """The unjitted u-step, w's train-gradient program and w's validation-and-update program.

    u_step(u, logits, batch[, active]) -> (u, {m, grad_norm_u, nonfinite...}): descent on L2(u).
    w_grads(w, logits, batch[, active]) -> (grad L2(w), {m, loss, tokens, group sums}); a batch
    with `ref_nll` (HBO's local actors, `scalebio.local_actors`) adds `group_ppl_ratio`.
    w_update(w, grads, val[, active]) -> (w, {alpha, L1, grad_norm, nonfinite...}): descent on
    grads + grad L1(w) / alpha. w's two passes are two programs so that only one pass's
    activations are live at a time: in one program, even ordered by an optimization barrier,
    XLA kept both passes' temporaries (the w-step's scratch was twice the u-step's).
    """
    train_loss = _weighted_train_loss(graphdef, selection, num_datasets, num_buckets, uniform)

    def train_pass(state: TrainState, logits, batch: Batch, act):
        """(trainable view, grad L2 in it, token NLL, example NLL, per-source means m)."""
        trainable = selection.view(state.params, act)
        (_, (nll, ex)), grads = jax.value_and_grad(train_loss, 1, has_aux=True)(state.params, trainable, logits,
                                                                                  batch, act)
        m = source_means(jax.lax.stop_gradient(ex), batch["group_id"] // num_buckets, num_datasets)[0]
        return trainable, grads, nll, ex, m

    def u_step(state: TrainState, logits, batch: Batch, *rest):
        act = _active(rest)
        trainable, grads, _, _, m = train_pass(state, logits, batch, act)
        new, opt_state = apply_update(txs.u, grads, state.opt_state, trainable)
        out = {"m": m, "grad_norm_u": optax.tree.norm(grads), **nonfinite_metrics(opt_state)}
        return TrainState(state.step + 1, selection.write_back(state.params, new, act), opt_state), out

    def w_grads(state: TrainState, logits, batch: Batch, *rest):
        _, grads, nll, ex, m = train_pass(state, logits, batch, _active(rest))
        mask, groups = batch["loss_mask"], num_datasets * num_buckets
        out = {"m": m, "loss": masked_mean_loss(nll, mask), "tokens": jnp.sum(mask),
               **group_stats(ex, jnp.sum(nll * mask, -1), jnp.sum(mask, -1), batch["group_id"], groups)}
        if "ref_nll" in batch:  # w's progress since the start on this batch, as the sampling strategies measure it
            out["group_ppl_ratio"] = group_ppl_ratio(ex, batch["ref_nll"], batch["group_id"], groups)
        return grads, out

    def w_update(state: TrainState, grads, val: Batch, *rest):
        act = _active(rest)
        alpha = alpha_at(sc, steps, state.step)
        trainable = selection.view(state.params, act)

        def loss_val(t):
            l1 = masked_mean_loss(selection.token_nll(graphdef, state.params, t, act, val["input_ids"],
                                                      val["targets"]), val["loss_mask"])
            return l1 / alpha, l1

        (_, l1), g_val = jax.value_and_grad(loss_val, has_aux=True)(trainable)
        grads = jax.tree.map(jnp.add, grads, g_val)
        new, opt_state = apply_update(txs.w, grads, state.opt_state, trainable)
        out = {"alpha": alpha, "L1": l1, "grad_norm": optax.tree.norm(grads), **nonfinite_metrics(opt_state)}
        return TrainState(state.step + 1, selection.write_back(state.params, new, act), opt_state), out

    return u_step, w_grads, w_update


def device_bytes(tree) -> int:
    """Bytes one device holds of `tree`'s arrays (or sharded ShapeDtypeStructs)."""
    def nbytes(x):
        shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
        return math.prod(shape) * jnp.dtype(x.dtype).itemsize

    return sum(nbytes(x) for x in jax.tree.leaves(tree))


class ScaleBiOStep:
    """`step(u, w, lam, batch, val, active=None) -> (u, w, lam, metrics)` as four compiled programs.

    The u-step, w's train-gradient program, w's validation-and-update program and the
    lambda step run one after the other, each donating what it replaces, so the device
    holds one pass's temporaries at a time: the peak is the largest program's (with the
    state it does not take), where one program holding all three passes kept their
    activations live together. Every gradient is still taken at (u_t, w_t, lambda_t):
    u and w read lambda before the lambda step replaces it.
    """

    def __init__(self, programs: tuple, lisa: bool, names: tuple[str, ...]):
        self.u_step, self.w_grads, self.w_update, self.lam_step = programs
        self.lisa, self.names = lisa, names

    def _active(self, active, key):
        return (active[key],) if self.lisa else ()

    def __call__(self, u: TrainState, w: TrainState, lam: LambdaState, batch: Batch, val: Batch, active=None):
        act_w = self._active(active, "w")
        u, out_u = self.u_step(u, lam.logits, batch, *self._active(active, "u"))
        grads, out_train = self.w_grads(w, lam.logits, batch, *act_w)
        w, out_val = self.w_update(w, grads, val, *act_w)
        del grads  # freed before the lambda step, as `compile` counts it
        lam, metrics = self.lam_step(lam, out_u, out_train, out_val)
        drop = ("m", "alpha", "nonfinite", "nonfinite_streak")
        return u, w, lam, {**{k: v for k, v in {**out_train, **out_val}.items() if k not in drop},
                           "grad_norm_u": out_u["grad_norm_u"], **metrics}

    def compile(self, u, w, lam, batch, val, active=None) -> list[tuple[str, Any, int]]:
        """(name, compiled program, bytes the run holds on the device outside its inputs while it
        runs) of each program, from sharded ShapeDtypeStructs (`hbo_jax.memory`)."""
        act_u, act_w = self._active(active, "u"), self._active(active, "w")
        out_u = jax.eval_shape(self.u_step, u, lam.logits, batch, *act_u)[1]
        grads, out_train = jax.eval_shape(self.w_grads, w, lam.logits, batch, *act_w)
        out_val = jax.eval_shape(self.w_update, w, grads, val, *act_w)[1]
        state = device_bytes((u, w, lam, batch, val, active))
        calls = (((u, lam.logits, batch, *act_u), ()),  # (arguments, earlier outputs still on the device)
                 ((w, lam.logits, batch, *act_w), (out_u,)),
                 ((w, grads, val, *act_w), (out_u, grads, out_train)),
                 ((lam, out_u, out_train, out_val), (out_u, out_train, out_val)))
        programs = (self.u_step, self.w_grads, self.w_update, self.lam_step)
        return [(name, fn.lower(*args).compile(), state + device_bytes(live) - device_bytes(args))
                for name, fn, (args, live) in zip(self.names, programs, calls)]


def make_scalebio_step(graphdef, txs: Optimizers, mesh, num_datasets: int, num_buckets: int, sc, steps: int,
                       shardings: tuple, uniform: bool, selection: Selection = FULL,
                       ref_nll: bool = False) -> ScaleBiOStep:
    """Returns `step(u, w, lam, batch, val, active=None) -> (u, w, lam, metrics)` (`ScaleBiOStep`).

    `u` and `w` are TrainStates (their optimizer states cover `selection.view` of the
    parameters), `lam` a LambdaState; all three are donated. `batch` is a training batch
    (`hbo_jax.step`), `val` a validation batch (input_ids, targets, loss_mask). `active`
    is what `selection` needs ({"u": ..., "w": ...}; None for every parameter). With `ref_nll`,
    `batch` carries each row's NLL under the starting model and the metrics add
    `group_ppl_ratio` of w (`hbo_jax.step.make_train_step`'s), for HBO's local actors.

    metrics: `loss` (w's token-mean train loss), `grad_norm` (w's, in grad-L2 units, before
    clipping), `tokens`, w's per-group sums (`group_stats`), `nonfinite`/`nonfinite_streak`
    (u or w skipped), and L1, L2_w, L2_u, gap = L2_w - L2_u, grad_norm_u.
    """
    u_step, w_grads, w_update = _model_programs(graphdef, txs, selection, num_datasets, num_buckets, uniform,
                                                sc, steps)

    def lam_step(lam: LambdaState, out_u: dict, out_train: dict, out_val: dict):
        p = jax.nn.softmax(lam.logits)
        m_u, m_w = out_u["m"], out_train["m"]
        upd, opt_lam = txs.lam.update(lambda_grad(p, m_w, m_u, out_val["alpha"]), lam.opt_state, lam.logits)
        l2_w, l2_u = jnp.dot(p, m_w), jnp.dot(p, m_u)
        metrics = {"L2_w": l2_w, "L2_u": l2_u, "gap": l2_w - l2_u,
                   **{k: jnp.maximum(out_u[k], out_val[k]) for k in ("nonfinite", "nonfinite_streak")}}
        return LambdaState(optax.apply_updates(lam.logits, upd), opt_lam), metrics

    bs = batch_sharding(mesh)
    in_batch = train_batch_shardings(mesh, ref_nll=ref_nll)
    in_val = {"input_ids": bs, "targets": bs, "loss_mask": bs}
    su, sw, slam = shardings
    rep = replicated(mesh)
    lisa_on = selection is not FULL
    active_in = (rep,) if lisa_on else ()  # LISA's [gamma] block indices
    jit = lambda fn, ins, outs, donate=(0,): jax.jit(fn, in_shardings=ins, out_shardings=outs,  # noqa: E731
                                                     donate_argnums=donate, keep_unused=True)
    grad_sh = selection.view_shardings(sw.params)
    programs = (jit(u_step, (su, rep, in_batch, *active_in), (su, rep)),
                jit(w_grads, (sw, rep, in_batch, *active_in), (grad_sh, rep), donate=()),
                jit(w_update, (sw, grad_sh, in_val, *active_in), (sw, rep)),
                jit(lam_step, (slam, rep, rep, rep), (slam, rep)))
    what = f" [LISA {sc.lisa_layers}]" if lisa_on else ""
    names = tuple(f"scalebio {n}{what}" for n in ("u-step", "w train gradient", "w-step (validation)",
                                                   "lambda step"))
    return ScaleBiOStep(programs, lisa_on, names)
