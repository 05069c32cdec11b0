"""Parameter selection on one piece as one XLA loop on the host CPU: the rule of
`hbo_jax.merging.select`, element for element, without its NumPy passes.

NumPy runs the rule as a chain of whole-array passes (the draw's comparisons, bit-pattern
blends, the redraw's prefix sums), ~10 + 6 K of them; XLA fuses them into one loop that
reads each input once. Integer operations only (the stored bit patterns, exact
equality), so the bytes are the same; a test pins both paths to the same digests.
Measured (CPU of the selection with the Philox draw, per element, bf16, a loaded 2-core
machine): K = 3 6.2 ns instead of 7.4, K = 8 9.7 instead of 16.7. Each call costs ~0.1 ms
of hand-offs to XLA's threads, so pieces are long (`PIECES`: one compile per length, K
and dtype, ~0.06 s each, plus ~0.4 s to start the CPU backend once); shorter tails, a
tolerance (`atol` > 0 compares in float32) and 8-byte dtypes (JAX keeps 32-bit
integers) stay with NumPy.
"""

from __future__ import annotations

import functools
import threading

import numpy as np

PIECES = (1 << 19, 1 << 17)  # the lengths compiled (each call costs ~0.1 ms of thread hand-offs)
_FIRST_CALLS = threading.Lock()  # a first call compiles: one thread compiles, the others wait for it
_COMPILED: set = set()  # (K, resample, length, dtype) called once already


def usable(dtype: np.dtype, atol: float) -> bool:
    """Whether the fused loop computes the selection of this dtype and tolerance."""
    return atol == 0 and np.dtype(dtype).itemsize in (1, 2, 4)


@functools.lru_cache(maxsize=None)
def _compiled(k: int, resample: bool):
    """The jitted rule for K models (jit retraces per dtype and length on its own)."""
    import jax
    import jax.numpy as jnp

    def rule(bits, shares, edges, base, *vals):
        draw = bits >> 16
        drawn = vals[-1]  # the drawn run: the first j with draw < edges[j]
        for j in range(k - 2, -1, -1):
            drawn = jnp.where(draw < edges[j], vals[j], drawn)
        if not resample:
            return drawn
        # the redraw: the first run whose prefix sum of the changing runs' shares exceeds r * total >> 16
        owned = [jnp.where(v != base, shares[j], jnp.uint32(0)) for j, v in enumerate(vals)]
        total = sum(owned[1:], owned[0])
        target = ((bits & 0xFFFF) * total) >> 16
        again, cum = vals[0], jnp.zeros_like(bits)
        for j in range(k):
            cum = cum + owned[j]
            again = jnp.where(cum <= target, vals[j + 1] if j + 1 < k else base, again)
        not_kept = drawn == base
        merged = jnp.where(not_kept, again, drawn)
        if merged.dtype.itemsize == 4:
            return merged, not_kept
        # XLA on the host makes a loop per output, each computing what it needs: one output, the flag
        # packed above the value's bits, is one pass
        return merged.astype(jnp.uint32) | (not_kept.astype(jnp.uint32) << 16)

    try:
        cpu = jax.devices("cpu")[0]
    except RuntimeError:  # JAX_PLATFORMS leaves the host's backend out
        cpu = None
    return jax.jit(rule), cpu


def _call(args, resample: bool):
    import jax

    fn, cpu = _compiled(len(args) - 4, resample)
    if cpu is None:
        return None
    with jax.default_device(cpu):  # on the host whatever the default device: the blocks are there
        return fn(*args)


def select(vals: list[np.ndarray], base: np.ndarray | None, shares: np.ndarray, edges: np.ndarray,
           bits: np.ndarray, resample: bool, out: np.ndarray) -> int | None:
    """The selection of one piece into `out` (unsigned bit patterns, as `select._select`'s arguments);
    returns the number of elements whose drawn run left them at the base when resampling, else 0;
    None (nothing done) where JAX has no host backend."""
    args = (bits, shares, edges, vals[0] if base is None else base, *vals)
    key = (len(vals), resample, bits.size, vals[0].dtype)
    if key in _COMPILED:
        res = _call(args, resample)
    else:  # threads making a new jit function or calling a new shape at once would each compile it (0.1 s)
        with _FIRST_CALLS:
            res = _call(args, resample)
            _COMPILED.add(key)
    if res is None:
        return None
    if not resample:
        np.copyto(out, np.asarray(res))
        return 0
    if isinstance(res, tuple):
        np.copyto(out, np.asarray(res[0]))
        return int(np.count_nonzero(np.asarray(res[1])))
    packed = np.asarray(res)
    np.copyto(out, packed, casting="unsafe")  # the lower bits: the value
    return int(np.count_nonzero(packed >> np.uint32(16)))
