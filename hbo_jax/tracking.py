"""Experiment trackers: TensorBoard event files (default) and Weights & Biases (optional).

`Tracker(cfg.tracking, run_dir, config=to_dict(cfg))` writes TensorBoard events to
`<run_dir>/tb` (tensorboardX) and, when `tracking.wandb_project` is set, logs the same
scalars to W&B (imported lazily: `pip install wandb`). Only process 0 writes.

Metric names (buckets are 1-based, `b1` = easiest, as in the report's figures):
  training (metrics.jsonl)  loss, grad_norm, loss_tokens_per_s, examples, mixing_share,
                            loss/<subset>, drawn/<subset> (examples drawn this interval),
                            an algorithm's `mean_metrics` (ScaleBiO: L1, L2_w, L2_u, gap, grad_norm_u)
  mixing (mixing.jsonl)     p_global/<subset>, p_local/<subset>/b<j>, reward/global/<subset>, lambda/<subset>,
                            reward/local/<subset>/b<j>, ppl_ratio/<subset>/b<j>, mixing/seconds
  evaluation                <prefix>/<key>/<subset> for key in loss, ppl, acc, acc_norm,
                            exact_match; <prefix>/bucket_loss/<subset>/b<j>; subset
                            `macro_avg` for the macro average
"""

from __future__ import annotations

import logging
import math
import uuid
from pathlib import Path
from typing import Any, Sequence

log = logging.getLogger("hbo_jax.tracking")

EVAL_KEYS = ("loss", "ppl", "acc", "acc_norm", "exact_match")
WANDB_ID_FILE = "wandb_run_id.txt"


def _number(v: Any) -> float | None:
    """A loggable float, or None for anything that is not a finite-or-not real scalar."""
    if isinstance(v, bool) or v is None:
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _bucket(j: int) -> str:
    return f"b{j + 1}"


def mixing_scalars(record: dict, names: Sequence[str]) -> dict[str, float]:
    """Scalars of one mixing.jsonl record (an actor update or a replayed schedule entry)."""
    out: dict[str, float] = {}
    for key, prefix in (("p_global", "p_global"), ("reward_global", "reward/global"), ("lambda", "lambda")):
        for n, v in zip(names, record.get(key) or []):
            out[f"{prefix}/{n}"] = float(v)
    for key, prefix in (("p_local", "p_local"), ("reward_local", "reward/local"), ("ppl_ratio", "ppl_ratio")):
        for n, row in zip(names, record.get(key) or []):
            for j, v in enumerate(row):
                out[f"{prefix}/{n}/{_bucket(j)}"] = float(v)
    if _number(record.get("seconds")) is not None:
        out["mixing/seconds"] = float(record["seconds"])
    return out


def eval_scalars(eval_dict: dict, prefix: str = "eval") -> dict[str, float]:
    """Scalars of one evaluation ({subset: {loss, ppl, ...}, macro_avg: {...}})."""
    out: dict[str, float] = {}
    for subset, vals in eval_dict.items():
        if not isinstance(vals, dict):
            continue
        for key in EVAL_KEYS:
            if _number(vals.get(key)) is not None:
                out[f"{prefix}/{key}/{subset}"] = float(vals[key])
        for j, v in enumerate(vals.get("bucket_loss") or []):
            if _number(v) is not None:
                out[f"{prefix}/bucket_loss/{subset}/{_bucket(j)}"] = float(v)
    return out


def metrics_scalars(record: dict, names: Sequence[str] = ()) -> dict[str, float]:
    """Scalars of one metrics.jsonl record: its numeric fields as named, plus drawn/<subset>."""
    out = {k: float(v) for k, v in record.items() if k != "step" and _number(v) is not None}
    for n, row in zip(names, record.get("drawn") or []):
        out[f"drawn/{n}"] = float(sum(row))
    return out


class Tracker:
    """Logs scalars to TensorBoard (`<run_dir>/tb`) and optionally W&B; a no-op off process 0."""

    def __init__(self, cfg, run_dir: str | Path, config: dict | None = None):
        import jax

        self.run_dir = Path(run_dir)
        self.enabled = jax.process_index() == 0
        self._tb = self._wandb = None
        if not self.enabled:
            return
        if cfg.tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(logdir=str(self.run_dir / "tb"), flush_secs=30)
        if cfg.wandb_project:
            self._wandb = _start_wandb(cfg, self.run_dir, config)

    @property
    def active(self) -> bool:
        return self._tb is not None or self._wandb is not None

    def log(self, step: int, scalars: dict[str, float]) -> None:
        """Logs every numeric value of `scalars` at `step` (non-numbers are skipped)."""
        if not self.active:
            return
        clean = {k: f for k, v in scalars.items() if (f := _number(v)) is not None}
        if self._tb is not None:
            for tag, value in clean.items():
                self._tb.add_scalar(tag, value, int(step))
        if self._wandb is not None and clean:
            self._wandb.log({k: (v if math.isfinite(v) else None) for k, v in clean.items()}, step=int(step))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _start_wandb(cfg, run_dir: Path, config: dict | None):
    """wandb.init for this run directory; a resumed run continues the same W&B run."""
    try:
        import wandb
    except ImportError as e:
        raise ImportError(f"tracking.wandb_project={cfg.wandb_project!r} needs Weights & Biases, which is "
                          "not installed: `pip install wandb` (or leave tracking.wandb_project empty)") from e
    run_dir.mkdir(parents=True, exist_ok=True)
    id_file = run_dir / WANDB_ID_FILE
    run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
    id_file.write_text(run_id)
    log.info("W&B: project %s, run %s (%s mode)", cfg.wandb_project, run_id, cfg.wandb_mode)
    return wandb.init(project=cfg.wandb_project, entity=cfg.wandb_entity or None, mode=cfg.wandb_mode,
                      dir=str(run_dir), name=run_dir.resolve().name, id=run_id, resume="allow", config=config)
