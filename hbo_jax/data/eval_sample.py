"""The rows of a subset's eval split that a capped evaluation uses (`data.max_eval_per_subset`).

In the data layer because two readers need the same rows: the evaluation (hbo_jax.evaluate)
and ScaleBiO's validation set (hbo_jax.data.validation), which takes the eval rows the
evaluation does not, so the reported held-out loss stays held out.
"""

from __future__ import annotations

import zlib

import numpy as np

from hbo_jax.rng import Stream, generator


def eval_sample(strata: np.ndarray, cap: int, subset: str) -> np.ndarray:
    """The rows (ascending) a capped evaluation of a subset uses: a stratified random sample.

    Every row gets a place in one fixed random order in which each stratum's rows are
    spread evenly (the k-th of a stratum's n rows, in random order, sits at (k + u) / n,
    u random per stratum), so every prefix holds each stratum in proportion, to within a
    row; a cap takes a prefix, so the periodic eval set lies inside the final one. Not
    the first rows of the file: a file sorted by language, source or label would be
    evaluated on its first block only. The order is seeded by the subset's name alone,
    so every seed and strategy of a comparison is evaluated on the same rows.

    Args:
        strata: A stratum id per row (the callers use each eval example's difficulty bucket).
        cap: How many rows to take.
        subset: The subset's name (the seed).
    """
    n = len(strata)
    if cap >= n:
        return np.arange(n)
    rng = generator(0, Stream.EVAL_SAMPLE, zlib.crc32(subset.encode()))
    place = np.empty(n)
    for s in np.unique(strata):
        rows = rng.permutation(np.flatnonzero(strata == s))
        place[rows] = (np.arange(len(rows)) + rng.random()) / len(rows)
    return np.sort(np.lexsort((rng.random(n), place))[:cap])  # ties in random order
