"""On-disk token store: variable-length token ids and loss masks, memory-mapped.

One store per (subset, split): `tokens.npy` (flat int32), `mask.npy` (flat uint8) and
`offsets.npy` (int64, n + 1). It is a random-access source (`len`, `[i]`), so Grain can
wrap it, and `collate` pads any list of its examples into a training batch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


class TokenStore:
    """Random access to (ids, mask) pairs stored flat on disk."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.tokens = np.load(self.path / "tokens.npy", mmap_mode="r")
        self.mask = np.load(self.path / "mask.npy", mmap_mode="r")
        self.offsets = np.load(self.path / "offsets.npy")

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.offsets[i], self.offsets[i + 1]
        return np.asarray(self.tokens[a:b]), np.asarray(self.mask[a:b])

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @staticmethod
    def write(path: str | Path, examples: list[tuple[np.ndarray, np.ndarray]]) -> "TokenStore":
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        lengths = np.array([len(ids) for ids, _ in examples], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        cat = lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt)
        np.save(path / "tokens.npy", cat([ids for ids, _ in examples], np.int32))
        np.save(path / "mask.npy", cat([m for _, m in examples], np.uint8))
        np.save(path / "offsets.npy", offsets)
        return TokenStore(path)


def collate(examples: list[tuple[np.ndarray, np.ndarray]], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """Pads examples of at most seq_len + 1 tokens into next-token-prediction arrays [B, seq_len]."""
    b = len(examples)
    input_ids = np.full((b, seq_len), pad_id, np.int32)
    targets = np.full((b, seq_len), pad_id, np.int32)
    loss_mask = np.zeros((b, seq_len), np.float32)
    for r, (ids, mask) in enumerate(examples):
        n = min(len(ids), seq_len + 1) - 1
        input_ids[r, :n] = ids[:n]
        targets[r, :n] = ids[1 : n + 1]
        loss_mask[r, :n] = mask[1 : n + 1]
    return {"input_ids": input_ids, "targets": targets, "loss_mask": loss_mask}
