"""Mean response NLL of host examples under a model, batched over the mesh.

Data preparation scores difficulty with it, evaluation the held-out loss, the HBO
probes (`hbo_jax.mixing.rewards`) their progress; `nll_fn` is a jitted per-example NLL
(`hbo_jax.step.make_example_nll_fn`).
"""

from __future__ import annotations

import jax
import numpy as np

from hbo_jax.data.store import collate
from hbo_jax.parallel import batch_sharding, round_up_rows
from hbo_jax.progress import progress


def response_only(ids: np.ndarray, mask: np.ndarray):
    """The response tokens alone, preceded by the token before the response (for IFD)."""
    pos = np.flatnonzero(mask)
    lead = ids[pos[0] - 1 : pos[0]] if pos[0] > 0 else ids[:0]
    r_ids = np.concatenate([lead, ids[pos]])
    r_mask = np.concatenate([np.zeros(len(lead), np.uint8), np.ones(len(pos), np.uint8)])
    r_mask[0] = 0
    return r_ids, r_mask


def to_device(batch: dict, mesh, keys=("input_ids", "targets", "loss_mask")) -> tuple[jax.Array, ...]:
    sh = batch_sharding(mesh)
    return tuple(jax.device_put(batch[k], sh) for k in keys)


def bucket_width(longest: int, seq_len: int) -> int:
    """The padded width of a scoring batch whose longest example has `longest` tokens: the next power of
    two of its inputs (longest - 1), at least 32, at most seq_len (fewer compiled shapes)."""
    return int(min(seq_len, max(32, 2 ** int(np.ceil(np.log2(max(longest - 1, 1)))))))


def scored_columns(loss_mask: np.ndarray) -> np.ndarray | None:
    """The positions each row of a [B, T] loss mask scores, ascending, -1 after its last: [B, R] with R a
    quarter or a half of T, the smallest that holds every row's (two extra compiled shapes per width at
    most); None where a row scores more than half its positions (the head then runs on all of them)."""
    b, t = loss_mask.shape
    most = int(np.count_nonzero(loss_mask, axis=1).max(initial=0))
    r = next((w for w in (t // 4, t // 2) if most <= w and w >= 8), None)
    if r is None:
        return None
    order = np.argsort(loss_mask == 0, axis=1, kind="stable")[:, :r]  # the scored positions first, in order
    return np.where(np.take_along_axis(loss_mask, order, axis=1) != 0, order, -1).astype(np.int32)


def score_examples(examples: list, nll_fn, params, mesh, seq_len: int, pad_id: int,
                   batch_size: int, desc: str = "") -> np.ndarray:
    """Mean response NLL per example in one batched pass, padded per length bucket; the output head only
    at the scored positions when they are at most half of the width (`scored_columns`)."""
    batch_size = round_up_rows(batch_size, mesh)
    lengths = np.array([len(ids) for ids, _ in examples])
    order = np.argsort(lengths, kind="stable")
    out = np.zeros(len(examples), np.float64)
    pending: list = []
    for a in progress(range(0, len(order), batch_size), desc=desc, disable=not desc):
        idx = order[a:a + batch_size]
        width = bucket_width(int(lengths[idx].max()), seq_len)
        chunk = [examples[i] for i in idx] + [examples[idx[0]]] * (batch_size - len(idx))
        batch = collate(chunk, width, pad_id)
        columns = scored_columns(batch["loss_mask"])
        if columns is not None:
            batch["columns"] = columns
        pending.append((idx, nll_fn(params, *to_device(batch, mesh, tuple(batch)))[0]))
        # Read results back two batches late: the host pads the next batch while the
        # device runs this one, and at most a few batches wait in memory.
        while len(pending) > 2:
            i, nll = pending.pop(0)
            out[i] = np.asarray(nll)[: len(i)]
    for i, nll in pending:
        out[i] = np.asarray(nll)[: len(i)]
    return out
