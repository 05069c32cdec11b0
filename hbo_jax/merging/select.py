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
the row-major tensor its output `i`, so a block starting at element `s` starts the
counter at `s // 4`. The result is therefore independent of how the tensor is cut into
blocks, of the order tensors are processed in and of how the inputs are sharded. The
upper 32 bits of the output draw the run, the lower 32 bits draw the replacement.
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np

SUBCHUNK = 1 << 20  # elements per pass inside a block: bounds the temporaries (random bits, masks)


def tensor_key(seed: int, name: str) -> tuple[int, int]:
    """The Philox key of a tensor: (seed, the first 8 bytes of sha256(name)), stable across Pythons."""
    if not 0 <= seed < 2 ** 64:
        raise ValueError(f"seed {seed} is not in [0, 2**64)")
    return seed, int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")


def element_bits(key: tuple[int, int], start: int, count: int) -> np.ndarray:
    """The 64 random bits of elements `start .. start+count-1` of the tensor keyed `key`."""
    first = start // 4  # Philox4x64: each counter value gives 4 outputs
    gen = np.random.Philox(key=list(key), counter=[first, 0, 0, 0])
    skip = start - 4 * first
    return gen.random_raw(count + skip)[skip:]


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


def _thresholds(probs: np.ndarray) -> np.ndarray:
    """Cumulative probabilities in units of 2**-32: run k is drawn when bits >= t[k-1] and < t[k]."""
    return np.round(np.cumsum(probs)[:-1] * 2.0 ** 32).astype(np.uint64)


@dataclasses.dataclass
class BlockStats:
    """Element counts of one tensor (summed over its blocks)."""

    elements: int = 0
    equal_base: list[int] | None = None  # per model: elements within `atol` of the base
    resampled: int = 0  # drawn run at the base value, redrawn among the runs that changed it
    kept_base: int = 0  # no run changed the element: it keeps the base value

    def add(self, other: "BlockStats") -> None:
        self.elements += other.elements
        self.resampled += other.resampled
        self.kept_base += other.kept_base
        if other.equal_base is not None:
            self.equal_base = ([a + b for a, b in zip(self.equal_base, other.equal_base)]
                               if self.equal_base is not None else list(other.equal_base))

    def as_json(self) -> dict:
        n = max(self.elements, 1)
        out = {"elements": self.elements}
        if self.equal_base is not None:
            out["frac_equal_base"] = [c / n for c in self.equal_base]
        out.update(frac_resampled=self.resampled / n, frac_kept_base=self.kept_base / n)
        return out


def changed(models: list[np.ndarray], base: np.ndarray, atol: float) -> list[np.ndarray]:
    """Per model, where it differs from the base: in the stored dtype (atol 0), else by more than atol."""
    if atol == 0:
        return [np.not_equal(m, base) for m in models]
    b = base.astype(np.float32)
    return [np.abs(m.astype(np.float32) - b) > atol for m in models]


def average_block(models: list[np.ndarray], weights: np.ndarray, base: np.ndarray | None = None,
                  atol: float = 0.0) -> tuple[np.ndarray, BlockStats]:
    """sum_k weights[k] * models[k], accumulated in float32 in model order, rounded to the stored dtype."""
    out = np.zeros(models[0].shape, np.float32)
    for w, m in zip(weights, models):
        out += np.float32(w) * m.astype(np.float32)
    stats = BlockStats(elements=out.size)
    if base is not None:
        stats.equal_base = [int(m.size - c.sum()) for m, c in zip(models, changed(models, base, atol))]
    return out.astype(models[0].dtype), stats


def select_block(models: list[np.ndarray], base: np.ndarray | None, probs: np.ndarray, key: tuple[int, int],
                 start: int, *, resample: bool, atol: float = 0.0) -> tuple[np.ndarray, BlockStats]:
    """Parameter selection on the elements `start ..` of a tensor (a block of consecutive elements).

    Args:
        models: The K runs' values of the block, one shape and dtype.
        base: The base's values of the block in the same dtype (needed for resampling
            and the statistics; None: plain selection without statistics).
        probs: K selection probabilities.
        key: `tensor_key(seed, name)`.
        start: Index of the block's first element in the row-major tensor.
        resample: Redraw elements whose drawn run left them at the base value.
        atol: Equality tolerance against the base (0: exact in the stored dtype).

    Returns:
        (the merged block, its statistics).
    """
    if resample and base is None:
        raise ValueError("resampling needs the base model")
    shape = models[0].shape
    flat = [m.reshape(-1) for m in models]
    flat_base = None if base is None else base.reshape(-1)
    out = np.empty(flat[0].size, flat[0].dtype)
    stats = BlockStats()
    for lo in range(0, out.size, SUBCHUNK):
        hi = min(lo + SUBCHUNK, out.size)
        part = [m[lo:hi] for m in flat]
        b = None if flat_base is None else flat_base[lo:hi]
        out[lo:hi], s = _select(part, b, probs, element_bits(key, start + lo, hi - lo), resample, atol)
        stats.add(s)
    return out.reshape(shape), stats


def _select(models, base, probs, bits, resample: bool, atol: float):
    draw = (bits >> np.uint64(32)).astype(np.uint64)
    pick = np.zeros(bits.size, np.uint8)
    for t in _thresholds(probs):
        pick += draw >= t
    out = np.choose(pick, models)
    stats = BlockStats(elements=bits.size)
    if base is None:
        return out, stats
    ch = changed(models, base, atol)
    stats.equal_base = [int(c.size - c.sum()) for c in ch]
    if not resample:
        return out, stats
    ch = np.stack(ch) & (probs > 0)[:, None]  # [K, n]; a run never drawn is not redrawn either
    any_ch = ch.any(axis=0)
    at_base = ~np.take_along_axis(ch, pick[None].astype(np.intp), axis=0)[0]
    redo = np.flatnonzero(at_base & any_ch)
    keep = at_base & ~any_ch
    out[keep] = base[keep]  # nobody changed it: the base value itself (not a run's value within atol)
    stats.kept_base, stats.resampled = int(keep.sum()), int(redo.size)
    if redo.size:
        w = probs[:, None] * ch[:, redo]  # [K, r]: the changing runs, weighted as drawn
        cum = np.cumsum(w, axis=0)
        u = (bits[redo] & np.uint64(0xFFFFFFFF)).astype(np.float64) * 2.0 ** -32 * cum[-1]
        again = np.minimum((u[None] >= cum).sum(axis=0), len(models) - 1)
        out[redo] = np.choose(again, [m[redo] for m in models])
    return out, stats
