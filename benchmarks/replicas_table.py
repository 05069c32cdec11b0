"""The table of `docs/results.md`: single data-order replicas against their merges.

    python benchmarks/replicas_table.py RUNS/demo RUNS/uniform

Reads `eval_r<i>.json` (each replica's checkpoint) and `eval_merged_*.json` (written by
`python -m hbo_jax.evaluate ... --out`) in each directory and prints one markdown row per
model: macro-averaged held-out loss and task metrics; the single runs as mean +- sample
standard deviation and their range.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

KEYS = (("loss", "held-out loss"), ("acc", "mc acc"), ("exact_match", "exact match"))


def _macro(path: Path) -> dict:
    return json.loads(path.read_text())["eval"]["macro_avg"]


def rows(d: Path) -> list[str]:
    singles = [_macro(p) for p in sorted(d.glob("eval_r*.json"))]
    out = []
    cells = []
    for key, _ in KEYS:
        vals = [s[key] for s in singles if key in s]
        cells.append(f"{statistics.mean(vals):.4f} ± {statistics.stdev(vals):.4f} ({min(vals):.4f}–{max(vals):.4f})"
                     if len(vals) > 1 else "-")
    out.append(f"| {d.name} | {len(singles)} single runs | " + " | ".join(cells) + " |")
    for name in ("merged_average", "merged_select", "merged_select_resample"):
        p = d / f"eval_{name}.json"
        if p.is_file():
            m = _macro(p)
            out.append(f"| {d.name} | {name.removeprefix('merged_').replace('_', ' + ')} | "
                       + " | ".join(f"{m[k]:.4f}" if k in m else "-" for k, _ in KEYS) + " |")
    return out


def main() -> None:
    print("| strategy | model | " + " | ".join(h for _, h in KEYS) + " |")
    print("|---|---|" + "---|" * len(KEYS))
    for d in sys.argv[1:]:
        print("\n".join(rows(Path(d))))


if __name__ == "__main__":
    main()
