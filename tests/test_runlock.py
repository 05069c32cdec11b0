"""One run per run directory: a second run is refused at once, a dead run's lock is taken over."""

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hbo_jax import train
from hbo_jax.data.formats import DataError
from hbo_jax.distributed import StopRequest
from hbo_jax.runlock import LOCK_NAME, STALE_SECONDS, RunLock, RunLocked

from conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[1]
_HOLD = """
import sys, time
from hbo_jax.runlock import RunLock
RunLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(300)
"""


@pytest.fixture
def holder(tmp_path):
    """A child process holding the lock on tmp_path/run (killed at the end)."""
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(run_dir), "--marker-arg"], env=env,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        yield run_dir, proc
    finally:
        proc.kill()
        proc.wait()


def test_a_second_run_stops_before_any_data_work_naming_the_holder(holder, tmp_path, capsys):
    run_dir, proc = holder
    cache = tmp_path / "fresh_cache"
    assert train.main(tiny_overrides(run_dir, cache)) == 2
    err = capsys.readouterr().err
    assert f"pid {proc.pid} on host {socket.gethostname()}" in err and "--marker-arg" in err, err
    assert not cache.exists()  # nothing was prepared


def test_the_lock_of_a_killed_run_is_taken_over_with_a_warning(holder, caplog):
    run_dir, proc = holder
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with caplog.at_level(logging.WARNING, logger="hbo_jax.runlock"), RunLock(run_dir) as lock:
        assert lock.read_holder()["pid"] == os.getpid()
    assert f"pid {proc.pid}" in caplog.text and "no longer running" in caplog.text


def _leave_record(run_dir: Path, host: str, age: float) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    path.write_text(json.dumps({"pid": 1, "host": host, "started": "then", "command": "train"}))
    os.utime(path, (time.time() - age,) * 2)


def test_a_fresh_record_from_another_host_is_refused(tmp_path):
    _leave_record(tmp_path, "other-host.example", age=5)
    with pytest.raises(RunLocked, match="pid 1 on host other-host.example"):
        RunLock(tmp_path).acquire()


def test_a_record_from_another_host_no_longer_refreshed_is_taken_over(tmp_path, caplog):
    _leave_record(tmp_path, "other-host.example", age=STALE_SECONDS + 60)
    with caplog.at_level(logging.WARNING, logger="hbo_jax.runlock"), RunLock(tmp_path):
        pass
    assert "other-host.example" in caplog.text and "not refreshed" in caplog.text


def test_the_holder_keeps_its_record_fresh(tmp_path):
    with RunLock(tmp_path, heartbeat=0.05) as lock:
        os.utime(lock.path, (time.time() - 1000,) * 2)
        time.sleep(0.3)
        assert time.time() - lock.path.stat().st_mtime < 10


def test_a_clean_release_leaves_no_record(tmp_path):
    with RunLock(tmp_path) as lock:
        assert lock.read_holder()["pid"] == os.getpid()
    assert (tmp_path / LOCK_NAME).read_text() == ""


def test_the_lock_is_released_when_the_run_fails(tmp_path, shared_cache, monkeypatch):
    def fail(*args, **kwargs):
        raise DataError("broken data")

    monkeypatch.setattr(train, "prepare", fail)
    run_dir = tmp_path / "run"
    assert train.main(tiny_overrides(run_dir, shared_cache)) == 2
    with RunLock(run_dir):  # would raise RunLocked if the failed run still held it
        pass


def test_the_lock_is_released_on_the_signal_stop_path(tmp_path, shared_cache):
    from hbo_jax.config import load_config

    run_dir = tmp_path / "run"
    stop = StopRequest()
    stop.signal_name = "SIGTERM"  # as if signalled while the data was prepared
    cfg = load_config(overrides=tiny_overrides(run_dir, shared_cache, "eval.tasks=false", "eval.every=0",
                                               "tracking.tensorboard=false"))
    assert train.run(cfg, stop) == {"stopped": "SIGTERM", "step": 0}
    with RunLock(run_dir):
        pass
