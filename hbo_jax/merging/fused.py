"""Parameter selection on one piece as one XLA loop on the host CPU: the rule of
`hbo_jax.merging.select`, element for element, without its NumPy passes.

NumPy runs the rule as a chain of whole-array passes (the draw's comparisons,
bit-pattern blends, the redraw's prefix sums), ~10 + 6 K of them; XLA fuses them into one
loop that reads each input once and hashes each element's random word from its index
(`mix32`) on the way: no word is drawn, stored or read. Integer operations only (the
stored bit patterns, exact equality), so the bytes are the same; a test pins both paths
to the same digests. XLA's
CPU client takes a host array as it is (no copy) only when its data is 64-byte aligned:
it copies any other, slowly (bf16, K = 3: 2.8 ns of CPU per element, 0.7 when aligned;
NumPy's passes 4.8), so unaligned arguments are first copied into this thread's aligned
work arrays (`_staged`, ~0.1 ns per element). Each call costs ~0.1 ms of hand-offs to
XLA's threads, so pieces are long (`PIECES`: one compile per length, K and dtype, ~0.06
s each, and ~0.2 s to make the first one: `prepare` compiles them on a thread while the
first pieces go through NumPy on the other cores); a shorter piece of at least a quarter
of a compiled length is padded to it (the padding's results dropped), shorter ones, a
tolerance (`atol` > 0 compares in float32) and 8-byte dtypes (JAX keeps 32-bit integers)
stay with NumPy.
"""

from __future__ import annotations

import functools
import threading

import numpy as np

PIECES = (1 << 19, 1 << 17)  # the lengths compiled (each call costs ~0.1 ms of thread hand-offs)
_FIRST_CALLS = threading.Lock()  # a first call compiles: one thread compiles, the others wait for it
_COMPILED: set = set()  # (K, resample, length, unsigned dtype) called once already
_PENDING: set = set()  # those `prepare` is compiling: their pieces go to NumPy meanwhile


MIX = ((17, 0xED5AD4BB), (11, 0xAC4C1B51), (15, 0x31848BAB), (14, None))  # triple32: shift, then multiply


def mix32(x, tmp: np.ndarray | None = None):
    """The triple32 hash of uint32 `x`: a JAX array, or a NumPy one hashed in place (with `tmp`, a work
    array of its size: a fresh temporary per pass costs its page faults)."""
    if not isinstance(x, np.ndarray):
        for shift, mult in MIX:
            x = x ^ (x >> shift)
            if mult is not None:
                x = x * np.uint32(mult)
        return x
    tmp = np.empty_like(x) if tmp is None else tmp
    for shift, mult in MIX:
        np.bitwise_xor(x, np.right_shift(x, np.uint32(shift), out=tmp), out=x)
        if mult is not None:
            np.multiply(x, np.uint32(mult), out=x)
    return x


def padded_length(n: int) -> int | None:
    """The compiled length a piece of `n` elements runs as (padded up to it), or None: NumPy's (the
    padding would cost more than NumPy's passes over the piece)."""
    for length in sorted(PIECES):
        if n <= length:
            return length if 4 * n >= length else None
    return None


_ALIGN = 64  # XLA's CPU client aliases a host array aligned to this; it copies (slowly) any other
_WORK = threading.local()


def _staged(arrays: list[np.ndarray], length: int) -> list[np.ndarray]:
    """`arrays` as XLA takes them without a copy of its own: 64-byte aligned and `length` long. The others
    are copied into this thread's aligned work arrays (reused call after call; the padding is garbage)."""
    work = getattr(_WORK, "arrays", None)
    if work is None:
        work = _WORK.arrays = {}
    out = []
    for i, a in enumerate(arrays):
        if a.size == length and a.ctypes.data % _ALIGN == 0:
            out.append(a)
            continue
        buf = work.get((i, a.dtype, length))
        if buf is None:
            raw = np.empty(length * a.dtype.itemsize + _ALIGN, np.uint8)
            start = -raw.ctypes.data % _ALIGN
            buf = work[(i, a.dtype, length)] = raw[start:start + length * a.dtype.itemsize].view(a.dtype)
        buf[:a.size] = a
        out.append(buf)
    return out


def usable(dtype: np.dtype, atol: float) -> bool:
    """Whether the fused loop computes the selection of this dtype and tolerance."""
    return atol == 0 and np.dtype(dtype).itemsize in (1, 2, 4)


@functools.lru_cache(maxsize=None)
def _compiled(k: int, resample: bool):
    """The jitted rule for K models (jit retraces per dtype and length on its own)."""
    import jax
    import jax.numpy as jnp

    def rule(counter, shares, edges, base, *vals):
        # the piece's element words (`select.element_bits`): its first index, then the round keys
        index = counter[0] + jax.lax.iota(jnp.uint32, base.size)  # a piece never crosses 2**32
        bits = mix32(mix32(index ^ counter[1]) ^ counter[2])
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


def prepare(k: int, resample: bool, dtype) -> threading.Thread | None:
    """Compiles the rule for K models of `dtype` at every length of `PIECES` on a thread (returned; None:
    nothing left to compile); until then `select` leaves those pieces to NumPy (the same bytes)."""
    udt = np.dtype(f"u{np.dtype(dtype).itemsize}")
    keys = [(k, resample, n, udt) for n in PIECES if (k, resample, n, udt) not in _COMPILED | _PENDING]
    if not keys:
        return None
    _PENDING.update(keys)

    def run():
        for key in keys:
            n = key[2]
            try:
                with _FIRST_CALLS:
                    if key not in _COMPILED:
                        res = _call((np.zeros(3, np.uint32), np.zeros(k, np.uint32), np.zeros(k - 1, np.uint32),
                                     *[np.zeros(n, udt)] * (k + 1)), resample)
                        _wait(res)
                        _COMPILED.add(key)
            finally:  # a failed compile: the first piece compiles (and raises) on its own
                _PENDING.discard(key)

    # Not a daemon: a process that ends while XLA compiles on a daemon thread aborts ("terminate called
    # ... exception not rethrown", SIGABRT) when the interpreter's finalization stops that thread inside
    # C++; a small merge ends before its compile does. The interpreter joins this one at exit (< 1 s).
    thread = threading.Thread(target=run, name="compile selection")
    thread.start()
    return thread


def _wait(res) -> None:
    """Waits for a result of `_call` (None, an array or a tuple of arrays)."""
    for r in res if isinstance(res, tuple) else () if res is None else (res,):
        r.block_until_ready()


def _call(args, resample: bool):
    import jax

    fn, cpu = _compiled(len(args) - 4, resample)
    if cpu is None:
        return None
    with jax.default_device(cpu):  # on the host whatever the default device: the blocks are there
        return fn(*args)


def select(vals: list[np.ndarray], base: np.ndarray | None, shares: np.ndarray, edges: np.ndarray,
           counter: np.ndarray, resample: bool, out: np.ndarray) -> int | None:
    """The selection of one piece into `out` (unsigned bit patterns, as `select._select`'s arguments; `counter`:
    uint32 [the lower 32 bits of the piece's first index, the two round keys]), run
    at `padded_length` (or its own length where that is None); returns the number of elements whose
    drawn run left them at the base when resampling, else 0;
    None (nothing done) where JAX has no host backend."""
    n = out.size
    length = padded_length(n) or n
    key = (len(vals), resample, length, vals[0].dtype)
    if key in _PENDING:
        return None  # `prepare` is compiling it: NumPy does this piece
    args = (counter, shares, edges, *_staged([vals[0] if base is None else base, *vals], length))
    if key in _COMPILED:
        res = _call(args, resample)
    else:  # threads making a new jit function or calling a new shape at once would each compile it (0.1 s)
        with _FIRST_CALLS:
            res = _call(args, resample)
            _COMPILED.add(key)
    if res is None:
        return None
    if not resample:
        np.copyto(out, np.asarray(res)[:n])
        return 0
    if isinstance(res, tuple):
        np.copyto(out, np.asarray(res[0])[:n])
        return int(np.count_nonzero(np.asarray(res[1])[:n]))
    packed = np.asarray(res)[:n]
    np.copyto(out, packed, casting="unsafe")  # the lower bits: the value
    return int(np.count_nonzero(packed >> np.uint32(16)))
