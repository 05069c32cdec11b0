"""Regenerates tests/fixtures/mixture: a small slice of the embedded mixture.

Usage: python scripts/make_fixture.py [--cache DIR]

Takes the first rows (in the embedded build's deterministic order) of five subsets,
with imbalanced sizes so tests see a mixture whose largest subset is 6x its smallest,
and copies the NOTICE. Long prompts are cut to keep the fixture small; the tests
truncate to a short sequence length anyway.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import os
from hbo_jax.data import embedded

OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "mixture"
# subset: (train rows, eval rows)
ROWS = {"chat": (48, 8), "arithmetic": (32, 8), "medical_sentiment": (24, 8),
        "hindi_qa": (12, 6), "proverbs_sw": (8, 6)}
MAX_CHARS = 600


def _shorten(row: dict) -> dict:
    for m in row["messages"]:
        if m["role"] != "assistant" and len(m["content"]) > MAX_CHARS:
            m["content"] = m["content"][-MAX_CHARS:]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", default=None, help="cache directory (default: $HBO_JAX_CACHE or ~/.cache/hbo_jax)")
    args = ap.parse_args()
    cache = args.cache or os.environ.get("HBO_JAX_CACHE") or "~/.cache/hbo_jax"
    src = embedded.build(Path(cache).expanduser())
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    for name, (n_train, n_eval) in ROWS.items():
        for split, n in (("train", n_train), ("eval", n_eval)):
            lines = (src / f"{name}.{split}.jsonl").read_text(encoding="utf-8").splitlines()[:n]
            rows = [json.dumps(_shorten(json.loads(l)), ensure_ascii=False) for l in lines]
            (OUT / f"{name}.{split}.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    (OUT / "NOTICE").write_text("Slice of the hbo_jax embedded mixture (scripts/make_fixture.py).\n\n"
                                + (src / "NOTICE").read_text())
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
