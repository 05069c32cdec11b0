"""Actor state as a PyTree of logits, and the jitted REINFORCE-style update.

HBO's actors are softmax policies whose parameters are the logits themselves (reference
code `BaseActor`). The update takes `inner_steps` Adam steps on
    loss(w) = -sum_k R_k * log_softmax(w)_k,
whose gradient is -(R - p * sum R): the fixed point is p = R / sum R.
An optional guardrail adds kl * KL(p || prior) to the loss (off in the paper and code).
One Adam over the stacked local logits [D, K] equals D independent actors because Adam
is elementwise and the loss separates by row. Non-finite rewards never reach the logits:
the update is skipped and counted.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct


@struct.dataclass
class MixerState:
    global_logits: jax.Array  # [D]
    local_logits: jax.Array  # [D, K]
    global_opt: optax.OptState
    local_opt: optax.OptState
    global_ema: jax.Array  # [D], reference code initialises rbar to 1
    local_ref_nll: jax.Array  # [D, K, M] the fixed local probes' statistic at the start (NLL, or IFD)
    num_updates: jax.Array  # [2] int32: global, local
    num_skipped: jax.Array  # [] int32: updates skipped for non-finite rewards


def actor_optimizer(lr: float) -> optax.GradientTransformation:
    """Adam(lr, .9, .999, 1e-8), the reference code's actor optimizer."""
    return optax.adam(lr, b1=0.9, b2=0.999, eps=1e-8)


def init_mixer(prior: np.ndarray, num_buckets: int, num_local_probes: int, lr: float,
               flat: bool = False) -> MixerState:
    """Global logits = log(prior) (no MSE fitting loop); local logits uniform.

    With `flat`, the [D, K] local logits are one joint softmax over all groups (MoS+),
    initialised to log(prior_i / K).
    """
    prior = np.asarray(prior, np.float64)
    logp = np.log(np.maximum(prior / prior.sum(), 1e-30))
    g = jnp.asarray(logp, jnp.float32)
    loc = (jnp.asarray(np.repeat(logp[:, None] - np.log(num_buckets), num_buckets, 1), jnp.float32)
           if flat else jnp.zeros((len(prior), num_buckets), jnp.float32))
    tx = actor_optimizer(lr)
    return MixerState(
        global_logits=g, local_logits=loc, global_opt=tx.init(g), local_opt=tx.init(loc),
        global_ema=jnp.ones_like(g),
        local_ref_nll=jnp.zeros((len(prior), num_buckets, num_local_probes), jnp.float32),
        num_updates=jnp.zeros(2, jnp.int32), num_skipped=jnp.zeros((), jnp.int32))


def _log_softmax(w, flat: bool):
    return jax.nn.log_softmax(w.reshape(-1)).reshape(w.shape) if flat else jax.nn.log_softmax(w, axis=-1)


def reinforce(logits, opt_state, rewards, lr: float, inner_steps: int, flat: bool = False,
              kl: float = 0.0, prior_logp=None):
    """`inner_steps` Adam steps on -sum(R * log_softmax(w)) [+ kl * KL(p || prior)].

    The softmax is over the last axis (one actor per row), or over all entries with `flat`.
    Returns (logits, opt_state, ok); a non-finite reward or result leaves both unchanged.
    """
    tx = actor_optimizer(lr)

    def loss(w):
        logp = _log_softmax(w, flat)
        out = -jnp.sum(rewards * logp)
        if kl > 0:
            out = out + kl * jnp.sum(jnp.exp(logp) * (logp - prior_logp))
        return out

    def body(_, carry):
        w, st = carry
        upd, st = tx.update(jax.grad(loss)(w), st, w)
        return optax.apply_updates(w, upd), st

    new_w, new_st = jax.lax.fori_loop(0, inner_steps, body, (logits, opt_state))
    ok = jnp.all(jnp.isfinite(rewards)) & jnp.all(jnp.isfinite(new_w))
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
    return keep(new_w, logits), keep(new_st, opt_state), ok


@functools.partial(jax.jit, static_argnames=("lr", "inner_steps", "ema", "kl"))
def update_global(state: MixerState, rewards: jax.Array, *, lr: float, inner_steps: int, ema: float,
                  kl: float = 0.0, prior_logp=None):
    """Global actor step from per-dataset rewards [D] (optionally EMA-smoothed first)."""
    finite = jnp.all(jnp.isfinite(rewards))
    smoothed = ema * rewards + (1.0 - ema) * state.global_ema if ema > 0 else rewards
    ema_state = jnp.where(finite, smoothed, state.global_ema) if ema > 0 else state.global_ema
    w, opt, ok = reinforce(state.global_logits, state.global_opt, smoothed, lr, inner_steps,
                           kl=kl, prior_logp=prior_logp)
    return state.replace(
        global_logits=w, global_opt=opt, global_ema=ema_state,
        num_updates=state.num_updates.at[0].add(ok.astype(jnp.int32)),
        num_skipped=state.num_skipped + (~ok).astype(jnp.int32)), smoothed


@functools.partial(jax.jit, static_argnames=("lr", "inner_steps", "flat", "kl"))
def update_local(state: MixerState, rewards: jax.Array, *, lr: float, inner_steps: int, flat: bool = False,
                 kl: float = 0.0, prior_logp=None):
    """Local actors' step from per-bucket rewards [D, K] (one flat actor over all with `flat`)."""
    w, opt, ok = reinforce(state.local_logits, state.local_opt, rewards, lr, inner_steps, flat,
                           kl=kl, prior_logp=prior_logp)
    return state.replace(
        local_logits=w, local_opt=opt,
        num_updates=state.num_updates.at[1].add(ok.astype(jnp.int32)),
        num_skipped=state.num_skipped + (~ok).astype(jnp.int32))


def probabilities(state: MixerState, flat: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(p_global [D], p_local [D, K]) read once on the host.

    With `flat`, the joint p(i, j) of the flat actor factorises as p_global[i] = sum_j p(i, j)
    and p_local[i, j] = p(i, j) / p_global[i], which the hierarchical sampler draws exactly.
    """
    if flat:
        joint = np.asarray(jax.device_get(jax.nn.softmax(state.local_logits.reshape(-1))), np.float64)
        joint = joint.reshape(state.local_logits.shape)
        pg = joint.sum(1)
        return pg, joint / np.maximum(pg[:, None], 1e-30)
    pg, pl = jax.device_get((jax.nn.softmax(state.global_logits), jax.nn.softmax(state.local_logits, -1)))
    return np.asarray(pg, np.float64), np.asarray(pl, np.float64)
