"""Per-example gradient norms inside the ordinary backward pass ("ghost norms").

The reference HBO code takes its global reward from per-example gradient norms of probe
examples, one backward each. Here the train step gets them for its own examples: every
parameterised op of the model routes through a `custom_vjp` that, besides the usual
gradients, writes each example's squared norm of *its own* parameter gradient into the
cotangent of a shared zero vector `probe` [E]. Differentiating the loss with respect to
`probe` therefore returns, per example e, sum over parameters of ||d L_e / d theta||^2,
without materialising one gradient per example.

For a weight used as y = x @ W over an example's tokens t, the example's gradient is
G_e = sum_t x_t dy_t^T and

    ||G_e||^2 = sum_{t,s in e} (x_t . x_s)(dy_t . dy_s)      (Gram form, T^2 (in + out))
              = ||x_e^T dy_e||^2                              (direct form, T in out)

whichever is cheaper. Packed rows hold several examples: the Gram form is masked to
token pairs of the same segment and summed per segment. A tied embedding is used twice
(lookup and output head), so its norm has a cross term 2 <G_lookup, G_head>: the head's
backward computes c_t = sum_s dlogits_s[token_t] h_s and hands it to the lookup's
backward as the cotangent of a zero side output `aux`, where <dx_t, c_t> is summed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

_F32 = jnp.float32
# The direct form keeps one [in, out] gradient per row; above this many elements the
# Gram form is used whatever the FLOPs.
_DIRECT_MAX_ELEMENTS = 1 << 27


@struct.dataclass
class Ghost:
    """What the ghost ops need: the probe vector and, for packed rows, the segments.

    probe: zeros [E] (one per example); its gradient is the per-example squared norm.
    segments: None (one example per row, E = rows) or packed segment ids [R, T]
        (example index + 1, 0 = padding).
    """

    probe: jax.Array
    segments: jax.Array | None = None


def _per_example(per_token: jax.Array, probe, segments) -> jax.Array:
    """[R, T] token values -> [E] example sums."""
    if segments is None:
        return jnp.sum(per_token, axis=-1)
    e = probe.shape[0]
    return jax.ops.segment_sum(per_token.reshape(-1), segments.reshape(-1), num_segments=e + 1)[1:]


def _same_segment(segments) -> jax.Array | float:
    return 1.0 if segments is None else segments[:, :, None] == segments[:, None, :]


def _gram(a: jax.Array, segments) -> jax.Array:
    """[R, T, N] -> [R, T, T] token inner products, zero across segments."""
    a = a.astype(_F32)
    return jnp.einsum("rtn,rsn->rts", a, a) * _same_segment(segments)


def weight_sq_norms(x: jax.Array, dy: jax.Array, probe, segments) -> jax.Array:
    """Per-example ||sum_t x_t dy_t^T||^2 [E] for x [R, T, in], dy [R, T, out]."""
    r, t, d_in = x.shape
    d_out = dy.shape[-1]
    direct = d_in * d_out <= t * (d_in + d_out) and r * d_in * d_out <= _DIRECT_MAX_ELEMENTS
    if segments is None and direct:
        g = jnp.einsum("rti,rto->rio", x.astype(_F32), dy.astype(_F32))
        return jnp.sum(g * g, axis=(1, 2))
    gram = _gram(x, segments) * jnp.einsum("rto,rso->rts", dy.astype(_F32), dy.astype(_F32))
    return _per_example(jnp.sum(gram, axis=-1), probe, segments)


def vector_sq_norms(v: jax.Array, probe, segments) -> jax.Array:
    """Per-example ||sum_t v_t||^2 [E] for v [R, T, N] (a bias or a norm scale's gradient)."""
    v = v.astype(_F32)
    if segments is None:
        s = jnp.sum(v, axis=1)
    else:
        s = jax.ops.segment_sum(v.reshape(-1, v.shape[-1]), segments.reshape(-1),
                                num_segments=probe.shape[0] + 1)[1:]
    return jnp.sum(s * s, axis=-1)


# Each op takes (..., probe, segments) and returns the probe's cotangent as the
# per-example squared norm of its own parameters' gradient; `segments` is never
# differentiated (cotangent None).

# --- y = x @ w (+ b) ---------------------------------------------------------------

def _linear_impl(x, w, b):
    y = x @ w
    return y if b is None else y + b


@jax.custom_vjp
def _linear(x, w, b, probe, segments):
    return _linear_impl(x, w, b)


def _linear_fwd(x, w, b, probe, segments):
    return _linear_impl(x, w, b), (x, w, b, probe, segments)


def _linear_bwd(res, dy):
    x, w, b, probe, segments = res
    dx = dy @ w.T
    dw = jnp.einsum("rti,rto->io", x, dy).astype(w.dtype)
    sq = weight_sq_norms(x, dy, probe, segments)
    db = None
    if b is not None:
        db = jnp.sum(dy, axis=(0, 1)).astype(b.dtype)
        sq = sq + vector_sq_norms(dy, probe, segments)
    return dx, dw, db, sq, None


_linear.defvjp(_linear_fwd, _linear_bwd)


def linear(x, w, b, ghost: Ghost):
    """x @ w (+ b) for x [R, T, in]."""
    return _linear(x, w, b, ghost.probe, ghost.segments)


# --- y = xhat * w (RMSNorm scale) ----------------------------------------------------

@jax.custom_vjp
def _scale(xhat, w, probe, segments):
    return xhat * w


def _scale_fwd(xhat, w, probe, segments):
    return xhat * w, (xhat, w, probe, segments)


def _scale_bwd(res, dy):
    xhat, w, probe, segments = res
    dw = jnp.sum(dy * xhat, axis=(0, 1)).astype(w.dtype)
    return dy * w, dw, vector_sq_norms(dy * xhat, probe, segments), None


_scale.defvjp(_scale_fwd, _scale_bwd)


def scale(xhat, w, ghost: Ghost):
    """xhat * w for xhat [R, T, D] and a scale w [D]."""
    return _scale(xhat, w, ghost.probe, ghost.segments)


# --- embedding lookup and (tied) output head -----------------------------------------

def _embed_impl(table, tokens):
    x = jnp.take(table, tokens, axis=0)
    return x, jnp.zeros(x.shape, _F32)


@jax.custom_vjp
def _embed(table, tokens, probe, segments):
    return _embed_impl(table, tokens)


def _embed_fwd(table, tokens, probe, segments):
    return _embed_impl(table, tokens), (table, tokens, probe, segments)


def _embed_bwd(res, cts):
    table, tokens, probe, segments = res
    dx, cross = cts
    dtable = jnp.zeros(table.shape, _F32).at[tokens].add(dx.astype(_F32)).astype(table.dtype)
    same_token = tokens[:, :, None] == tokens[:, None, :]
    sq = _per_example(jnp.sum(_gram(dx, segments) * same_token, axis=-1), probe, segments)
    # 2 <G_lookup, G_head>; `cross` is zero when the head is not tied to this table.
    sq = sq + 2.0 * _per_example(jnp.sum(dx.astype(_F32) * cross, axis=-1), probe, segments)
    return dtable, None, sq, None


_embed.defvjp(_embed_fwd, _embed_bwd)


def embed(table, tokens, ghost: Ghost):
    """(table[tokens] [R, T, D], aux): `aux` is a zero side output for `tied_head`."""
    return _embed(table, tokens, ghost.probe, ghost.segments)


@jax.custom_vjp
def _tied_head(h, table, aux, tokens, probe, segments):
    return h @ table.T


def _tied_head_fwd(h, table, aux, tokens, probe, segments):
    return h @ table.T, (h, table, tokens, probe, segments)


def _tied_head_bwd(res, dl):
    h, table, tokens, probe, segments = res
    dh = dl @ table
    dtable = jnp.einsum("rtv,rtd->vd", dl, h).astype(table.dtype)
    sq = weight_sq_norms(h, dl, probe, segments)
    # at[r, s, t] = dl[r, s, tokens[r, t]]: the head gradient on the table rows the lookup
    # touched; c_t = sum_s at[s, t] h_s over the same segment.
    index = jnp.broadcast_to(tokens[:, None, :], dl.shape[:2] + tokens.shape[1:])
    at = jnp.take_along_axis(dl.astype(_F32), index, axis=2) * _same_segment(segments)
    cross = jnp.einsum("rst,rsd->rtd", at, h.astype(_F32))
    return dh, dtable, cross, None, sq, None


_tied_head.defvjp(_tied_head_fwd, _tied_head_bwd)


def tied_head(h, table, aux, tokens, ghost: Ghost):
    """Logits h @ table^T for a head tied to the embedding `embed` looked `tokens` up in."""
    return _tied_head(h, table, aux, tokens, ghost.probe, ghost.segments)
