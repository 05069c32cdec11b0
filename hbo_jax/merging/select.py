"""The per-element merge rules, on one block of a tensor: weighted average and parameter
selection with resampling (Ju et al., EMNLP 2024), with position-keyed randomness.

Parameter selection takes each scalar element from one run, drawn from a categorical
over the K runs, without rescaling: in expectation it is the weighted average, but every
element keeps a value some run actually trained to. With resampling, an element whose
drawn run left it at the base value is redrawn among the runs that changed it (with the
same probabilities, renormalised); it keeps the base value only when no run changed it.
The paper leaves the number of redraws open; one draw restricted to the changing runs is
the limit of redrawing until a changed value comes up.

Randomness is a function of (seed, tensor name, element index) alone: a Philox4x64
counter-based generator keyed by (seed, 64 bits of sha256(name)) gives element `i` of
the row-major tensor the 32-bit word `i` of its stream (output `i // 2`, its lower half
for even `i`, its upper half for odd), so a block starting at element `s` starts the
counter at `s // 8`. The result is therefore independent of how the tensor is cut into
blocks, of the order tensors are processed in and of how the inputs are sharded. The
upper 16 bits of the word draw the run, the lower 16 the redraw.

Probability resolution: 2**-16. Each run owns `q_k` of the 65536 values of the draw
(`_weights`: the differences of floor(cumulative probability * 2**16)), so its
probability is off by less than 2**-16 (a probability below that may round to 0, and
such a run is never drawn). The redraw among a set S of runs maps its 16 bits `r` to
`t = r * W(S) >> 16` with W(S) the sum of S's `q_k`, and takes the run whose slice of
[0, W(S)) holds `t`: each run's conditional probability is again within 2**-16 of
q_k / W(S). Both are far below what a chi-square test of millions of elements detects.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import threading

import numpy as np

SUBCHUNK = 1 << 17  # elements per pass inside a block: its temporaries (random bits, masks) stay in cache
MAX_MODELS = 16  # a block of every input is held at once; shares of the draw are 2**-16 (module doc)


def tensor_key(seed: int, name: str) -> tuple[int, int]:
    """The Philox key of a tensor: (seed, the first 8 bytes of sha256(name)), stable across Pythons."""
    if not 0 <= seed < 2 ** 64:
        raise ValueError(f"seed {seed} is not in [0, 2**64)")
    return seed, int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")


_GENERATORS = threading.local()  # one Philox per thread, re-keyed per call (no OS entropy is drawn)


def element_bits(key: tuple[int, int], start: int, count: int) -> np.ndarray:
    """The 32 random bits (uint32) of elements `start .. start+count-1` of the tensor keyed `key`."""
    gen = getattr(_GENERATORS, "philox", None)
    if gen is None:
        gen = _GENERATORS.philox = np.random.Philox(key=[0, 0])
    first, skip = divmod(start // 2, 4)  # Philox4x64: each counter value gives 4 64-bit outputs, 2 elements each
    gen.state = {"bit_generator": "Philox", "state": {"counter": np.array([first, 0, 0, 0], np.uint64),
                                                      "key": np.array(key, np.uint64)},
                 "buffer": np.zeros(4, np.uint64), "buffer_pos": 4, "has_uint32": 0, "uinteger": 0}
    raw = gen.random_raw(skip + (start + count + 1) // 2 - start // 2)[skip:]
    words = raw.astype("<u8", copy=False).view("<u4")  # lower half first, on any byte order
    return words[start % 2:start % 2 + count].astype(np.uint32, copy=False)


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


def _parts(n: int, pool, fn):
    """fn(lo, hi) over the SUBCHUNK pieces of 0..n, on `pool` (a ThreadPoolExecutor) when given."""
    spans = [(lo, min(lo + SUBCHUNK, n)) for lo in range(0, n, SUBCHUNK)]
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

    def part(lo, hi):
        b = None if flat_base is None else flat_base[lo:hi]
        out[lo:hi], stats = _select([m[lo:hi] for m in flat], b, probs, element_bits(key, start + lo, hi - lo),
                                    resample, atol)
        return stats

    return out.reshape(models[0].shape), _sum(_parts(out.size, pool, part))


def _blend(out: np.ndarray, src: np.ndarray, cond: np.ndarray) -> None:
    """out[cond] = src[cond], in place on unsigned bit patterns (out ^= (out ^ src) & mask): a few branch-free
    integer passes; masked copies (np.copyto where=, np.where) branch per element, ~20x slower on random masks."""
    mask = cond.view(np.uint8).astype(out.dtype)
    np.negative(mask, out=mask)  # 0 or all ones
    diff = np.bitwise_xor(out, src)
    np.bitwise_and(diff, mask, out=diff)
    np.bitwise_xor(out, diff, out=out)


def _take(values: list[np.ndarray], conds: list[np.ndarray]) -> np.ndarray:
    """Per element, values[k] for the first k whose conds[k] holds (values[-1] where none does): blends
    from the last run down, so the first true condition is written last. Unsigned or bool values."""
    out = values[-1].copy()
    raw = out.view(np.uint8) if out.dtype == bool else out
    for v, c in zip(values[-2::-1], conds[::-1]):
        _blend(raw, v.view(np.uint8) if v.dtype == bool else v, c)
    return out


def _select(models, base, probs, bits, resample: bool, atol: float):
    """Selection on one piece: `bits` are the piece's `element_bits`; see `select_block`."""
    q, edges = _weights(tuple(probs.tolist()))
    draw = bits >> np.uint32(16)
    before = [draw < e for e in edges[:-1]]  # drawn run <= k
    vals = [_bits_view(m) for m in models]
    stats = BlockStats(elements=bits.size)
    if base is None:
        return _take(vals, before).view(models[0].dtype), stats
    ch = changed(models, base, atol)
    stats.equal_base = [int(c.size - np.count_nonzero(c)) for c in ch]
    if not resample:
        return _take(vals, before).view(models[0].dtype), stats
    # the redraw among the runs that changed the element: prefix sums of their shares
    cum, total = [], np.zeros(bits.size, np.uint32)
    for c, share in zip(ch, q):
        total += np.multiply(c, share, dtype=np.uint32)
        cum.append(total.copy())
    target = np.bitwise_and(bits, np.uint32(0xFFFF))
    target *= total  # < 2**32: r < 2**16, total <= 2**16
    target >>= np.uint32(16)  # uniform on [0, total): the run whose slice holds it
    again = _take(vals, [c > target for c in cum[:-1]])
    keep = _take(ch, before)  # the drawn run changed the element: keep its value
    out = _take(vals, before)
    some = total > 0  # some run of positive share changed it
    redo = np.logical_and(some, np.logical_not(keep))
    _blend(out, again, redo)
    kept_base = np.logical_not(some)  # nobody changed it: the base value itself (not a run's within atol)
    _blend(out, _bits_view(base), kept_base)
    stats.resampled, stats.kept_base = int(np.count_nonzero(redo)), int(np.count_nonzero(kept_base))
    return out.view(models[0].dtype), stats
