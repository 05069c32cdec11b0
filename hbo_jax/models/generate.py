"""KV-cache text generation (greedy and sampling) for `LlamaLM`.

Prompts of different lengths share a batch LEFT-padded, so every row's last prompt
token sits in the same slot and one decode step serves all rows. Each row's RoPE
positions start at 0 at its first real token, and an explicit attention mask hides
the pad slots, so the padding is invisible: a prompt generates the same tokens alone
or in a batch. One jitted function prefills the prompt in a single forward pass that
fills a functional KV cache (arrays in, arrays out), then decodes one token per step
inside `jax.lax.while_loop` until every row has emitted an EOS or the budget is spent.

Shapes are bucketed (prompt length to a power of two >= 32, the token budget to a
multiple of 32, rows to a power of two rounded up to the mesh's data x fsdp size), so
repeated calls hit jit's cache of compiled functions, keyed by graphdef and shapes.
Under a mesh, rows are sharded over the batch axes and the cache's kv-head dimension
follows the `kv_heads` rule; parameters keep their shardings.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from hbo_jax.models.llama import DTYPES
from hbo_jax.parallel import batch_sharding, logical_to_spec, replicated, round_up_rows

_MIN_PROMPT_BUCKET = 32
_NEW_TOKENS_BUCKET = 32


def _pow2_at_least(n: int, minimum: int = 1) -> int:
    return 1 << (max(n, minimum) - 1).bit_length()


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k


def filter_logits(logits: jax.Array, temperature, top_p, *, top_k: int, use_top_p: bool) -> jax.Array:
    """Temperature-scaled logits [B, V] with tokens outside top-k / the top-p nucleus at -inf.

    Args:
        logits: Next-token logits [B, V].
        temperature: Positive divisor of the logits.
        top_p: Keep the smallest set of most likely tokens whose probability reaches it.
        top_k: Keep the k most likely tokens (0: all).
        use_top_p: Whether to apply `top_p` (static, so top_p = 1 costs no sort).

    Returns:
        Logits for `jax.random.categorical`.
    """
    logits = logits / temperature
    if top_k:
        kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if use_top_p:
        desc = -jnp.sort(-logits, axis=-1)
        probs = jax.nn.softmax(desc, axis=-1)
        # A token stays if the tokens ranked above it hold less than top_p; the first always does.
        keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p
        cutoff = jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return logits


def empty_cache(spec, mesh, rows: int, slots: int):
    """(a zero KV cache of `rows` x `slots` for `LlamaLM.hidden_cached`, the function that constrains a
    cache array to its sharding: rows over the batch axes, kv heads by the `kv_heads` rule). Traced."""
    shape = (rows, slots, spec.num_kv_heads, spec.head_dim)
    logical = ("batch", None, "kv_heads", None)
    if spec.scan_layers:  # one (keys, values) pair stacked over the layers
        logical, shape = ("layers", *logical), (spec.num_layers, *shape)
    sharding = NamedSharding(mesh, logical_to_spec(logical, shape, mesh))
    shard = lambda c: jax.lax.with_sharding_constraint(c, sharding)  # noqa: E731
    zeros = jnp.zeros(shape, DTYPES[spec.dtype])
    if spec.scan_layers:
        return (shard(zeros), shard(zeros)), shard
    return [(shard(zeros), shard(zeros)) for _ in range(spec.num_layers)], shard


def slot_mask(pads, num_slots: int, query_slots):
    """[B, Q, num_slots] attention mask of a left-padded batch against its KV cache: causal over the
    slots, and never a row's left-pad slots (`pads` [B]: each row's count; `query_slots` [Q])."""
    slots = jnp.arange(num_slots)
    return (slots[None, None, :] <= query_slots[None, :, None]) & (slots[None, None, :] >= pads[:, None, None])


@functools.partial(jax.jit, static_argnames=("graphdef", "mesh", "new_len", "sample", "top_k", "use_top_p"))
def _generate_batch(graphdef, params, tokens, pads, row_ids, eos, budget, pad_id, temperature, top_p, key,
                    *, mesh, new_len: int, sample: bool, top_k: int, use_top_p: bool):
    """Generated ids [B, new_len] (pad_id after a row's EOS) for a left-padded batch."""
    model = nnx.merge(graphdef, params)
    b, t = tokens.shape
    cache, shard_cache = empty_cache(model.spec, mesh, b, t + new_len)
    mask = functools.partial(slot_mask, pads, t + new_len)

    def choose(logits, step, done):
        if sample:
            # Per-prompt keys (not per-row) make a prompt's sample independent of its batch.
            keys = jax.vmap(lambda r: jax.random.fold_in(jax.random.fold_in(key, r), step))(
                jnp.maximum(row_ids, 0))
            z = filter_logits(logits, temperature, top_p, top_k=top_k, use_top_p=use_top_p)
            tok = jax.vmap(jax.random.categorical)(keys, z).astype(jnp.int32)
        else:
            tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        tok = jnp.where(done, pad_id, tok)
        return tok, done | jnp.any(tok[:, None] == eos[None, :], axis=-1)

    positions = jnp.maximum(jnp.arange(t)[None, :] - pads[:, None], 0)
    h, cache = model.hidden_cached(tokens, positions, cache, 0, mask(jnp.arange(t)))
    # Only the last slot's logits are needed: skip the [B, T, V] projection of the prompt.
    tok, done = choose(model.unembed(h[:, -1]), 0, row_ids < 0)
    out = jnp.full((b, new_len), pad_id, jnp.int32).at[:, 0].set(tok)

    def cond(carry):
        step, _, _, done = carry
        return (step < budget) & ~jnp.all(done)

    def body(carry):
        step, cache, out, done = carry
        slot = t + step - 1  # the slot of the previous token, fed in now
        prev = jax.lax.dynamic_slice_in_dim(out, step - 1, 1, axis=1)
        h, cache = model.hidden_cached(prev, slot - pads[:, None], cache, slot, mask(slot[None]))
        cache = jax.tree.map(shard_cache, cache)
        tok, done = choose(model.unembed(h[:, 0]), step, done)
        return step + 1, cache, jax.lax.dynamic_update_slice_in_dim(out, tok[:, None], step, axis=1), done

    _, _, out, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), cache, out, done))
    # Replicated, so every host can read the whole batch.
    return jax.lax.with_sharding_constraint(out, replicated(mesh))


def put_host(x: np.ndarray, sharding) -> jax.Array:
    """A host array (the same on every process, also on multi-host meshes) as a global array."""
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def generate(graphdef, params, prompts: Sequence[Sequence[int]], *, mesh, max_new_tokens: int,
             eos_ids: Sequence[int], pad_id: int, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, seed: int = 0, batch_size: int | None = None) -> list[list[int]]:
    """Generates a continuation of every prompt with a KV cache.

    Args:
        graphdef: The model's graphdef (`nnx.split(model, nnx.Param)[0]`).
        params: Its parameters, in their shardings over `mesh`.
        prompts: Token ids of each prompt (non-empty).
        mesh: The device mesh; batch rows are sharded over its data x fsdp axes.
        max_new_tokens: Most tokens generated per prompt.
        eos_ids: Tokens that end a row (not returned).
        pad_id: Token used for padding (any valid id; it is masked out).
        temperature: 0 for greedy argmax (top_k, top_p and seed are then unused),
            otherwise the sampling temperature.
        top_k: Sample among the k most likely tokens only (0: no limit).
        top_p: Sample from the nucleus of this probability mass (1: no limit).
        seed: Sampling seed; a prompt's sample depends on it and on the prompt's
            index, not on how prompts are batched.
        batch_size: Prompts per forward pass (None: all at once); rounded up to a
            multiple of the mesh's data x fsdp size.

    Returns:
        Per prompt, the generated ids, cut before the first EOS.

    Raises:
        ValueError: An empty prompt or an out-of-range argument.
    """
    n = len(prompts)
    if any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token")
    if max_new_tokens < 0 or temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
        raise ValueError(f"generate: bad max_new_tokens={max_new_tokens}, temperature={temperature}, "
                         f"top_k={top_k} or top_p={top_p}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"generate: batch_size={batch_size} must be >= 1")
    if n == 0 or max_new_tokens == 0:
        return [[] for _ in prompts]
    chunk = min(batch_size or n, n)
    rows = round_up_rows(_pow2_at_least(n) if batch_size is None else min(_pow2_at_least(n), batch_size),
                         mesh)
    new_len = _round_up(max_new_tokens, _NEW_TOKENS_BUCKET)
    eos = put_host(np.asarray(list(eos_ids) or [-1], np.int32), replicated(mesh))
    scalar = lambda v, dt: put_host(np.asarray(v, dt), replicated(mesh))
    static = dict(mesh=mesh, new_len=new_len, sample=temperature > 0, top_k=top_k if temperature > 0 else 0,
                  use_top_p=temperature > 0 and top_p < 1)
    # Longest first, so prompts of similar length share a batch (and a length bucket).
    order = sorted(range(n), key=lambda i: -len(prompts[i]))
    results: list[list[int]] = [[] for _ in prompts]
    for start in range(0, n, chunk):
        ids = order[start:start + chunk]
        t = _pow2_at_least(max(len(prompts[i]) for i in ids), _MIN_PROMPT_BUCKET)
        tokens = np.full((rows, t), pad_id, np.int32)
        pads = np.full((rows,), t - 1, np.int32)  # filler rows: one (pad) token
        row_ids = np.full((rows,), -1, np.int32)
        for r, i in enumerate(ids):
            tokens[r, t - len(prompts[i]):] = prompts[i]
            pads[r], row_ids[r] = t - len(prompts[i]), i
        out = _generate_batch(
            graphdef, params, put_host(tokens, batch_sharding(mesh, 2)), put_host(pads, batch_sharding(mesh, 1)),
            put_host(row_ids, batch_sharding(mesh, 1)), eos, scalar(max_new_tokens, np.int32),
            scalar(pad_id, np.int32), scalar(max(temperature, 1e-6), np.float32), scalar(top_p, np.float32),
            jax.random.key(seed), **static)
        out = np.asarray(out)
        stops = set(int(e) for e in eos_ids)
        for r, i in enumerate(ids):
            row = [int(x) for x in out[r, :max_new_tokens]]
            cut = next((j for j, x in enumerate(row) if x in stops), len(row))
            results[i] = row[:cut]
    return results
