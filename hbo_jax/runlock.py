"""One run at a time per run directory: an advisory lock on `<run_dir>/.lock`.

Two training runs on one directory would interleave their logs and overwrite each
other's checkpoints. `python -m hbo_jax.train` therefore holds `fcntl.flock` on
`<run_dir>/.lock` for the whole run (process 0 only on several hosts) and writes who
holds it into the file: pid, host, start time and command. A second run stops at once
with a message naming the holder. The kernel drops a flock when its process dies, so a
crashed or killed run never blocks the next one; the file's content is then left
behind (a clean exit empties it) and the next run takes over with a warning.

On one host a free flock proves the recorded holder gone. flock may not span hosts on
every shared filesystem (NFS does; Lustre only when mounted with `-o flock`), so a
leftover record from another host (or any record where flock is not supported) is only
taken over once the holder has stopped refreshing the file: the holder touches it every
`HEARTBEAT_SECONDS`, and a record untouched for `STALE_SECONDS` is abandoned.

The file is never deleted: a run that unlinked it on exit could let a waiting process
lock the old inode while a third one locks a new file, and both would run.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import logging
import os
import shlex
import socket
import sys
import threading
import time
from pathlib import Path

import jax

from hbo_jax.distributed import any_process
from hbo_jax.errors import RunLocked

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"
HEARTBEAT_SECONDS = 60.0
STALE_SECONDS = 600.0  # ten missed heartbeats: generous for clock skew between NFS client and server
# flock on a filesystem that does not implement it
_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


def _pid_alive(pid) -> bool:
    """Whether a process with this pid exists on this host (signal 0 sends nothing)."""
    if not isinstance(pid, int) or pid <= 0:  # 0 / -1 would address groups of processes
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def describe(holder: dict) -> str:
    """`pid 123 on host h (started 2025-01-01T12:00:00, command: ...)` for messages."""
    if not holder:
        return "an unknown process (the lock file is empty or unreadable)"
    return (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} (started {holder.get('started', '?')}, "
            f"command: {holder.get('command', '?')})")


class RunLock:
    """The lock on one run directory; `with RunLock(run_dir):` holds it for the block.

    Args:
        run_dir: The run directory (created if missing).
        heartbeat: Seconds between refreshes of the lock file's modification time.
        stale_after: Seconds without a refresh after which a leftover record that may
            belong to a live process (another host) is taken over.
    """

    def __init__(self, run_dir: str | os.PathLike, heartbeat: float = HEARTBEAT_SECONDS,
                 stale_after: float = STALE_SECONDS):
        self.path = Path(run_dir) / LOCK_NAME
        self.heartbeat, self.stale_after = heartbeat, stale_after
        self._fd: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def read_holder(self) -> dict:
        """The record in the lock file ({} when empty or unreadable)."""
        try:
            text = self.path.read_text()
            return json.loads(text) if text.strip() else {}
        except (OSError, ValueError):
            return {}

    def acquire(self) -> "RunLock":
        """Takes the lock or raises `RunLocked` naming the holder; never waits."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            self._check_leftover(flocked=self._flock(fd))
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                  "command": shlex.join([os.path.basename(sys.executable), *sys.argv])}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        os.fsync(fd)
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="hbo-runlock-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _flock(self, fd: int) -> bool:
        """flock without waiting: True when taken, False when the filesystem has no flock."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            holder = self.read_holder()
            gone = holder.get("host") == socket.gethostname() and not _pid_alive(holder.get("pid"))
            hint = (" That process has exited but the lock is still held, probably by processes it started "
                    "(data workers), which should end shortly." if gone else "")
            raise RunLocked(f"{self.path.parent} is in use by another run: {describe(holder)}.{hint} Wait for it "
                            "to finish or stop it (SIGTERM saves a checkpoint), or use another run_dir") from None
        except OSError as e:
            if e.errno not in _UNSUPPORTED:
                raise
            log.warning("run lock: %s does not support flock (%s); relying on the holder record alone",
                        self.path, e.strerror)
            return False

    def _check_leftover(self, flocked: bool) -> None:
        """A record still in the file was left by a run that did not release the lock: take over or refuse."""
        holder = self.read_holder()
        if not holder:
            return
        alive = _pid_alive(holder.get("pid"))
        if holder.get("host") == socket.gethostname() and (flocked or not alive):
            # The kernel dropped the holder's flock: it exited without releasing (crash, SIGKILL).
            log.warning("run lock: taking over %s, left by %s, which %s", self.path, describe(holder),
                        "is no longer running" if not alive else "no longer holds it (its pid is reused)")
            return
        # Another host: flock may not reach across hosts, so only the heartbeat tells a dead
        # holder from a live one.
        age = time.time() - self.path.stat().st_mtime
        where = "another host" if holder.get("host") != socket.gethostname() else "a filesystem without flock"
        if age < self.stale_after:
            raise RunLocked(f"{self.path.parent} may be in use by {describe(holder)}: its lock record is from {where} "
                            f"and was refreshed {age:.0f}s ago, so that run may still be going. If it has ended, "
                            f"wait {self.stale_after - age:.0f}s (a record unrefreshed for {self.stale_after:.0f}s "
                            f"is taken over) or delete {self.path}")
        log.warning("run lock: taking over %s, left by %s on %s, not refreshed for %.0fs", self.path,
                    describe(holder), where, age)

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            try:
                os.utime(self.path)
            except OSError as e:  # a hiccup of a network filesystem must not kill the run
                log.warning("run lock: could not refresh %s: %s", self.path, e)

    def release(self) -> None:
        """Empties the record (a clean exit) and drops the lock; safe to call twice."""
        if self._fd is None:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            os.ftruncate(self._fd, 0)
        finally:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


class _Held:
    """What `hold` returns: the lock on process 0, a no-op elsewhere."""

    def __init__(self, lock: RunLock | None):
        self.lock = lock

    def __enter__(self):
        return self.lock

    def __exit__(self, *exc) -> None:
        if self.lock is not None:
            self.lock.release()


def hold(run_dir: str | os.PathLike) -> _Held:
    """Locks a run directory for a training run; use as `with hold(run_dir):`.

    Process 0 takes the lock; on several processes all of them learn whether it did (a
    collective), so every process stops together with `RunLocked` instead of the others
    waiting at their next collective.
    """
    lock, error = None, None
    if jax.process_index() == 0:
        try:
            lock = RunLock(run_dir).acquire()
        except RunLocked as e:
            error = e
    if any_process(error is not None):
        raise error or RunLocked(f"{run_dir} is in use by another run (process 0 found it locked)")
    return _Held(lock)
