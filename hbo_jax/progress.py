"""Progress of long loops: a tqdm bar on a terminal, plain periodic lines in a log.

A bar redraws itself with carriage returns; written to a redirected log, a few minutes of
training become hundreds of segments of one line. So `progress` gives a tqdm bar only
when stderr is a terminal (or a notebook's); otherwise the same calls (iteration,
`update`, `set_postfix`, `close`) log one line every `LINE_EVERY_S` seconds, and a last
line when a loop that logged before ends (or when `leave`). A loop that ends sooner logs
nothing: there was nothing to wait for (e.g. inputs whose digests are remembered, so
nothing is hashed).

Only the standard library and, when present, tqdm: `hbo_jax.data.fetch` runs without
anything installed.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Iterable

try:
    from tqdm.auto import tqdm
except ImportError:  # fetch in a bare venv: lines only
    tqdm = None

log = logging.getLogger("hbo_jax.progress")

LINE_EVERY_S = 30.0  # a log line at most this often per loop
_FORMAT = "{desc}: {n_fmt}/{total_fmt} ({percentage:.0f}%) [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
_FORMAT_NO_TOTAL = "{desc}: {n_fmt} [{elapsed}, {rate_fmt}{postfix}]"


def on_terminal() -> bool:
    """Whether stderr (where a bar draws) is a terminal, or a notebook's (a widget there)."""
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty()) or "ipykernel" in sys.modules


def progress(iterable: Iterable | None = None, *, desc: str, total: int | None = None, initial: int = 0,
             leave: bool = False, disable: bool = False, unit: str = "it", unit_scale: bool = False,
             delay: float = 0.0):
    """A tqdm bar on a terminal, else a `LogLines` with the same calls.

    Args:
        iterable: Iterated through, counting one per item (None: count with `update`).
        desc: What the loop does ("tokenizing").
        total: The count at the end (default: `len(iterable)` when it has one).
        initial: The count already done (a resumed run).
        leave: Keep the finished bar (terminal) or always log a last line (log).
        disable: Show nothing (e.g. on every process but the first).
        unit: The unit counted; with `unit_scale`, counts get k/M/G prefixes (bytes).
        delay: On a terminal, no bar for a loop that ends within these seconds.
    """
    if tqdm is not None and on_terminal():
        return tqdm(iterable, desc=desc, total=total, initial=initial, leave=leave, disable=disable, unit=unit,
                    unit_scale=unit_scale, delay=delay)
    return LogLines(iterable, desc=desc, total=total, initial=initial, leave=leave, disable=disable, unit=unit,
                    unit_scale=unit_scale)


class LogLines:
    """tqdm's calls, writing a log line every `LINE_EVERY_S` seconds instead of a bar."""

    def __init__(self, iterable: Iterable | None = None, *, desc: str, total: int | None = None, initial: int = 0,
                 leave: bool = False, disable: bool = False, unit: str = "it", unit_scale: bool = False):
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.iterable, self.desc, self.total, self.n, self.leave = iterable, desc, total, initial, leave
        self.disable, self.unit, self.unit_scale = disable, unit, unit_scale
        self.initial, self.postfix, self.lines, self.closed = initial, "", 0, False
        self.start = self.last = time.monotonic()

    def __iter__(self):
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= LINE_EVERY_S:
            self._line(now)

    def set_postfix(self, **fields) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in fields.items())

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.lines or self.leave:
                self._line(time.monotonic())

    def format(self, now: float | None = None) -> str:
        """The line for the count so far."""
        elapsed = (now or time.monotonic()) - self.start
        if tqdm is None:
            share = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
            return (f"{self.desc}: {self.n}{'/' + str(self.total) if self.total else ''}{share} "
                    f"[{elapsed:.0f}s{', ' + self.postfix if self.postfix else ''}]")
        return tqdm.format_meter(self.n, self.total, elapsed, prefix=self.desc, unit=self.unit,
                                 unit_scale=self.unit_scale, postfix=self.postfix or None, initial=self.initial,
                                 bar_format=_FORMAT if self.total else _FORMAT_NO_TOTAL)

    def _line(self, now: float) -> None:
        self.last = now
        if not self.disable:
            self.lines += 1
            log.info("%s", self.format(now))
