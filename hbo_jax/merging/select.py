"""The per-element merge rules, on one block of a tensor: weighted average and parameter
selection with resampling (Ju et al., EMNLP 2024), with position-keyed randomness.

Parameter selection takes each scalar element from one run, drawn from a categorical
over the K runs, without rescaling: in expectation it is the weighted average, but every
element keeps a value some run actually trained to. With resampling, an element whose
drawn run left it at the base value is redrawn among the runs that changed it (with the
same probabilities, renormalised); it keeps the base value only when no run changed it.
The paper leaves the number of redraws open; one draw restricted to the changing runs is
the limit of redrawing until a changed value comes up.

Randomness is a function of (seed, tensor name, element index) alone: element `i` of the
row-major tensor gets the 32-bit word `mix(mix(i ^ k0) ^ k1)`, where `mix` is the
"triple32" integer hash (three xor-shift-multiply steps whose constants were searched for
the lowest avalanche bias of any such 32-bit hash, ~0.021) and (k0, k1) are round keys
from sha256(seed, name). A keyed bijection of the index, so its words over a tensor are
distinct; it is computed inside the fused rule from the piece's first index (no words
stored or read: drawing them with NumPy's Philox4x64, as the first versions did, cost
1.8-2.0 ns per element, a sixth of a merge's CPU; the hash inside the XLA loop ~0.5).
Indices from 2**32 on (tensors that large) take round keys of their own. The result is
independent of how the tensor is cut into blocks, of the order tensors are processed in
and of how the inputs are sharded. The upper 16 bits of the word draw the run, the lower
16 the redraw (a test checks the two halves, and neighbouring elements, independent).

Probability resolution: 2**-16. Each run owns `q_k` of the 65536 values of the draw
(`_weights`: the differences of floor(cumulative probability * 2**16)), so its
probability is off by less than 2**-16 (a probability below that may round to 0, and
such a run is never drawn). The redraw among a set S of runs maps its 16 bits `r` to
`t = r * W(S) >> 16` with W(S) the sum of S's `q_k`, and takes the run whose slice of
[0, W(S)) holds `t`: each run's conditional probability is again within 2**-16 of
q_k / W(S). Both are far below what a chi-square test of millions of elements detects.

Two implementations of the same rule give the same bytes (a test pins both to the
same digests): pieces of `fused.PIECES` elements (or padded to one), exact equality and
dtypes of at most 4 bytes run as one XLA loop on the host (`hbo_jax.merging.fused`); the
rest (short pieces, a tolerance, 8-byte dtypes) as branch-free NumPy passes over reused
work arrays.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import threading

import numpy as np

from hbo_jax.merging import fused

SUBCHUNK = 1 << 17  # elements per pass inside a block: its temporaries (random bits, masks) stay in cache
MAX_MODELS = 16  # a block of every input is held at once; shares of the draw are 2**-16 (module doc)


def tensor_key(seed: int, name: str) -> bytes:
    """A tensor's key for `element_bits`: sha256 of (seed as 8 little-endian bytes, the name in UTF-8)."""
    if not 0 <= seed < 2 ** 64:
        raise ValueError(f"seed {seed} is not in [0, 2**64)")
    return hashlib.sha256(seed.to_bytes(8, "little") + name.encode()).digest()


@functools.lru_cache(maxsize=4096)
def round_keys(key: bytes, high: int) -> np.ndarray:
    """The two 32-bit round keys of the indices `high * 2**32 ..` of the tensor keyed `key`."""
    digest = key if high == 0 else hashlib.sha256(key + high.to_bytes(8, "little")).digest()
    return np.frombuffer(digest[:8], "<u4").astype(np.uint32)


def element_bits(key: bytes, start: int, count: int) -> np.ndarray:
    """The 32 random bits (uint32) of elements `start .. start+count-1` of the tensor keyed `key`."""
    out = np.empty(count, np.uint32)
    pos = start
    while pos < start + count:  # split where the index's upper 32 bits (and so the round keys) change
        end = min(start + count, (pos >> 32) + 1 << 32)
        k0, k1 = round_keys(key, pos >> 32)
        x = out[pos - start:end - start]
        x[...] = np.arange(pos & 0xFFFFFFFF, (pos & 0xFFFFFFFF) + end - pos, dtype=np.uint32)
        tmp = _scratch("hash", np.uint32, x.size)
        np.bitwise_xor(fused.mix32(np.bitwise_xor(x, k0, out=x), tmp), k1, out=x)
        fused.mix32(x, tmp)
        pos = end
    return out


def prepare_selection(k: int, resample: bool, dtypes, atol: float) -> None:
    """Starts compiling the fused rule for the `dtypes` it runs (`fused.prepare`): the first pieces go
    through NumPy meanwhile instead of waiting for it."""
    for dtype in dtypes:
        if fused.usable(dtype, atol):
            fused.prepare(k, resample, dtype)


def normalise(weights, k: int, what: str) -> np.ndarray:
    """`weights` (None: uniform) as K probabilities; a ValueError names `what` when unusable."""
    if weights is None:
        return np.full(k, 1.0 / k)
    w = np.asarray(weights, np.float64)
    if w.shape != (k,):
        raise ValueError(f"{what}: {len(w)} values for {k} models")
    if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"{what}: {list(weights)} must be non-negative with a positive sum")
    return w / w.sum()


@functools.lru_cache(maxsize=8)
def _weights(probs: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(q, T): each run's share of the 2**16 values of a 16-bit draw (uint32, summing to 2**16), and the
    draw's thresholds T[k] = q[0] + .. + q[k] (run k is drawn when T[k-1] <= u < T[k])."""
    edges = np.floor(np.cumsum(probs) * 2.0 ** 16).astype(np.int64)
    edges[-1] = 1 << 16  # the cumulative sum may end a rounding below 1
    edges = np.minimum(edges, 1 << 16)
    q = np.diff(edges, prepend=0).astype(np.uint32)
    return q, np.cumsum(q).astype(np.uint32)


@dataclasses.dataclass
class BlockStats:
    """Element counts of one tensor (summed over its blocks)."""

    elements: int = 0
    equal_base: list[int] | None = None  # per model: elements within `atol` of the base
    resampled: int = 0  # drawn run at the base value, redrawn among the runs that changed it
    kept_base: int = 0  # no run changed the element: it keeps the base value

    def add(self, other: "BlockStats") -> None:
        """Adds another block's counts to these."""
        self.elements += other.elements
        self.resampled += other.resampled
        self.kept_base += other.kept_base
        if other.equal_base is not None:
            self.equal_base = ([a + b for a, b in zip(self.equal_base, other.equal_base)]
                               if self.equal_base is not None else list(other.equal_base))

    def as_json(self, resample: bool = True) -> dict:
        """Fractions of the elements (merge.json); the resampling ones only with `resample`."""
        n = max(self.elements, 1)
        out = {"elements": self.elements}
        if self.equal_base is not None:
            out["frac_equal_base"] = [c / n for c in self.equal_base]
        if resample:
            out.update(frac_resampled=self.resampled / n, frac_kept_base=self.kept_base / n)
        return out


def _bits_view(a: np.ndarray) -> np.ndarray:
    """The stored bit patterns of a float array (an unsigned view of the same item size)."""
    return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def changed(models: list[np.ndarray], base: np.ndarray, atol: float) -> list[np.ndarray]:
    """Per model, where it differs from the base: atol 0, the stored bits differ (exact equality in
    the stored dtype; also fast for bfloat16); else by more than atol (compared in float32)."""
    if atol == 0:
        b = _bits_view(base)
        return [np.not_equal(_bits_view(m), b) for m in models]
    b = base.astype(np.float32)
    return [np.abs(m.astype(np.float32) - b) > atol for m in models]


def _parts(n: int, pool, fn, sizes: tuple[int, ...] = (SUBCHUNK,)):
    """fn(lo, hi) over pieces of 0..n, on `pool` (a ThreadPoolExecutor) when given: as many of sizes[0]
    as fit, then of sizes[1], ..., the last of sizes[-1] possibly shorter."""
    spans, lo = [], 0
    for size in sizes:
        while n - lo >= size or (size == sizes[-1] and lo < n):
            spans.append((lo, min(lo + size, n)))
            lo = spans[-1][1]
    return list(pool.map(lambda s: fn(*s), spans)) if pool is not None and len(spans) > 1 else \
        [fn(*s) for s in spans]


def average_block(models: list[np.ndarray], weights: np.ndarray, base: np.ndarray | None = None,
                  atol: float = 0.0, pool=None) -> tuple[np.ndarray, BlockStats]:
    """sum_k weights[k] * models[k], accumulated in float32 in model order, rounded to the stored dtype."""
    flat = [m.reshape(-1) for m in models]
    out = np.empty(flat[0].size, flat[0].dtype)

    def part(lo, hi):
        acc = np.zeros(hi - lo, np.float32)
        for w, m in zip(weights, flat):
            acc += np.float32(w) * m[lo:hi].astype(np.float32)
        out[lo:hi] = acc.astype(out.dtype)
        stats = BlockStats(elements=hi - lo)
        if base is not None:
            ch = changed([m[lo:hi] for m in flat], base.reshape(-1)[lo:hi], atol)
            stats.equal_base = [int(c.size - np.count_nonzero(c)) for c in ch]
        return stats

    return out.reshape(models[0].shape), _sum(_parts(out.size, pool, part))


def _sum(stats: list[BlockStats]) -> BlockStats:
    total = BlockStats()
    for s in stats:
        total.add(s)
    return total


def select_block(models: list[np.ndarray], base: np.ndarray | None, probs: np.ndarray, key: tuple[int, int],
                 start: int, *, resample: bool, atol: float = 0.0, pool=None) -> tuple[np.ndarray, BlockStats]:
    """Parameter selection on the elements `start ..` of a tensor (a block of consecutive elements).

    Args:
        models: The K runs' values of the block, one shape and dtype.
        base: The base's values of the block in the same dtype (needed for resampling
            and the statistics; None: plain selection without statistics).
        probs: K selection probabilities.
        key: `tensor_key(seed, name)`.
        start: Index of the block's first element in the row-major tensor.
        resample: Redraw elements whose drawn run left them at the base value.
        atol: Equality tolerance against the base (0: the stored bits are equal).
        pool: A ThreadPoolExecutor to work on pieces of the block at once (the draws
            depend on element positions only, so the result does not change).

    Returns:
        (the merged block, its statistics).
    """
    if resample and base is None:
        raise ValueError("resampling needs the base model")
    flat = [m.reshape(-1) for m in models]
    flat_base = None if base is None else base.reshape(-1)
    out = np.empty(flat[0].size, flat[0].dtype)
    raw = _bits_view(out)

    def part(lo, hi):
        b = None if flat_base is None else flat_base[lo:hi]
        return _select([m[lo:hi] for m in flat], b, probs, key, start + lo, resample, atol, raw[lo:hi])

    sizes = fused.PIECES if fused.usable(out.dtype, atol) else (SUBCHUNK,)
    return out.reshape(models[0].shape), _sum(_parts(out.size, pool, part, sizes))


_SCRATCH = threading.local()  # per thread: work arrays of a piece, reused piece after piece


def _scratch(tag: str, dtype, n: int) -> np.ndarray:
    """A work array of this thread, `n` elements of `dtype`, its content undefined. Reused:
    fresh temporaries of this size are fresh pages (page faults) and cost more than the passes over them."""
    pool = getattr(_SCRATCH, "arrays", None)
    if pool is None:
        pool = _SCRATCH.arrays = {}
    arr = pool.get((tag, np.dtype(dtype)))
    if arr is None or arr.size < n:
        arr = pool[(tag, np.dtype(dtype))] = np.empty(max(n, SUBCHUNK), dtype)
    return arr[:n]


class _Blender:
    """`out[cond] = src[cond]` on unsigned bit patterns, as out ^= (out ^ src) & mask: a few branch-free
    integer passes over reused arrays; masked copies (np.copyto where=, np.where) branch per element
    and cost ~20x more on random masks, np.choose more still."""

    def __init__(self, dtype, n: int):
        self.mask, self.diff = _scratch("mask", dtype, n), _scratch("diff", dtype, n)

    def __call__(self, out: np.ndarray, src: np.ndarray, cond: np.ndarray) -> None:
        np.negative(cond.view(np.int8), out=self.mask, casting="unsafe")  # True (1) -> -1 -> all ones
        np.bitwise_xor(out, src, out=self.diff)
        np.bitwise_and(self.diff, self.mask, out=self.diff)
        np.bitwise_xor(out, self.diff, out=out)


def _changed_into(model: np.ndarray, base: np.ndarray, atol: float, out: np.ndarray) -> np.ndarray:
    """`changed` of one model, into the bool array `out`."""
    if atol == 0:
        return np.not_equal(_bits_view(model), _bits_view(base), out=out)
    out[...] = changed([model], base, atol)[0]
    return out


def _select(models, base, probs, key: bytes, start: int, resample: bool, atol: float,
            out: np.ndarray) -> BlockStats:
    """Selection on one piece, the elements `start ..` of the tensor keyed `key`, into `out` (the unsigned
    view of the merged piece); see `select_block`. A piece of a compiled length (or padded to one) goes through
    `fused`, the rest through NumPy passes over this thread's reused work arrays (`_scratch`): the same bytes."""
    n = out.size
    one_high = start >> 32 == (start + n - 1) >> 32  # the fused rule counts the index's lower 32 bits only
    if fused.padded_length(n) and fused.usable(models[0].dtype, atol) and one_high:
        counter = np.array([start & 0xFFFFFFFF, *round_keys(key, start >> 32)], np.uint32)
        stats = _select_fused(models, base, probs, counter, resample, out)
        if stats is not None:
            return stats
    return _select_numpy(models, base, probs, element_bits(key, start, n), resample, atol, out)


def _select_fused(models, base, probs, counter: np.ndarray, resample: bool, out: np.ndarray) -> BlockStats | None:
    """`_select` by `fused.select` (exact equality); the per-model counts by NumPy. None: not done."""
    n = out.size
    q, edges = _weights(tuple(probs.tolist()))
    unchanged = fused.select([_bits_view(m) for m in models], None if base is None else _bits_view(base), q,
                             edges[:-1], counter, resample, out)
    if unchanged is None:
        return None
    stats = BlockStats(elements=n)
    if base is None:
        return stats
    cond, some = _scratch("cond", bool, n), _scratch("some", bool, n)
    some.fill(False)
    stats.equal_base = []
    for j, m in enumerate(models):
        c = _changed_into(m, base, 0.0, cond)
        stats.equal_base.append(int(n - np.count_nonzero(c)))
        if resample and q[j]:  # some run of positive share changed the element
            np.logical_or(some, c, out=some)
    if resample:
        stats.kept_base = n - int(np.count_nonzero(some))
        stats.resampled = unchanged - stats.kept_base  # a drawn run that changed it has a positive share
    return stats


def _select_numpy(models, base, probs, bits, resample: bool, atol: float, out: np.ndarray) -> BlockStats:
    """`_select` by NumPy passes (any dtype and tolerance)."""
    n, k = bits.size, len(models)
    q, edges = _weights(tuple(probs.tolist()))
    vals = [_bits_view(m) for m in models]
    blend, cond = _Blender(out.dtype, n), _scratch("cond", bool, n)
    draw = np.right_shift(bits, np.uint32(16), out=_scratch("draw", np.uint32, n))
    # the drawn run: the first k with draw < edges[k]; blended from the last run down, so it is written last
    np.copyto(out, vals[-1])
    for j in range(k - 2, -1, -1):
        blend(out, vals[j], np.less(draw, edges[j], out=cond))
    stats = BlockStats(elements=n)
    if base is None:
        return stats
    ch = [_changed_into(m, base, atol, _scratch(f"changed{j}", bool, n)) for j, m in enumerate(models)]
    stats.equal_base = [int(n - np.count_nonzero(c)) for c in ch]
    if not resample:
        return stats
    # The redraw among the runs that changed the element: with their shares' prefix sums cum[j] (total:
    # the last), t = r * total >> 16 for the lower 16 bits r, the run is the first j with cum[j] > t. The
    # drawn run kept where it changed the element, the redrawn one elsewhere; with total 0 (no run of
    # positive share changed it) nothing is > t and the element keeps the base's own value.
    shares = [_scratch(f"share{j}", np.uint32, n) for j in range(k)]
    total = _scratch("total", np.uint32, n)
    for j, (c, s) in enumerate(zip(ch, shares)):
        np.negative(c.view(np.int8), out=s, casting="unsafe")
        np.bitwise_and(s, q[j], out=s)
        if j == 0:
            np.copyto(total, s)
        else:
            np.add(total, s, out=total)
    target = np.bitwise_and(bits, np.uint32(0xFFFF), out=_scratch("target", np.uint32, n))
    np.multiply(target, total, out=target)  # < 2**32: r < 2**16, total <= 2**16
    np.right_shift(target, np.uint32(16), out=target)  # uniform on [0, total)
    some = int(np.count_nonzero(total))
    # again = vals[number of j with cum[j] <= t] (base after the last run), going up: cum[j] <= t holds
    # for the j below that number, so the last write is the one
    again, cum = _scratch("again", out.dtype, n), total  # total's array is free now: it holds the prefix sum
    np.copyto(again, vals[0])
    for j in range(k):
        if j == 0:
            np.copyto(cum, shares[0])
        else:
            np.add(cum, shares[j], out=cum)
        blend(again, vals[j + 1] if j + 1 < k else _bits_view(base), np.less_equal(cum, target, out=cond))
    # the drawn value left at the base (`changed` is elementwise: the drawn run's own mask) takes the redraw
    not_kept = _changed_into(out.view(models[0].dtype), base, atol, cond)
    np.logical_not(not_kept, out=not_kept)
    unchanged = int(np.count_nonzero(not_kept))
    blend(out, again, not_kept)
    stats.kept_base = n - some
    stats.resampled = unchanged - stats.kept_base  # a drawn run that changed it has a positive share
    return stats
