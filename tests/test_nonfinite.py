"""A run whose updates come out non-finite: skipped, counted, stopped at the limit, last checkpoint kept."""

import contextlib
import io
import json

import jax
import numpy as np
import pytest

from hbo_jax import train
from hbo_jax.checkpoint import Checkpointer

from conftest import tiny_overrides
from test_resilience import saved

FAST = ("eval.every=0", "eval.tasks=false", "tracking.tensorboard=false", "train.steps=8", "train.log_every=1")


def _poison_from(monkeypatch, steps: set[int]) -> None:
    """NaN token weights in the training batches of the given (1-based) steps: NaN loss and gradients."""
    real, calls = train.global_batch_from_host, []

    def poisoned(host_batch, mesh):
        calls.append(1)
        if len(calls) in steps:
            host_batch = dict(host_batch, loss_mask=np.full_like(host_batch["loss_mask"], np.nan))
        return real(host_batch, mesh)

    monkeypatch.setattr(train, "global_batch_from_host", poisoned)


@pytest.fixture(scope="module")
def diverged(tmp_path_factory, shared_cache):
    """Steps 4 onwards non-finite, limit 3, checkpoints every 2 steps: (run_dir, exit code, stderr)."""
    run_dir = tmp_path_factory.mktemp("nan") / "run"
    with pytest.MonkeyPatch.context() as mp:
        _poison_from(mp, set(range(4, 100)))
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = train.main(tiny_overrides(run_dir, shared_cache, *FAST, "train.checkpoint_every=2",
                                             "train.max_nonfinite_steps=3"))
    return run_dir, code, err.getvalue()


def _lines(run_dir):
    def refuse(name):
        raise ValueError(f"{name} is not JSON")

    return [json.loads(l, parse_constant=refuse) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_the_run_stops_with_an_error_at_the_limit(diverged):
    run_dir, code, err = diverged
    assert code == 2
    assert "error: stopped at step 6: 3 updates in a row had a non-finite loss" in err, err[-2000:]
    assert not (run_dir / "summary.json").exists()


def test_each_skipped_update_is_counted_in_the_metrics_log(diverged):
    assert [r["nonfinite_skipped"] for r in _lines(diverged[0])] == [0, 0, 0, 1, 1, 1]


def test_the_metrics_log_stays_strict_json_with_null_for_the_nan_loss(diverged):
    assert [r["loss"] is None for r in _lines(diverged[0])] == [False] * 3 + [True] * 3


def test_no_checkpoint_is_written_once_the_limit_is_reached(diverged):
    run_dir = diverged[0]
    ckpt = Checkpointer(run_dir / "checkpoints", 2)
    assert ckpt.all_steps() == [2, 4] and ckpt.verify(4) is None
    ckpt.close()


def test_the_last_checkpoint_holds_the_last_finite_state(diverged, tmp_path, shared_cache):
    """Checkpoint 4 of the diverged run (steps 4 skipped) equals step 3 of a clean run."""
    clean = tmp_path / "clean"
    assert train.main(tiny_overrides(clean, shared_cache, *FAST, "train.checkpoint_every=3",
                                     "train.keep_checkpoints=3")) == 0
    got, want = saved(diverged[0], 4)["train"], saved(clean, 3)["train"]
    for x, y in zip(jax.tree.leaves((got["params"], got["opt_state"]["inner_state"])),
                    jax.tree.leaves((want["params"], want["opt_state"]["inner_state"]))):
        np.testing.assert_array_equal(x, y)


def test_a_run_with_a_few_non_finite_steps_finishes_and_reports_the_total(tmp_path, shared_cache, monkeypatch):
    _poison_from(monkeypatch, {2, 5})
    run_dir = tmp_path / "run"
    assert train.main(tiny_overrides(run_dir, shared_cache, *FAST)) == 0
    assert json.loads((run_dir / "summary.json").read_text())["nonfinite_skipped"] == 2
