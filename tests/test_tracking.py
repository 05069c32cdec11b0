"""Trackers: TensorBoard events read back from disk; metric names of the log records."""

import struct
import sys
from pathlib import Path

import pytest

from hbo_jax.config import TrackingConfig
from hbo_jax.tracking import Tracker, eval_scalars, metrics_scalars, mixing_scalars

NAMES = ["chat", "math"]


def read_events(tb_dir: Path) -> dict[tuple[str, int], float]:
    """{(tag, step): value} of every scalar in the TFRecord event files under tb_dir."""
    from tensorboardX.proto.event_pb2 import Event

    out = {}
    for path in sorted(tb_dir.glob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = Event.FromString(data[pos + 12:pos + 12 + length])  # 8 length + 4 crc
            pos += 12 + length + 4
            for v in event.summary.value:
                out[(v.tag, event.step)] = v.simple_value
    return out


def test_tensorboard_events_hold_logged_tags_and_values(tmp_path):
    tracker = Tracker(TrackingConfig(), tmp_path)
    tracker.log(1, {"loss": 2.5, "loss/chat": 3.25})
    tracker.log(2, {"loss": 2.0, "p_global/math": 0.75})
    tracker.close()
    events = read_events(tmp_path / "tb")
    assert events == {("loss", 1): 2.5, ("loss/chat", 1): 3.25, ("loss", 2): 2.0, ("p_global/math", 2): 0.75}


def test_non_numeric_values_are_not_logged(tmp_path):
    tracker = Tracker(TrackingConfig(), tmp_path)
    tracker.log(3, {"loss": 1.5, "note": "text", "drawn": [[1, 2]], "flag": True, "none": None})
    tracker.close()
    assert set(read_events(tmp_path / "tb")) == {("loss", 3)}


def test_tensorboard_off_writes_no_events(tmp_path):
    tracker = Tracker(TrackingConfig(tensorboard=False), tmp_path)
    tracker.log(1, {"loss": 1.0})
    assert not tracker.active
    tracker.close()
    assert not (tmp_path / "tb").exists()


def test_mixing_scalars_names_and_values():
    record = {"step": 10, "from_step": 10, "p_global": [0.25, 0.75], "p_local": [[0.5, 0.5], [0.125, 0.875]],
              "reward_global": [1.5, 2.5], "reward_local": [[0.1, -0.1], [0.2, -0.2]], "seconds": 0.5}
    assert mixing_scalars(record, NAMES) == {
        "p_global/chat": 0.25, "p_global/math": 0.75,
        "p_local/chat/b1": 0.5, "p_local/chat/b2": 0.5, "p_local/math/b1": 0.125, "p_local/math/b2": 0.875,
        "reward/global/chat": 1.5, "reward/global/math": 2.5,
        "reward/local/chat/b1": 0.1, "reward/local/chat/b2": -0.1,
        "reward/local/math/b1": 0.2, "reward/local/math/b2": -0.2, "mixing/seconds": 0.5}


def test_replayed_mixing_record_has_only_probabilities():
    record = {"step": 5, "from_step": 5, "replayed": True, "p_global": [0.5, 0.5], "p_local": [[1.0], [1.0]]}
    assert sorted(mixing_scalars(record, NAMES)) == ["p_global/chat", "p_global/math", "p_local/chat/b1",
                                                     "p_local/math/b1"]


def test_eval_scalars_names_and_values():
    ev = {"chat": {"loss": 2.0, "ppl": 7.5, "examples": 4, "bucket_loss": [1.0, 3.0]},
          "math": {"loss": 1.0, "ppl": 2.5, "examples": 4, "acc": 0.5, "metric": "mc"},
          "macro_avg": {"loss": 1.5, "ppl": 4.5, "acc": 0.5}}
    assert eval_scalars(ev) == {
        "eval/loss/chat": 2.0, "eval/ppl/chat": 7.5, "eval/bucket_loss/chat/b1": 1.0, "eval/bucket_loss/chat/b2": 3.0,
        "eval/loss/math": 1.0, "eval/ppl/math": 2.5, "eval/acc/math": 0.5,
        "eval/loss/macro_avg": 1.5, "eval/ppl/macro_avg": 4.5, "eval/acc/macro_avg": 0.5}


def test_metrics_scalars_keep_names_and_sum_drawn_per_subset():
    rec = {"step": 10, "loss": 2.0, "loss/chat": 3.0, "examples": 16, "drawn": [[3, 5], [8, 0]]}
    assert metrics_scalars(rec, NAMES) == {"loss": 2.0, "loss/chat": 3.0, "examples": 16.0,
                                           "drawn/chat": 8.0, "drawn/math": 8.0}


def test_wandb_missing_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(ImportError, match="pip install wandb"):
        Tracker(TrackingConfig(tensorboard=False, wandb_project="hbo"), tmp_path)


def test_wandb_offline_run_logs(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    tracker = Tracker(TrackingConfig(tensorboard=False, wandb_project="hbo", wandb_mode="offline"), tmp_path,
                      config={"train": {"steps": 2}})
    tracker.log(1, {"loss": 2.0})
    tracker.log(2, {"loss": 1.0, "eval/loss/chat": 1.5})
    tracker.close()
    assert list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert (tmp_path / "wandb_run_id.txt").read_text()
