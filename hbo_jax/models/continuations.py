"""Log-likelihoods of several continuations of one prompt, the prompt run once (KV cache).

Multiple-choice evaluation scores every option of a question as its own conversation:
the options share the prompt, which is most of each sequence, so scoring them one by one
runs the prompt once per option. Here the options of a question form a group: their
longest common token prefix, cut before the first scored token, is prefilled once into a
KV cache (`LlamaLM.hidden_cached`, as generation does), and each option's remaining
tokens run against that cache, one option at a time (`jax.lax.map`: one option's logits
live at once). The sum is over the same tokens as the full-sequence path (targets whose
loss mask is 1, none of them in the shared prefix), with the same positions, so the
results equal `score_examples`'s up to float rounding (tests compare the two).

Prefixes are left-padded (the pad slots masked, positions starting at 0 at the first real
token) and the options' tokens right-padded; shapes are bucketed (prefix length and
option length to powers of two, options per group to a power of two) so repeated calls
reuse compiled programs. A group whose options share no first token (a prompt cut
differently from the left for options of different lengths) is scored option by option,
each its own group.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hbo_jax.models.generate import empty_cache, put_host, slot_mask
from hbo_jax.parallel import batch_sharding, replicated, round_up_rows

_MIN_PREFIX = 32
_MIN_SUFFIX = 8

Example = tuple[np.ndarray, np.ndarray]  # token ids [n], loss mask [n] (1: a scored target)


def _pow2(n: int, minimum: int = 1) -> int:
    return 1 << (max(n, minimum) - 1).bit_length()


def shared_prefix(options: Sequence[Example]) -> int:
    """Tokens the options share and that no option scores: their longest common prefix, cut at the first
    position whose token some option scores (a target's loss-mask bit is that of the token itself)."""
    ids = [np.asarray(i) for i, _ in options]
    n = min(len(i) for i in ids)
    first = ids[0][:n]
    same = np.ones(n, bool)
    for i in ids[1:]:
        same &= i[:n] == first
    common = int(np.argmin(same)) if not same.all() else n
    scored = [int(np.flatnonzero(np.asarray(m)[1:])[0]) + 1 if np.asarray(m)[1:].any() else len(m)
              for _, m in options]
    return min(common, *scored, n - 1)


@functools.partial(jax.jit, static_argnames=("graphdef", "mesh"))
def _score_batch(graphdef, params, prefix, pads, suffix, suffix_mask, *, mesh):
    """Summed log-probability [B, M] of each row's M right-padded continuations `suffix` [B, M, S]
    (targets weighted by `suffix_mask`, the first predicted from the prefix's last token) after its
    left-padded `prefix` [B, T] (`pads`: its pad slots)."""
    model = nnx.merge(graphdef, params)
    b, t = prefix.shape
    s = suffix.shape[2]
    cache, _ = empty_cache(model.spec, mesh, b, t + s)
    mask = functools.partial(slot_mask, pads, t + s)

    positions = jnp.maximum(jnp.arange(t)[None, :] - pads[:, None], 0)
    h, cache = model.hidden_cached(prefix, positions, cache, 0, mask(jnp.arange(t)))
    first = jax.nn.log_softmax(model.unembed(h[:, -1]), axis=-1)  # [B, V]: predicts each option's first token
    first_lp = jnp.take_along_axis(first, suffix[:, :, 0], axis=1)  # [B, M]

    def option(tokens):  # [B, S]: one continuation of every row, against the prefix's cache
        pos = (t - pads)[:, None] + jnp.arange(s)[None, :]
        h, _ = model.hidden_cached(tokens, pos, cache, t, mask(t + jnp.arange(s)))
        lp = jax.nn.log_softmax(model.unembed(h[:, :-1]), axis=-1)
        return jnp.take_along_axis(lp, tokens[:, 1:, None], axis=2)[..., 0]  # [B, S - 1]

    rest = jax.lax.map(option, jnp.swapaxes(suffix, 0, 1))  # [M, B, S - 1]
    total = first_lp * suffix_mask[:, :, 0] + jnp.sum(jnp.swapaxes(rest, 0, 1) * suffix_mask[:, :, 1:], axis=-1)
    return jax.lax.with_sharding_constraint(total, replicated(mesh))


def continuation_logprobs(graphdef, params, groups: Sequence[Sequence[Example]], *, mesh, pad_id: int,
                          batch_size: int) -> list[np.ndarray]:
    """Each option's summed log-probability of its scored tokens (loss mask 1), group by group.

    Args:
        graphdef: The model's graphdef.
        params: Its parameters, in their shardings over `mesh`.
        groups: Per question, its options as (token ids, loss mask) of the whole sequence
            (prompt and option, as training encodes a conversation).
        mesh: The device mesh; rows are sharded over its data x fsdp axes.
        pad_id: A valid token id for the padding (masked out).
        batch_size: Groups per forward pass; rounded up to a multiple of the batch axes.

    Returns:
        Per group, an array of its options' log-probabilities (0 for an option with no scored token).
    """
    # (group, its options' indices, prefix length): a group sharing no token is split into single options
    units = []
    for g, opts in enumerate(groups):
        p = shared_prefix(opts) if opts else 0
        if p > 0:
            units.append((g, list(range(len(opts))), p))
        else:
            units += [(g, [j], shared_prefix([o])) for j, o in enumerate(opts)]
    out = [np.zeros(len(opts)) for opts in groups]
    units = [u for u in units if u[2] > 0 and any(np.asarray(groups[u[0]][j][1])[u[2]:].any() for j in u[1])]
    units.sort(key=lambda u: u[2])  # similar prefixes share a batch (and a length bucket)
    rows = round_up_rows(min(_pow2(len(units)), max(batch_size, 1)), mesh)
    for start in range(0, len(units), rows):
        chunk = units[start:start + rows]
        t = _pow2(max(p for _, _, p in chunk), _MIN_PREFIX)
        m = _pow2(max(len(js) for _, js, _ in chunk))
        s = _pow2(max(len(groups[g][j][0]) - p for g, js, p in chunk for j in js), _MIN_SUFFIX)
        prefix = np.full((rows, t), pad_id, np.int32)
        pads = np.full((rows,), t - 1, np.int32)  # filler rows: one (pad) token
        suffix = np.full((rows, m, s), pad_id, np.int32)
        weight = np.zeros((rows, m, s), np.float32)
        for r, (g, js, p) in enumerate(chunk):
            ids0 = np.asarray(groups[g][js[0]][0])
            prefix[r, t - p:], pads[r] = ids0[:p], t - p
            for k, j in enumerate(js):
                ids, mask = (np.asarray(a) for a in groups[g][j])
                suffix[r, k, :len(ids) - p] = ids[p:]
                weight[r, k, :len(ids) - p] = mask[p:]
        total = np.asarray(_score_batch(
            graphdef, params, put_host(prefix, batch_sharding(mesh, 2)), put_host(pads, batch_sharding(mesh, 1)),
            put_host(suffix, batch_sharding(mesh, 3)), put_host(weight, batch_sharding(mesh, 3)), mesh=mesh))
        for r, (g, js, _) in enumerate(chunk):
            out[g][js] = total[r, :len(js)]
    return out
