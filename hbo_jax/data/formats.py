"""Reading user data: rows of chat/instruction data -> normalised conversations.

Row formats, detected per row (`auto`) or forced per subset (`data.subsets.<name>.format`):
OpenAI `messages`, ShareGPT `conversations`, Alpaca `instruction/input/output` and plain
`prompt/response` (or `prompt/completion`). Rows come from `iter_rows`, which reads JSONL
(`.jsonl`, `.jsonl.gz`) here and Parquet files, Hugging Face `save_to_disk` directories
and TFDS ArrayRecord datasets through `hbo_jax.data.sources`.

Every problem is reported with file and row: under the `error` policy it raises
`DataError`, under `skip` the row is counted in a `SkipReport` that the run prints, so
counts in = counts out + skips. Extra row fields (e.g. `options` of an eval row) are
passed through untouched by `iter_rows`.
"""

from __future__ import annotations

import collections
import gzip
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from hbo_jax.config import DATA_FORMATS as FORMATS  # what data.subsets.<name>.format takes
from hbo_jax.data import sources
from hbo_jax.data.sources import BadRow
from hbo_jax.errors import DataError

Conversation = list[dict]  # [{"role": "system"|"user"|"assistant", "content": str}, ...]

_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system", "chatgpt": "assistant", "bing": "assistant"}
_ROLES = ("system", "user", "assistant")


FIRST_POSITIONS = 3  # positions kept per skip reason: enough to find the rows, short enough to log


@dataclass
class SkipReport:
    """Skipped rows counted by reason, with the positions of the first few of each reason.

    A position is the string a `data.bad_input=error` message starts with: `file:line`
    for JSONL (lines from 1), `file[row]` for Parquet, `datasets` and TFDS inputs (rows
    from 0). `to_dict` is the manifest's `skipped` entry (`examples`: reason -> positions).
    """

    counts: collections.Counter = field(default_factory=collections.Counter)
    examples: dict = field(default_factory=dict)

    def add(self, reason: str, where: str) -> None:
        self.counts[reason] += 1
        self.examples.setdefault(reason, [])
        if len(self.examples[reason]) < FIRST_POSITIONS:
            self.examples[reason].append(where)

    def merge(self, other: "SkipReport") -> None:
        """Adds another report's counts; its positions come after this report's."""
        for reason, n in other.counts.items():
            self.counts[reason] += n
            kept = self.examples.setdefault(reason, [])
            kept += other.examples.get(reason, [])[: FIRST_POSITIONS - len(kept)]

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def lines(self) -> list[str]:
        """One line per reason, most frequent first: `2 x malformed JSON (at a.jsonl:3, a.jsonl:9)`."""
        out = []
        for reason, n in self.counts.most_common():
            where = self.examples.get(reason, [])
            out.append(f"{n} x {reason} ({'first at' if n > len(where) else 'at'} {', '.join(where)})")
        return out

    def to_dict(self) -> dict:
        return {"total": self.total, "by_reason": dict(self.counts), "examples": self.examples}

    @classmethod
    def from_dict(cls, d: dict) -> "SkipReport":
        """The report a manifest's `skipped` entry was written from."""
        return cls(collections.Counter(d.get("by_reason", {})), {k: list(v) for k, v in d.get("examples", {}).items()})


def detect_format(row: dict) -> str | None:
    """The row format a row's keys indicate, or None."""
    if "messages" in row:
        return "messages"
    if "conversations" in row:
        return "sharegpt"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if "prompt" in row and ("response" in row or "completion" in row):
        return "prompt_response"
    return None


def _fits(row: dict, fmt: str) -> bool:
    # A forced format only asks for its own keys: a row may carry others (ids, options).
    return {"messages": "messages" in row, "sharegpt": "conversations" in row,
            "alpaca": "instruction" in row and "output" in row,
            "prompt_response": "prompt" in row and ("response" in row or "completion" in row)}[fmt]


def to_conversation(row: dict, fmt: str = "auto") -> Conversation:
    """Normalises one row; raises ValueError with the reason if it cannot.

    Args:
        row: One parsed row (a dict).
        fmt: `auto` (detect per row) or one of `FORMATS`, which the row must fit.
    """
    if not isinstance(row, dict):
        raise ValueError("row is not a JSON object")
    if fmt == "auto":
        fmt = detect_format(row)
        if fmt is None:
            raise ValueError(f"unknown format (keys {sorted(row)[:6]}); expected messages, "
                             "conversations, instruction/output or prompt/response")
    elif fmt not in FORMATS:
        raise ValueError(f"unknown data format {fmt!r}; expected one of {list(FORMATS)}")
    elif not _fits(row, fmt):
        raise ValueError(f"row does not fit format={fmt} (keys {sorted(row)[:6]})")
    if fmt == "messages":
        msgs = [{"role": m.get("role"), "content": m.get("content")} for m in _turns(row["messages"])]
    elif fmt == "sharegpt":
        msgs = []
        for m in _turns(row["conversations"]):
            role = _SHAREGPT_ROLES.get(str(m.get("from", m.get("role", ""))).lower())
            msgs.append({"role": role, "content": m.get("value", m.get("content"))})
    elif fmt == "alpaca":
        if not isinstance(row["instruction"], str) or not isinstance(row.get("input") or "", str):
            raise ValueError("instruction/input is not text")
        prompt = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
        msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"]}]
    else:
        msgs = [{"role": "user", "content": row["prompt"]},
                {"role": "assistant", "content": row.get("response", row.get("completion"))}]
    for m in msgs:
        if m["role"] not in _ROLES:
            raise ValueError(f"unknown or missing role {m['role']!r}")
        if not isinstance(m["content"], str):
            raise ValueError(f"message content is {type(m['content']).__name__}, not text")
    if not any(m["role"] == "assistant" and m["content"].strip() for m in msgs):
        raise ValueError("no assistant turn to train on")
    return msgs


def _turns(value) -> list[dict]:
    if not isinstance(value, list) or not all(isinstance(m, dict) for m in value):
        raise ValueError(f"turns are {type(value).__name__}, not a list of objects")
    return value


def _jsonl_rows(path: Path) -> Iterator[tuple[str, dict | BadRow]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                yield where, json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                yield where, BadRow("non-UTF-8 bytes")
            except json.JSONDecodeError as e:
                yield where, BadRow("malformed JSON", str(e))


def iter_rows(source, kind: str | None = None) -> Iterator[tuple[str, dict | BadRow]]:
    """(where, row) for every row of one input, in order; unparseable rows come as `BadRow`.

    Args:
        source: A path or spec string (`path`, `dir#split`, `tfds:name#split`, see
            `hbo_jax.data.sources`) or a resolved `sources.Source`.
        kind: Force the reader (`jsonl`); default: from the file name or directory.

    `where` names the file and line (JSONL, `file:12`) or row index (`file[11]`).
    """
    src = source if isinstance(source, sources.Source) else sources.Source.parse(str(source), kind=kind)
    if src.kind == "jsonl":
        if not src.path.is_file():
            raise DataError(f"{src.path}: {sources.missing_reason(src.path)}")
        yield from _jsonl_rows(src.path)
    else:
        yield from sources.table_rows(src)


def iter_conversations(source, policy: str, report: SkipReport, fmt: str = "auto",
                       kind: str | None = None) -> Iterator[tuple[str, Conversation]]:
    """(where, conversation) for every usable row; bad rows raise or are counted (`policy`)."""
    for where, row in iter_rows(source, kind):
        if isinstance(row, BadRow):
            _fail(policy, report, row.reason, where, row.detail)
            continue
        try:
            yield where, to_conversation(row, fmt)
        except ValueError as e:
            _fail(policy, report, str(e).split(" (")[0], where, str(e))


def read_conversations(source, policy: str, report: SkipReport, fmt: str = "auto") -> list[Conversation]:
    """All usable conversations of one input under the given bad-input policy."""
    return [c for _, c in iter_conversations(source, policy, report, fmt)]


def _fail(policy: str, report: SkipReport, reason: str, where: str, detail: str = "") -> None:
    if policy == "error":
        raise DataError(f"{where}: {detail or reason} (set data.bad_input=skip to skip such rows)")
    report.add(reason, where)
