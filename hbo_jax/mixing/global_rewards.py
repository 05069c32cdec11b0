"""Per-dataset rewards of the global actor, each one jitted call over all D probe batches.

Probe rows arrive as [D * P, T] (dataset-major, padded with loss-free rows so the rows
divide the mesh's batch axes); `lax.map` walks the datasets so one gradient is live at
a time.

  gradnorm              ||grad L(B_i)||, the probe batch's gradient norm (paper Eq. 7)
  gradnorm_per_example  mean over B_i of ||grad L(x)|| (the reference code's value; it
                        favours short examples)
  cossim                mean over j != i of cos(h_i, h_j), h_i the mean final hidden state
                        over B_i's response positions (MoS transferability)
  dev_cosine            cos(grad L(B_i), grad L(B_dev)) against a dev-set batch (MultiDDS)
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from hbo_jax.parallel import batch_sharding, replicated
from hbo_jax.step import masked_mean_loss, token_nll


def _per_dataset(num_datasets: int, *arrays):
    return tuple(a.reshape((num_datasets, -1) + a.shape[1:]) for a in arrays)


def _loss_fn(graphdef, ids, tg, m):
    return lambda p: masked_mean_loss(token_nll(graphdef, p, ids, tg), m)


def _jit(f, mesh, n_batch_args: int = 3):
    bs = batch_sharding(mesh)
    return jax.jit(f, in_shardings=(None,) + (bs,) * n_batch_args, out_shardings=replicated(mesh))


def make_gradnorm_fn(graphdef, mesh, num_datasets: int) -> Callable:
    """`f(params, ids, targets, mask) -> [D]` batch-gradient norms."""

    def f(params, input_ids, targets, loss_mask):
        def one(x):
            return optax.tree.norm(jax.grad(_loss_fn(graphdef, *x))(params))

        return jax.lax.map(one, _per_dataset(num_datasets, input_ids, targets, loss_mask))

    return _jit(f, mesh)


def make_per_example_gradnorm_fn(graphdef, mesh, num_datasets: int, chunk: int = 4) -> Callable:
    """`f(params, ids, targets, mask) -> [D]` mean per-example gradient norms.

    Examples run `chunk` at a time (vmapped per-example gradients inside `lax.map`); rows
    with an empty loss mask (padding) are left out of the mean.
    """

    def f(params, input_ids, targets, loss_mask):
        def one(x):
            ids, tg, m = x
            g = jax.grad(_loss_fn(graphdef, ids[None], tg[None], m[None]))(params)
            return optax.tree.norm(g)

        norms = jax.lax.map(one, (input_ids, targets, loss_mask), batch_size=chunk)
        real = (loss_mask.sum(-1) > 0).astype(jnp.float32)
        norms, real = _per_dataset(num_datasets, norms, real)
        return jnp.sum(norms * real, 1) / jnp.maximum(jnp.sum(real, 1), 1.0)

    return _jit(f, mesh)


def mean_hidden(graphdef, params, input_ids, loss_mask) -> jax.Array:
    """Mean final hidden state over the loss positions of a batch [D]."""
    h = nnx.merge(graphdef, params).hidden(input_ids).astype(jnp.float32)
    w = loss_mask.astype(jnp.float32)[..., None]
    return jnp.sum(h * w, axis=(0, 1)) / jnp.maximum(jnp.sum(w), 1.0)


def cosine_to_others(h: jax.Array) -> jax.Array:
    """[D, H] -> [D]: each row's mean cosine similarity to the other rows."""
    u = h / jnp.maximum(jnp.linalg.norm(h, axis=-1, keepdims=True), 1e-12)
    sim = u @ u.T
    d = h.shape[0]
    return (jnp.sum(sim, 1) - jnp.diagonal(sim)) / max(d - 1, 1)


def make_cossim_fn(graphdef, mesh, num_datasets: int) -> Callable:
    """`f(params, ids, targets, mask) -> [D]` MoS transferability rewards (no gradients)."""

    def f(params, input_ids, targets, loss_mask):
        del targets
        xs = _per_dataset(num_datasets, input_ids, loss_mask)
        h = jax.lax.map(lambda x: mean_hidden(graphdef, params, *x), xs)
        return cosine_to_others(h)

    return _jit(f, mesh)


def tree_cosine(a, b) -> jax.Array:
    dot = sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    return dot / jnp.maximum(optax.tree.norm(a) * optax.tree.norm(b), 1e-12)


def make_dev_cosine_fn(graphdef, mesh, num_datasets: int) -> Callable:
    """`f(params, ids, targets, mask, dev_ids, dev_targets, dev_mask) -> [D]` MultiDDS rewards."""

    def f(params, input_ids, targets, loss_mask, dev_ids, dev_targets, dev_mask):
        g_dev = jax.grad(_loss_fn(graphdef, dev_ids, dev_targets, dev_mask))(params)

        def one(x):
            return tree_cosine(jax.grad(_loss_fn(graphdef, *x))(params), g_dev)

        return jax.lax.map(one, _per_dataset(num_datasets, input_ids, targets, loss_mask))

    return _jit(f, mesh, n_batch_args=6)


MAKERS = {"gradnorm": make_gradnorm_fn, "gradnorm_per_example": make_per_example_gradnorm_fn,
          "cossim": make_cossim_fn, "dev_cosine": make_dev_cosine_fn}
