"""The run directory's JSON records: strict JSON, and JSONL logs that survive a torn line.

Python's `json.dumps` writes a non-finite float as the bare word `NaN` or `Infinity`,
which is not JSON: jq, JavaScript and most other readers refuse the whole file. Every
record a run writes goes through `dumps`, which writes such a value as `null`.

A run killed (or out of disk) in the middle of an append leaves a torn last line in a
JSONL log. `JsonlWriter.truncate`, called when a run resumes, drops it with a warning
instead of failing on it.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def finite(obj: Any) -> Any:
    """A copy of a JSON-able tree with every NaN / +-inf float replaced by None."""
    if isinstance(obj, float):  # numpy float64 included (a float subclass)
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def dumps(obj: Any, **kwargs) -> str:
    """`json.dumps` that writes non-finite floats as null (and so always writes valid JSON)."""
    return json.dumps(finite(obj), allow_nan=False, **kwargs)


def _step_of(line: str) -> int | None:
    """The record's step, or None for a line that is not a whole record."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    step = record.get("step") if isinstance(record, dict) else None
    return step if isinstance(step, int) else None


def truncate_after(path: Path, step: int) -> None:
    """Drops the records of a JSONL log whose step is after `step` (a run resuming from it
    writes them again).

    A line that does not parse is dropped with a warning: as the last line it is an
    append cut short (a crash, a full disk); anywhere else the file was damaged, and
    the warning names the line. The file is replaced in one rename.
    """
    if not path.is_file():
        return
    lines = path.read_bytes().decode("utf-8", errors="replace").splitlines()
    kept = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        s = _step_of(line)
        if s is None:
            what = ("the torn last line (an append cut short by a crash or a full disk)" if i == len(lines)
                    else f"unreadable line {i} of {len(lines)} (the file was damaged)")
            log.warning("%s: dropping %s: %.80r", path, what, line)
        elif s <= step:
            kept.append(line + "\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


class JsonlWriter:
    """Appends JSON lines; only process 0 writes."""

    def __init__(self, path: Path):
        import jax  # here: the report reads records without importing JAX

        self.path = path
        self.enabled = jax.process_index() == 0

    def truncate(self, step: int) -> None:
        """Drops records after `step` (written after the checkpoint a run resumes from)."""
        if self.enabled:
            truncate_after(self.path, step)

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(dumps(record) + "\n")
