"""HBO probes and local rewards (global rewards: `hbo_jax.mixing.global_rewards`).

Global probes: per dataset, a batch drawn evenly over its buckets, fresh at each update.

Local reward (paper Eq. 8): for each (dataset, bucket), the mean over a fixed probe set
of PPL_theta(y|x) / PPL_theta0(y|x), with theta0 the model at the start of training;
then relative to the bucket mean, R_ij / mean_j R_ij. A higher value means less progress
since the start, so more sampling. The probe sets are fixed at the start, which makes the
ratio a paired comparison (same examples under theta and theta0). The code's variants
compare the loss (`loss_ratio`: NLL_theta / NLL_theta0) or the IFD (`ifd_ratio`:
IFD_theta / IFD_theta0 with IFD = NLL(y|x) / NLL(y)) instead.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import numpy as np

from hbo_jax.data.scoring import response_only, to_device
from hbo_jax.data.store import collate
from hbo_jax.parallel import batch_divisor
from hbo_jax.rng import Stream, generator


def relative(rewards: jax.Array | np.ndarray) -> np.ndarray:
    """R_ij / mean_j R_ij (reference code utils:2006-2009)."""
    r = np.asarray(rewards, np.float64)
    return r / r.mean(axis=-1, keepdims=True)


def ppl_ratio(nll_now: np.ndarray, nll_ref: np.ndarray) -> np.ndarray:
    """Mean over probes of exp(NLL_now - NLL_ref) = PPL_theta / PPL_theta0; [D, K, M] -> [D, K]."""
    return np.exp(np.asarray(nll_now, np.float64) - np.asarray(nll_ref, np.float64)).mean(-1)


def probe_statistic(kind: str, nll: np.ndarray, nll_alone: np.ndarray | None = None) -> np.ndarray:
    """What a local reward compares over time, per probe: the NLL, or the IFD for ifd_ratio."""
    if kind == "ifd_ratio":
        return np.asarray(nll, np.float64) / np.maximum(np.asarray(nll_alone, np.float64), 1e-6)
    return np.asarray(nll, np.float64)


def local_ratio(kind: str, now: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Mean over probes [D, K, M] -> [D, K] of the statistic now relative to the start."""
    if kind == "ppl_ratio":
        return ppl_ratio(now, ref)
    return (np.asarray(now, np.float64) / np.maximum(np.asarray(ref, np.float64), 1e-6)).mean(-1)


def train_ppl_ratio(ratio_sum: np.ndarray, count: np.ndarray) -> np.ndarray:
    """Mean PPL ratio per (dataset, bucket) from training-batch sums [D, K].

    A bucket not sampled since the last update gets its dataset's mean over sampled
    buckets (neutral after `relative`); a dataset with no sampled bucket gets 1 everywhere.
    """
    ratio_sum, count = np.asarray(ratio_sum, np.float64), np.asarray(count, np.float64)
    seen = count > 0
    mean = np.where(seen, ratio_sum / np.maximum(count, 1), 0.0)
    row = np.where(seen.any(1), mean.sum(1) / np.maximum(seen.sum(1), 1), 1.0)
    return np.where(seen, mean, row[:, None])


def draw_global_probes(leaves, per_bucket: int, seed: int, update_index: int) -> list[tuple[int, int]]:
    """(dataset, example index) pairs: per dataset, `per_bucket` examples from every bucket."""
    rng = generator(seed, Stream.GLOBAL_PROBES, update_index)
    picks = []
    for i, row in enumerate(leaves):
        for leaf in row:
            if len(leaf):
                picks += [(i, int(x)) for x in rng.choice(leaf, per_bucket, replace=len(leaf) < per_bucket)]
            else:  # empty bucket: take the dataset's other buckets' examples instead
                pool = np.concatenate([l for l in row if len(l)])
                picks += [(i, int(x)) for x in rng.choice(pool, per_bucket)]
    return picks


def dev_probes(dev_stores: Sequence, per_dataset: int, seed: int) -> list[tuple[int, int]]:
    """A fixed dev set for MultiDDS: up to `per_dataset` eval examples of every dataset."""
    picks = []
    for i, store in enumerate(dev_stores):
        rng = generator(seed, Stream.DEV_PROBES, i)
        picks += [(i, int(x)) for x in rng.permutation(len(store))[:per_dataset]]
    return picks


def fixed_local_probes(leaves, per_group: int, seed: int) -> list[tuple[int, int]]:
    """The probe set of every (dataset, bucket), fixed for the run, in [D, K, M] order."""
    picks = []
    for i, row in enumerate(leaves):
        for j, leaf in enumerate(row):
            rng = generator(seed, Stream.LOCAL_PROBES, i, j)
            pool = leaf if len(leaf) else np.concatenate([l for l in row if len(l)])
            picks += [(i, int(x)) for x in rng.choice(pool, per_group, replace=len(pool) < per_group)]
    return picks


def probe_batch(stores: Sequence, picks: list[tuple[int, int]], seq_len: int, pad_id: int,
                response_alone: bool = False) -> dict:
    """Host arrays for probe examples (same layout as a training batch).

    With `response_alone`, each example is its response without the prompt (for IFD).
    """
    exs = [stores[i][x] for i, x in picks]
    return collate([response_only(*e) for e in exs] if response_alone else exs, seq_len, pad_id)


def padded_rows_per_dataset(num_datasets: int, rows: int, mesh) -> int:
    """The fewest rows >= `rows` per dataset such that D equal blocks divide the batch axes."""
    per = rows
    while (num_datasets * per) % batch_divisor(mesh):
        per += 1
    return per


def pad_per_dataset(batch: dict, num_datasets: int, mesh) -> dict:
    """Pads each dataset's probe rows with loss-free rows so D * rows divides the batch axes.

    Rows with an all-zero loss mask change neither a masked-mean loss nor its gradient.
    """
    rows = len(batch["input_ids"]) // num_datasets
    per = padded_rows_per_dataset(num_datasets, rows, mesh)
    if per == rows:
        return batch
    out = {}
    for k, v in batch.items():
        v = v.reshape((num_datasets, rows) + v.shape[1:])
        pad = np.zeros((num_datasets, per - rows) + v.shape[2:], v.dtype)
        out[k] = np.concatenate([v, pad], axis=1).reshape((num_datasets * per,) + v.shape[2:])
    return out


def batched_example_nll(nll_fn: Callable, params, batch: dict, chunk: int, mesh) -> np.ndarray:
    """Per-example mean NLL over a host batch, in fixed-size chunks (one compiled shape)."""
    n = len(batch["input_ids"])
    out = []
    for a in range(0, n, chunk):
        part = {k: v[a:a + chunk] for k, v in batch.items() if k in ("input_ids", "targets", "loss_mask")}
        short = chunk - len(part["input_ids"])
        if short:
            part = {k: np.concatenate([v, np.zeros((short,) + v.shape[1:], v.dtype)]) for k, v in part.items()}
        out.append(np.asarray(jax.device_get(nll_fn(params, *to_device(part, mesh))[0])))
    return np.concatenate(out)[:n]
