"""`python -m hbo_jax.mixing.draw --run DIR --total N --out DIR`: a fixed-size training set from learned weights.

What the reference does after ScaleBiO: take floor(N * p_i) examples of each subset i,
drawn without replacement (seeded), and fine-tune on them. The weights are the run's
`scalebio_weights.json` (or any schedule file given with `--weights`: its last entry's
p_global). Rows are copied as they are in the subset's training inputs, so the output
directory is a mixture of its own: `<subset>.train.jsonl` per subset (plus the subset's
eval rows as `<subset>.eval.jsonl`), usable as `data.source_dir`; `draw.json` records
what was drawn.

Inside a subset the rows are drawn uniformly (`--within uniform`) or by the schedule's
p_local over difficulty buckets (`--within p_local`; the default, `auto`, applies p_local
when the run learned one: `scalebio.local_actors`). Buckets belong to the prepared data, so
under p_local the rows are those the run's prepared data holds (with
`data.train_fraction` < 1, its sample; the other rows have no bucket), each mapped back to
its input row by tokenizing the inputs again as preparation did (checked token for token
against the stored examples), and the subset's floor(N * p_i) rows are split over its
buckets by p_local (largest remainders; a bucket with too few rows gives its share to the
others by p_local). The run's prepared data must be in its `data.cache_dir`.

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
from hbo_jax.data.formats import SkipReport, iter_rows, to_conversation
from hbo_jax.data.prepare import encode, find_prepared, mixture, train_rows
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


def read_weights(path: Path, names: list[str]) -> tuple[np.ndarray, np.ndarray | None]:
    """(p_global, p_local or None) of the last entry of a schedule file, checked against the mixture's subsets."""
    if not path.is_file():
        raise ConfigError(f"--weights {path}: not found (a ScaleBiO run writes scalebio_weights.json)")
    data = json.loads(path.read_text())
    if data["subsets"] != names:
        raise ConfigError(f"{path}: subsets {data['subsets']} differ from the run's mixture {names}")
    last = data["entries"][-1]
    local = last.get("p_local")
    return np.asarray(last["p_global"], np.float64), None if local is None else np.asarray(local, np.float64)


def split_by_buckets(n: int, q: np.ndarray, available: np.ndarray) -> np.ndarray:
    """n rows split over buckets by the probabilities q (largest remainders), none above its
    bucket's `available` rows: a full bucket's excess goes to the others by q (all of them
    when only buckets with q = 0 have room left). Sums to min(n, available.sum())."""
    take = np.zeros(len(q), np.int64)
    n = min(n, int(available.sum()))
    while take.sum() < n:
        room = available - take
        open_ = room > 0
        weights = np.where(open_, q, 0.0)
        if weights.sum() <= 0:
            weights = open_.astype(np.float64)
        want = (n - take.sum()) * weights / weights.sum()
        add = np.floor(want).astype(np.int64)
        rest = int(n - take.sum() - add.sum())
        for b in np.argsort(-(want - add), kind="stable")[:rest]:  # the largest remainders, one row each
            add[b] += 1
        take += np.minimum(add, room)
    return take


def row_buckets(cfg, data, i: int, subset, n_rows: int) -> np.ndarray:
    """The difficulty bucket of each of the `n_rows` usable training rows of subset `i` (-1: not among
    its prepared examples), found by encoding the inputs again as preparation did and checking
    every example against the prepared store."""
    positions: list[int] = []
    examples, _ = encode(data.tokenizer, subset.train, subset.format, cfg, SkipReport(), kept_rows=positions)
    keep = train_rows(len(examples), cfg.data.train_fraction, subset.name, cfg.data.num_buckets)
    store = data.train[i]
    if len(keep) != len(store) or any(not np.array_equal(np.asarray(examples[k][0]), store[e][0])
                                      for e, k in enumerate(keep)):
        raise ConfigError(f"subset {subset.name!r}: its inputs no longer give the run's prepared examples "
                          f"({data.root}); --within uniform draws without the buckets")
    out = np.full(n_rows, -1, np.int64)
    out[[positions[k] for k in keep]] = data.buckets[i]
    return out


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
         weights: Path | None = None, within: str = "auto") -> dict:
    """Writes the drawn set to `out`; returns what `draw.json` records.

    `within`: "uniform", "p_local" or "auto" (p_local when the run learned it).
    """
    cfg = load_config(run / "config.yaml")
    subsets = mixture(cfg)
    names = [s.name for s in subsets]
    p, p_local = read_weights(weights or run / "scalebio_weights.json", names)
    if include_validation and VALIDATION in names:
        raise ConfigError(f"--include-validation: the mixture already has a subset named {VALIDATION!r}")
    local = within == "p_local" or (within == "auto" and cfg.scalebio.local_actors)
    data = None
    if local:
        if p_local is None:
            raise ConfigError(f"--within p_local: {weights or run / 'scalebio_weights.json'} has no p_local")
        data = find_prepared(cfg)
        if data is None:
            raise ConfigError(f"--within p_local needs the run's prepared data (its difficulty buckets) in "
                              f"data.cache_dir={cfg.data.cache_dir}, which does not hold it; prepare it again with "
                              f"the run's config, or draw with --within uniform")
    out.mkdir(parents=True, exist_ok=True)
    record = {"run": str(run), "total": total, "seed": seed, "weights": dict(zip(names, p.tolist())),
              "p_local_applied": local, "include_validation": include_validation, "drawn": {}, "available": {}}
    if local:
        record.update(p_local=dict(zip(names, p_local.tolist())), drawn_per_bucket={})
    for i, s in enumerate(subsets):
        rows = usable_rows(s.train, s.format)
        want = math.floor(total * p[i])
        if local:
            bucket = row_buckets(cfg, data, i, s, len(rows))
            leaves = [np.flatnonzero(bucket == b) for b in range(p_local.shape[1])]
            take = split_by_buckets(want, p_local[i], np.array([len(x) for x in leaves]))
            # each bucket's rows drawn without replacement from its own stream; written in input order
            pick = np.sort(np.concatenate([generator(seed, Stream.DRAW, i, b + 1).choice(leaf, size=int(k),
                                                                                         replace=False)
                                           for b, (leaf, k) in enumerate(zip(leaves, take))]).astype(np.int64))
            record["drawn_per_bucket"][s.name] = take.tolist()
            available = int(sum(len(x) for x in leaves))
        else:
            pick = generator(seed, Stream.DRAW, i).choice(len(rows), size=min(want, len(rows)), replace=False)
            available = len(rows)
        k = len(pick)  # without replacement: at most every row once
        if k < want:
            log.warning("subset %r: %d rows wanted, %d available: took all of them", s.name, want, available)
        _write(out / f"{s.name}.train.jsonl", [rows[j] for j in pick])
        if s.eval:
            _write(out / f"{s.name}.eval.jsonl", usable_rows(s.eval, s.format))
        record["drawn"][s.name], record["available"][s.name] = k, available
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
    parser.add_argument("--within", choices=["auto", "uniform", "p_local"], default="auto",
                        help="inside a subset: uniform, or by the schedule's p_local over the prepared data's "
                             "difficulty buckets (auto: p_local when the run learned it, scalebio.local_actors)")
    parser.add_argument("--include-validation", action="store_true",
                        help="append the validation set as a subset 'validation' (the reference does by default)")
    args = parser.parse_args(argv)
    setup_logging()
    if args.total <= 0:
        print(f"error: --total={args.total} must be > 0", file=sys.stderr)
        return 2
    try:
        record = draw(args.run, args.total, args.out, args.seed, args.include_validation, args.weights, args.within)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(", ".join(f"{n} {k}" for n, k in record["drawn"].items()) + f" -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
