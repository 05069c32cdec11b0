"""The table of `docs/results.md`: single data-order replicas against their merges.

    python benchmarks/replicas_table.py RUNS/demo RUNS/uniform

Reads each replica's own final evaluation (`r<i>/eval.json`, "after"; its "before" is
the starting model) and `eval_merged_*.json` (written by `python -m hbo_jax.evaluate ...
--out`) in each directory and prints one markdown row per model: macro-averaged held-out
loss and task metrics; the single runs as mean +- sample standard deviation (range).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

KEYS = (("loss", "held-out loss"), ("acc", "mc acc"), ("exact_match", "exact match"))


def _macro(path: Path, key: str = "eval") -> dict:
    return json.loads(path.read_text())[key]["macro_avg"]


def _row(d: Path, label: str, m: dict) -> str:
    return f"| {d.name} | {label} | " + " | ".join(f"{m[k]:.4f}" if k in m else "-" for k, _ in KEYS) + " |"


def rows(d: Path) -> list[str]:
    runs = sorted(d.glob("r[0-9]*/eval.json"))
    singles = [_macro(p, "after") for p in runs]
    out = [_row(d, "starting model", _macro(runs[0], "before"))]
    cells = []
    for key, _ in KEYS:
        vals = [s[key] for s in singles if key in s]
        cells.append(f"{statistics.mean(vals):.4f} ± {statistics.stdev(vals):.4f} ({min(vals):.4f}–{max(vals):.4f})"
                     if len(vals) > 1 else "-")
    out.append(f"| {d.name} | {len(singles)} single runs | " + " | ".join(cells) + " |")
    for p in sorted(d.glob("eval_merged_*.json"), key=lambda p: ("average" not in p.name, len(p.name), p.name)):
        label = p.stem.removeprefix("eval_merged_").replace("_atol", " --atol ").replace("_", " + ")
        out.append(_row(d, "merge: " + label, _macro(p)))
    return out


def main() -> None:
    print("| strategy | model | " + " | ".join(h for _, h in KEYS) + " |")
    print("|---|---|" + "---|" * len(KEYS))
    for d in sys.argv[1:]:
        print("\n".join(rows(Path(d))))


if __name__ == "__main__":
    main()
