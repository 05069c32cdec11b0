"""Progress: a tqdm bar on a terminal, plain periodic log lines anywhere else."""

import logging
import re
from pathlib import Path

from tqdm.std import tqdm

from hbo_jax import progress as progress_mod
from hbo_jax.progress import LogLines, progress


def _lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "hbo_jax.progress"]


def test_off_a_terminal_a_loop_writes_plain_lines_not_a_bar(monkeypatch, caplog, capsys):
    monkeypatch.setattr(progress_mod, "on_terminal", lambda: False)
    monkeypatch.setattr(progress_mod, "LINE_EVERY_S", 0.0)  # a line at every step
    with caplog.at_level(logging.INFO, logger="hbo_jax.progress"):
        for _ in progress(range(3), desc="tokenizing"):
            pass
    lines = _lines(caplog)
    assert [re.match(r"tokenizing: (\d)/3 ", line).group(1) for line in lines] == ["1", "2", "3", "3"]
    assert "\r" not in capsys.readouterr().err + "".join(lines)


def test_off_a_terminal_a_quick_loop_writes_nothing(monkeypatch, caplog):
    # e.g. "hashing inputs" when every digest is remembered: nothing was waited for
    monkeypatch.setattr(progress_mod, "on_terminal", lambda: False)
    with caplog.at_level(logging.INFO, logger="hbo_jax.progress"):
        for _ in progress(range(3), desc="hashing inputs"):
            pass
    assert _lines(caplog) == []


def test_leave_writes_a_last_line_even_for_a_quick_loop(monkeypatch, caplog):
    monkeypatch.setattr(progress_mod, "on_terminal", lambda: False)
    with caplog.at_level(logging.INFO, logger="hbo_jax.progress"):
        bar = progress(desc="train [hbo]", total=4, initial=1, leave=True)
        bar.update(3)
        bar.set_postfix(loss="1.234")
        bar.close()
    assert len(_lines(caplog)) == 1 and _lines(caplog)[0].startswith("train [hbo]: 4/4 (100%)")
    assert _lines(caplog)[0].endswith("loss=1.234]")


def test_a_terminal_gets_a_tqdm_bar(monkeypatch):
    monkeypatch.setattr(progress_mod, "on_terminal", lambda: True)
    bar = progress(range(2), desc="x", disable=True)
    assert isinstance(bar, tqdm) and not isinstance(bar, LogLines)


def test_no_module_draws_its_own_bar():
    root = Path(progress_mod.__file__).parent
    users = [p.relative_to(root).as_posix() for p in root.rglob("*.py")
             if re.search(r"^\s*(from|import) tqdm", p.read_text(), re.M)]
    assert users == ["progress.py"]
