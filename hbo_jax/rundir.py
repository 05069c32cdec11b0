"""A run that fails before training leaves its run directory as it found it.

Bad input (a data error, a batch size the mesh cannot split) is found after the run
directory is locked and its `config.yaml` written, while the data is prepared. Without
this, the directory would keep a `config.yaml` and an empty `checkpoints/` that look like
a run (to `report`, to the user) but hold nothing. `UntilTraining` notes what the
directory held before the run and, if the run raises before its first step, removes
what the run added. The lock file stays: a lock file is never deleted
(`hbo_jax.runlock`), and it is empty after the run. A directory with only that file is a
fresh run directory to the next run.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import jax

from hbo_jax.runlock import LOCK_NAME

log = logging.getLogger(__name__)


def _entries(path: Path) -> set[str]:
    try:
        return set(os.listdir(path))
    except FileNotFoundError:
        return set()


class UntilTraining:
    """`with UntilTraining(run_dir) as guard:` ... `guard.training()` once the first step may run.

    An exception that leaves the block before `training()` removes every entry of the
    run directory that was not there when the guard was made (process 0 only: the one
    that writes there). Make the guard before the lock is taken, so a run directory
    the run created counts as new.
    """

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.before = _entries(self.run_dir)
        self.started = False

    def training(self) -> None:
        """From here on, what the run wrote is kept (a checkpoint may follow; logs are resumed)."""
        self.started = True

    def __enter__(self) -> "UntilTraining":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None or self.started or jax.process_index() != 0:
            return
        added = sorted(_entries(self.run_dir) - self.before - {LOCK_NAME})
        for name in added:
            path = self.run_dir / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        if added:
            log.info("the run failed before training: removed what it had written in %s (%s)", self.run_dir,
                     ", ".join(added))
