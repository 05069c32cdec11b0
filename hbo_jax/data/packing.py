"""Sequence packing: a step's examples laid into fixed-shape rows of `seq_len` tokens.

Packing keeps the sampler untouched: a step still draws `train.batch_size` examples
from the same plan, and only their layout changes. Examples are placed greedily,
first-fit in plan order, into `rows` rows. Each example is its own segment: segment id
`global example index + 1` (0 = padding, no loss), RoPE positions restart at 0, and the
model's segment mask keeps attention inside a segment. Per-example values (group id,
reference NLL) stay one per example, indexed by `segment_ids - 1`, so the train step can
rebuild the unpacked per-example statistics exactly with segment sums.

No example is ever dropped (that would bias the actors' statistics). A step whose
examples do not fit in `pack_rows` rows on some host overflows: every host then packs
that step into one row per example (its share of train.batch_size rows, which always
fits), so the train step has at most two shapes (two compiles). Every host decides from
the global plan and the stores' lengths alone, so all hosts agree on the shape.
Overflow steps are counted (`pack_stats["overflow_steps"]`) and cost what an unpacked
step costs; a larger `data.pack_rows` avoids them. `pack` itself raises `PackingError`
when asked for too few rows.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from hbo_jax.errors import DataError


class PackingError(DataError):
    """A step's examples do not fit in the packed rows."""


def packed_length(num_ids: int, seq_len: int) -> int:
    """Token slots an example of `num_ids` ids takes: n + 1 ids give n (input, target) pairs."""
    return max(min(int(num_ids), seq_len + 1) - 1, 0)


def first_fit(lengths: Sequence[int], rows: int, seq_len: int) -> np.ndarray:
    """Row of each example, first-fit in order; raises PackingError if one does not fit.

    Args:
        lengths: Token slots per example (each <= seq_len).
        rows: Rows available.
        seq_len: Row length.

    Returns:
        Row index per example [E] int64.
    """
    free = np.full(rows, seq_len, np.int64)
    where = np.empty(len(lengths), np.int64)
    for e, n in enumerate(lengths):
        fits = np.flatnonzero(free >= n)
        if not len(fits):
            total = int(np.sum(lengths))
            need = first_fit_rows(lengths, seq_len)
            raise PackingError(
                f"sequence packing: the step's {len(lengths)} examples ({total} tokens) need "
                f"{need} rows of {seq_len} tokens, only {rows} were given (one row per example "
                f"always fits; the trainer overflows to that, see data.pack_rows)")
        where[e] = fits[0]
        free[fits[0]] -= n
    return where


def first_fit_rows(lengths: Sequence[int], seq_len: int) -> int:
    """How many rows first-fit needs for `lengths` (for messages and sizing)."""
    free: list[int] = []
    for n in lengths:
        for i, f in enumerate(free):
            if f >= n:
                free[i] -= n
                break
        else:
            free.append(seq_len - n)
    return len(free)


def pack(examples: Sequence[tuple[np.ndarray, np.ndarray]], seq_len: int, pad_id: int, rows: int,
         first_index: int = 0) -> dict[str, np.ndarray]:
    """Packs (ids, mask) examples into `rows` next-token-prediction rows of `seq_len`.

    Examples longer than seq_len + 1 tokens are truncated exactly as `collate` does.

    Args:
        examples: (token ids, loss mask) per example, in plan order.
        seq_len: Row length.
        pad_id: Padding token id.
        rows: Rows of the packed batch (static: one compile).
        first_index: Global index of examples[0] (this host's offset in the global batch),
            so segment ids index the global per-example arrays.

    Returns:
        input_ids, targets [rows, seq_len] int32; loss_mask [rows, seq_len] float32;
        positions [rows, seq_len] int32 (restarting at 0 per segment); segment_ids
        [rows, seq_len] int32 (global example index + 1, 0 = padding).
    """
    lengths = [packed_length(len(ids), seq_len) for ids, _ in examples]
    where = first_fit(lengths, rows, seq_len)
    out = {"input_ids": np.full((rows, seq_len), pad_id, np.int32),
           "targets": np.full((rows, seq_len), pad_id, np.int32),
           "loss_mask": np.zeros((rows, seq_len), np.float32),
           "positions": np.zeros((rows, seq_len), np.int32),
           "segment_ids": np.zeros((rows, seq_len), np.int32)}
    fill = np.zeros(rows, np.int64)
    for e, ((ids, mask), n, r) in enumerate(zip(examples, lengths, where)):
        a, b = fill[r], fill[r] + n
        out["input_ids"][r, a:b] = ids[:n]
        out["targets"][r, a:b] = ids[1 : n + 1]
        out["loss_mask"][r, a:b] = mask[1 : n + 1]
        out["positions"][r, a:b] = np.arange(n)
        out["segment_ids"][r, a:b] = first_index + e + 1
        fill[r] = b
    return out


def truncated(examples: Sequence[tuple[np.ndarray, np.ndarray]], seq_len: int) -> int:
    """How many examples lose tokens to the row length (the same as without packing)."""
    return sum(len(ids) > seq_len + 1 for ids, _ in examples)


def step_rows(plan: dict, stores: Sequence, batch_size: int, per_host: int, seq_len: int,
              pack_rows: int) -> int:
    """Rows per host for a step: `pack_rows` if every host's slice fits, else `per_host`.

    Args:
        plan: The sampler's global plan (dataset and index per slot).
        stores: Training stores per subset (only their `lengths` are read).
        batch_size: Global examples per step.
        per_host: Examples per host (batch_size / process count).
        seq_len: Row length.
        pack_rows: Packed rows per host.
    """
    lengths = [packed_length(stores[d].offsets[i + 1] - stores[d].offsets[i], seq_len)
               for d, i in zip(plan["dataset"], plan["index"])]
    fits = all(first_fit_rows(lengths[a:a + per_host], seq_len) <= pack_rows
               for a in range(0, batch_size, per_host))
    return pack_rows if fits else per_host


def default_pack_rows(batch_size: int, mean_slots: float, seq_len: int, divisor: int) -> int:
    """Rows for `data.pack_rows=0`: 1.25x the rows a step of average examples fills.

    The 25% margin absorbs first-fit's waste and most steps that draw longer examples
    than average (on the fixture at seq_len 256 and 64 examples a step it covers the
    worst of 1,000 steps); steps beyond it overflow. Rounded up to a multiple of the
    batch axes' size (data x fsdp) and capped at batch_size (which always fits).

    Args:
        batch_size: Global examples per step (a multiple of `divisor`).
        mean_slots: Mean token slots per training example (`packed_length`).
        seq_len: Row length.
        divisor: Size of the batch axes.
    """
    rows = max(1, math.ceil(1.25 * batch_size * mean_slots / seq_len))
    return min(-(-rows // divisor) * divisor, batch_size)
