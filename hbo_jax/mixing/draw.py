"""`python -m hbo_jax.mixing.draw --run DIR --total N --out DIR`: a fixed-size training set from learned weights.

What the reference does after ScaleBiO: take floor(N * p_i) examples of each subset i,
drawn without replacement (seeded), and fine-tune on them. The weights are the run's
`scalebio_weights.json` (or any schedule file given with `--weights`: its last entry's
p_global). Rows are copied as they are in the subset's training inputs, so the output
directory is a mixture of its own: `<subset>.train.jsonl` per subset (plus the subset's
eval rows as `<subset>.eval.jsonl`), usable as `data.source_dir`; `draw.json` records
what was drawn.

Inside a subset the rows are drawn uniformly. A run with `scalebio.local_actors` also
learned p_local over difficulty buckets: the draw does not apply it (the buckets belong
to the prepared data, not to the rows of the inputs) and warns; replaying the run's
schedule (`mixing.strategy=replay`) trains with both.

The validation set is left out unless `--include-validation` is given (the reference
appends it by default, which trains on the data the weights were chosen with); it then
becomes one more subset, `validation`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path

import numpy as np

from hbo_jax.cli import USER_ERRORS, setup_logging
from hbo_jax.config import load_config
from hbo_jax.data.formats import iter_rows, to_conversation
from hbo_jax.data.prepare import mixture
from hbo_jax.data.sources import EVAL_SPLITS, BadRow, expand
from hbo_jax.errors import ConfigError
from hbo_jax.rng import Stream, generator

log = logging.getLogger("hbo_jax")

VALIDATION = "validation"


def usable_rows(sources, fmt: str) -> list[dict]:
    """The rows of the inputs that training would use (parseable, in a known row format), in order."""
    out = []
    for src in sources:
        for _, row in iter_rows(src):
            if isinstance(row, BadRow):
                continue
            try:
                to_conversation(row, fmt)
            except ValueError:
                continue
            out.append(row)
    return out


def read_weights(path: Path, names: list[str]) -> np.ndarray:
    """p_global of the last entry of a schedule file, checked against the mixture's subsets."""
    if not path.is_file():
        raise ConfigError(f"--weights {path}: not found (a ScaleBiO run writes scalebio_weights.json)")
    data = json.loads(path.read_text())
    if data["subsets"] != names:
        raise ConfigError(f"{path}: subsets {data['subsets']} differ from the run's mixture {names}")
    return np.asarray(data["entries"][-1]["p_global"], np.float64)


def _write(path: Path, rows: list[dict]) -> None:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _validation_rows(cfg, subsets) -> list[dict]:
    sc = cfg.scalebio
    if sc.validation_subsets:
        by_name = {s.name: s for s in subsets}
        return [r for name in sc.validation_subsets for r in usable_rows(by_name[name].eval, by_name[name].format)]
    return usable_rows(expand(list(sc.validation_files), "scalebio.validation_files", EVAL_SPLITS),
                       sc.validation_format)


def draw(run: Path, total: int, out: Path, seed: int = 42, include_validation: bool = False,
         weights: Path | None = None) -> dict:
    """Writes the drawn set to `out`; returns what `draw.json` records."""
    cfg = load_config(run / "config.yaml")
    subsets = mixture(cfg)
    names = [s.name for s in subsets]
    p = read_weights(weights or run / "scalebio_weights.json", names)
    if include_validation and VALIDATION in names:
        raise ConfigError(f"--include-validation: the mixture already has a subset named {VALIDATION!r}")
    if cfg.scalebio.local_actors:
        log.warning("%s learned p_local (scalebio.local_actors=true), which the draw does not apply: it takes rows "
                    "uniformly inside each subset. To train with p_local too, replay the run's schedule: "
                    "mixing.strategy=replay mixing.replay_from=%s", run, weights or run / "scalebio_weights.json")
    out.mkdir(parents=True, exist_ok=True)
    record = {"run": str(run), "total": total, "seed": seed, "weights": dict(zip(names, p.tolist())),
              "p_local_applied": False, "include_validation": include_validation, "drawn": {}, "available": {}}
    for i, s in enumerate(subsets):
        rows = usable_rows(s.train, s.format)
        want = math.floor(total * p[i])
        k = min(want, len(rows))  # without replacement: at most every row once
        if k < want:
            log.warning("subset %r: %d rows wanted, %d available: took all of them", s.name, want, len(rows))
        pick = generator(seed, Stream.DRAW, i).choice(len(rows), size=k, replace=False)
        _write(out / f"{s.name}.train.jsonl", [rows[j] for j in pick])
        if s.eval:
            _write(out / f"{s.name}.eval.jsonl", usable_rows(s.eval, s.format))
        record["drawn"][s.name], record["available"][s.name] = k, len(rows)
    if include_validation:
        rows = _validation_rows(cfg, subsets)
        _write(out / f"{VALIDATION}.train.jsonl", rows)
        record["drawn"][VALIDATION] = len(rows)
    (out / "draw.json").write_text(json.dumps(record, indent=1))
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hbo_jax.mixing.draw", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a ScaleBiO run directory")
    parser.add_argument("--total", type=int, required=True, help="examples to draw in all (N)")
    parser.add_argument("--out", type=Path, required=True, help="directory for <subset>.train.jsonl files")
    parser.add_argument("--seed", type=int, default=42, help="seed of the draw (the reference's 42)")
    parser.add_argument("--weights", type=Path, help="a schedule file (default: RUN/scalebio_weights.json)")
    parser.add_argument("--include-validation", action="store_true",
                        help="append the validation set as a subset 'validation' (the reference does by default)")
    args = parser.parse_args(argv)
    setup_logging()
    if args.total <= 0:
        print(f"error: --total={args.total} must be > 0", file=sys.stderr)
        return 2
    try:
        record = draw(args.run, args.total, args.out, args.seed, args.include_validation, args.weights)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(", ".join(f"{n} {k}" for n, k in record["drawn"].items()) + f" -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
