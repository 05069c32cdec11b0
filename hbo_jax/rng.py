"""Named random streams: every host-side draw of a run comes from `generator(seed, stream, ...)`.

A stream is counter-based: `np.random.default_rng([seed, stream, *keys])`, so a draw
depends only on its seed, its stream and its keys (a step, a leaf, an update index),
never on what was drawn before. That is what lets a resumed run, or another host,
recompute any draw. The ids are fixed: renumbering a stream changes every run.

Which seed feeds which stream: `train.seed` initialises the model and drives the
scorer's warm-up sampler (both shape the prepared data); `train.data_seed`
(`TrainConfig.resolved_data_seed`) drives the training sampler and the probes, so runs
that differ only in it share the prepared data and the starting model.
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np


class Stream(IntEnum):
    """Stream ids (the second entry of the seed sequence)."""

    SAMPLER = 0  # (dataset, bucket) of every batch slot; keys: step
    LEAF_PERMUTATION = 1  # order of examples within a leaf; keys: leaf, leaf epoch
    GLOBAL_PROBES = 2  # global-reward probe batch; keys: update index
    LOCAL_PROBES = 3  # fixed local-reward probe sets; keys: dataset, bucket
    DEV_PROBES = 4  # fixed MultiDDS dev set; keys: dataset
    EVAL_SAMPLE = 5  # the capped eval rows of a subset (seed 0 for every run); keys: crc32 of the subset name
    VALIDATION = 6  # ScaleBiO's validation batches: order of the validation set; keys: epoch
    DRAW = 7  # `python -m hbo_jax.mixing.draw`: examples of a subset; keys: subset index
    LISA_U = 8  # ScaleBiO's LISA blocks of u (and of w with a shared choice); keys: switch index
    LISA_W = 9  # ScaleBiO's LISA blocks of w drawn independently; keys: switch index
    TRAIN_SAMPLE = 10  # data.train_fraction's rows of a subset (seed 0 for every run); keys: crc32 of the subset name


def generator(seed: int, stream: Stream, *keys: int) -> np.random.Generator:
    """The generator of one draw of `stream`.

    Args:
        seed: The run's seed for this stream (`train.seed` or the resolved data seed).
        stream: Which stream.
        *keys: What identifies the draw within the stream (a step, a leaf, ...).

    Returns:
        A fresh generator seeded by `[seed, stream, *keys]`.
    """
    return np.random.default_rng([int(seed), int(stream), *(int(k) for k in keys)])
