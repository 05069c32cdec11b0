"""ScaleBiO's validation set: where it comes from, and its batches.

The validation set is either the eval rows of named subsets of the mixture that the run
is not evaluated on (`scalebio.validation_subsets`: the eval split minus the capped
evaluation sample, `data.max_eval_per_subset`, so eval.json's loss stays held out) or
files of its own (`scalebio.validation_files`, any
input `data.subsets` reads), tokenized like the mixture. It is only ever read through
`ValidationBatches`, never by the training sampler, so it does not leak into training
(the reference's mixture builder appends it to the training set by default; here that is
`python -m hbo_jax.mixing.draw --include-validation`, asked for).

The batch of step s is a pure function of the seed and s: the validation set is walked
through a fresh permutation each epoch (`Stream.VALIDATION`, keyed by the epoch) and
cycled, as the reference's shuffled validation loader is, so a resumed run and every host
draw the same rows without any state.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Sequence

import numpy as np

from hbo_jax.config import Config
from hbo_jax.data.eval_sample import eval_sample
from hbo_jax.data.formats import SkipReport
from hbo_jax.data.prepare import PreparedData, encode
from hbo_jax.data.sources import EVAL_SPLITS, expand
from hbo_jax.data.store import collate
from hbo_jax.errors import ConfigError, DataError
from hbo_jax.rng import Stream, generator

log = logging.getLogger(__name__)

Example = tuple[np.ndarray, np.ndarray]


def validation_examples(cfg: Config, data: PreparedData) -> list[Example]:
    """The (ids, mask) examples of the configured validation set.

    Raises:
        ConfigError: a named subset is not in the mixture.
        DataError: the validation set has no usable example.
    """
    sc = cfg.scalebio
    if sc.validation_subsets:
        out = []
        for name in sc.validation_subsets:
            if name not in data.names:
                raise ConfigError(f"scalebio.validation_subsets: {name!r} is not a subset of the mixture {data.names}")
            i = data.names.index(name)
            store = data.eval[i]
            if not len(store):
                raise DataError(f"scalebio.validation_subsets: subset {name!r} has no eval examples")
            cap = cfg.data.max_eval_per_subset
            rows = np.setdiff1d(np.arange(len(store)), eval_sample(data.eval_buckets[i], cap, name))
            if not len(rows):
                raise DataError(
                    f"scalebio.validation_subsets: all {len(store)} eval rows of subset {name!r} are in the rows the "
                    f"run is evaluated on (data.max_eval_per_subset={cap}), so none is left to validate on: lower "
                    "data.max_eval_per_subset, or give the validation set its own files (scalebio.validation_files)")
            out += [store[int(j)] for j in rows]
        return out
    report = SkipReport()
    sources = expand(list(sc.validation_files), "scalebio.validation_files", EVAL_SPLITS)
    out, _ = encode(data.tokenizer, sources, sc.validation_format, cfg, report)
    for line in report.lines():
        log.warning("scalebio validation files: skipped %s", line)
    if not out:
        raise DataError(f"scalebio.validation_files={list(sc.validation_files)}: no usable example"
                        + (f" ({'; '.join(report.lines())})" if report.total else ""))
    return out


def _digest(ids: np.ndarray) -> bytes:
    return hashlib.sha256(np.ascontiguousarray(ids, np.int32).tobytes()).digest()


def training_duplicates(examples: Sequence[Example], train_stores: Sequence) -> int:
    """How many validation examples have the same token ids as some training example."""
    seen = {_digest(ids) for ids, _ in examples}
    return sum(_digest(store[i][0]) in seen for store in train_stores for i in range(len(store)))


class ValidationBatches:
    """The validation batch of every step, cycled through per-epoch permutations.

    Args:
        examples: The validation set.
        batch_size: Global rows per step.
        seq_len: Padded length.
        pad_id: Padding token.
        seed: The run's data seed.
    """

    def __init__(self, examples: Sequence[Example], batch_size: int, seq_len: int, pad_id: int, seed: int):
        self.examples, self.batch_size, self.seed = examples, batch_size, seed
        self.seq_len, self.pad_id = seq_len, pad_id
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.clear()
            self._perms[epoch] = generator(self.seed, Stream.VALIDATION, epoch).permutation(len(self.examples))
        return self._perms[epoch]

    def indices(self, step: int) -> np.ndarray:
        """Indices into the validation set of the global batch of step `step` (0-based)."""
        n = len(self.examples)
        pos = step * self.batch_size + np.arange(self.batch_size)
        return np.array([self._perm(int(e))[int(i)] for e, i in zip(pos // n, pos % n)], np.int64)

    def host_batch(self, step: int, rows: slice) -> dict[str, np.ndarray]:
        """This host's rows of the validation batch of step `step`, padded like a training batch."""
        return collate([self.examples[i] for i in self.indices(step)[rows]], self.seq_len, self.pad_id)
