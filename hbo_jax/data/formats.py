"""Reading user data: JSONL chat/instruction files -> normalised conversations.

Detected per row: OpenAI `messages`, ShareGPT `conversations`, Alpaca
`instruction/input/output` and plain `prompt/response`. Every problem is reported with
file and line: under the `error` policy it raises `DataError`, under `skip` the row is
counted in a `SkipReport` that the run prints, so counts in = counts out + skips.
"""

from __future__ import annotations

import collections
import gzip
import json
from dataclasses import dataclass, field
from pathlib import Path

Conversation = list[dict]  # [{"role": "system"|"user"|"assistant", "content": str}, ...]

_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system", "chatgpt": "assistant", "bing": "assistant"}
_ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """Bad input data; the message names the file and line."""


@dataclass
class SkipReport:
    """Counted skips, by reason, with the first few locations of each."""

    counts: collections.Counter = field(default_factory=collections.Counter)
    examples: dict = field(default_factory=dict)

    def add(self, reason: str, where: str) -> None:
        self.counts[reason] += 1
        self.examples.setdefault(reason, [])
        if len(self.examples[reason]) < 3:
            self.examples[reason].append(where)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def lines(self) -> list[str]:
        return [f"skipped {n} x {reason} (e.g. {', '.join(self.examples[reason])})"
                for reason, n in self.counts.most_common()]

    def to_dict(self) -> dict:
        return {"total": self.total, "by_reason": dict(self.counts), "examples": self.examples}


def to_conversation(row: dict) -> Conversation:
    """Normalises one row; raises ValueError with the reason if it cannot."""
    if not isinstance(row, dict):
        raise ValueError("row is not a JSON object")
    if "messages" in row:
        msgs = [{"role": m.get("role"), "content": m.get("content")} for m in row["messages"]]
    elif "conversations" in row:
        msgs = []
        for m in row["conversations"]:
            role = _SHAREGPT_ROLES.get(str(m.get("from", m.get("role", ""))).lower())
            msgs.append({"role": role, "content": m.get("value", m.get("content"))})
    elif "instruction" in row and "output" in row:
        prompt = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
        msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"]}]
    elif "prompt" in row and ("response" in row or "completion" in row):
        msgs = [{"role": "user", "content": row["prompt"]},
                {"role": "assistant", "content": row.get("response", row.get("completion"))}]
    else:
        raise ValueError(f"unknown format (keys {sorted(row)[:6]}); expected messages, "
                         "conversations, instruction/output or prompt/response")
    for m in msgs:
        if m["role"] not in _ROLES:
            raise ValueError(f"unknown or missing role {m['role']!r}")
        if not isinstance(m["content"], str):
            raise ValueError(f"message content is {type(m['content']).__name__}, not text")
    if not any(m["role"] == "assistant" and m["content"].strip() for m in msgs):
        raise ValueError("no assistant turn to train on")
    return msgs


def read_jsonl(path: str | Path, policy: str, report: SkipReport) -> list[Conversation]:
    """Reads a .jsonl or .jsonl.gz file of conversations under the given bad-input policy."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    opener = gzip.open if path.suffix == ".gz" else open
    out: list[Conversation] = []
    with opener(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
                out.append(to_conversation(row))
            except UnicodeDecodeError:
                _fail(policy, report, "non-UTF-8 bytes", where)
            except json.JSONDecodeError as e:
                _fail(policy, report, "malformed JSON", where, str(e))
            except ValueError as e:
                _fail(policy, report, str(e).split(" (")[0], where, str(e))
    return out


def _fail(policy: str, report: SkipReport, reason: str, where: str, detail: str = "") -> None:
    if policy == "error":
        raise DataError(f"{where}: {detail or reason} (set data.bad_input=skip to skip such rows)")
    report.add(reason, where)
