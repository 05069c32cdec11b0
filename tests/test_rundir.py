"""A run that fails before training leaves its run directory as it found it."""

import os

import pytest

from hbo_jax import train
from hbo_jax.errors import DataError
from hbo_jax.rundir import UntilTraining
from hbo_jax.runlock import RunLock

from conftest import tiny_overrides


def test_bad_input_leaves_nothing_behind_and_the_directory_is_fresh_again(tmp_path, monkeypatch):
    def bad_input(*args, **kwargs):
        raise DataError("data.source_dir=x: a.jsonl:2: malformed JSON")

    monkeypatch.setattr(train, "prepare", bad_input)  # fails where the data is prepared, after config.yaml
    run_dir = tmp_path / "runs" / "x"
    assert train.main(tiny_overrides(run_dir, tmp_path / "cache")) == 2
    assert os.listdir(run_dir) == [".lock"]  # the lock file is never deleted; it is empty
    lock = RunLock(run_dir)
    assert lock.read_holder() == {}
    lock.acquire().release()  # the next run takes it without a leftover to take over


def test_only_what_the_run_added_is_removed(tmp_path):
    (tmp_path / "kept.txt").write_text("from an earlier run")
    with pytest.raises(RuntimeError), UntilTraining(tmp_path):
        (tmp_path / "config.yaml").write_text("x: 1")
        (tmp_path / "checkpoints").mkdir()
        raise RuntimeError("bad input")
    assert sorted(os.listdir(tmp_path)) == ["kept.txt"]


def test_nothing_is_removed_once_training_started(tmp_path):
    with pytest.raises(RuntimeError), UntilTraining(tmp_path) as guard:
        (tmp_path / "metrics.jsonl").write_text("{}\n")
        guard.training()
        raise RuntimeError("diverged")
    assert os.listdir(tmp_path) == ["metrics.jsonl"]
