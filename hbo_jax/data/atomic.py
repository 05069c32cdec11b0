"""Cache directories built under a private name and published with one rename.

Two processes (two runs, or a run and a test) may build the same cache entry at once:
each writes its own `<name>.tmp-<pid>` directory, and the first rename wins; the
loser's copy, identical by construction of the cache key, is discarded.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def private_tmp(final: Path) -> Path:
    """An empty directory next to `final`, private to this process."""
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    return tmp


def publish(tmp: Path, final: Path) -> Path:
    """Renames `tmp` to `final`; if another process published first, keeps theirs."""
    try:
        tmp.rename(final)
    except OSError:
        if not final.exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return final
