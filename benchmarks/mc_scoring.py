"""Multiple-choice scoring: every option scored whole against the options after one shared prefill.

    python benchmarks/mc_scoring.py --config configs/smollm2_135m.yaml [dotted overrides] [--rows 16] [--rounds 2]

On the run's prepared mixture (it must be prepared already: `python -m hbo_jax.train` or
`python -m hbo_jax.evaluate` with the same config prepares it), each multiple-choice
subset's first `--rows` eval rows (the evaluation's stratified sample), with the starting
model (`model.init`). The two paths take turns, `--rounds` times after one untimed call
each (which compiles); the report gives each path's median seconds per subset, the
speed-up, the sequence positions each runs through the model (whole: every option's
sequence padded to its length bucket; shared: each question's prefix bucket once plus
every option's continuation bucket), the largest difference of an option's log-probability
between the two and whether they pick the same option on every row.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _whole_positions(groups, seq_len: int, batch: int) -> int:
    """Positions the whole-sequence path runs: each batch of options (sorted by length) at its width."""
    from hbo_jax.data.scoring import bucket_width

    lengths = sorted(len(ids) for g in groups for ids, _ in g)
    return sum(bucket_width(lengths[a:a + batch][-1], seq_len) * batch for a in range(0, len(lengths), batch))


def _shared_positions(groups) -> int:
    """Positions of the shared path without its bucketing: each prefix once, every continuation."""
    from hbo_jax.models.continuations import shared_prefix

    total = 0
    for g in groups:
        p = shared_prefix(g)
        total += p + sum(len(ids) - p for ids, _ in g) if p else sum(len(ids) for ids, _ in g)
    return total


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", action="append", required=True, help="YAML config(s), later files win")
    ap.add_argument("--rows", type=int, default=16, help="eval rows per multiple-choice subset")
    ap.add_argument("--rounds", type=int, default=2, help="timed calls of each path per subset")
    ap.add_argument("overrides", nargs="*", help="dotted config overrides")
    args = ap.parse_args(argv)

    import numpy as np

    from hbo_jax import tasks
    from hbo_jax.config import load_config
    from hbo_jax.data.prepare import find_prepared
    from hbo_jax.data.scoring import score_examples
    from hbo_jax.evaluate import _task_items
    from hbo_jax.models.base import base_model
    from hbo_jax.models.continuations import continuation_logprobs
    from hbo_jax.parallel import make_mesh
    from hbo_jax.step import make_example_nll_fn

    cfg = load_config(args.config, args.overrides)
    mesh = make_mesh(cfg.mesh)
    data = find_prepared(cfg)
    if data is None:
        print("error: the mixture is not prepared for this config; run python -m hbo_jax.evaluate --config ... "
              "--model base first", file=sys.stderr)
        return 2
    graphdef, params, _ = base_model(cfg, mesh, data)
    nll_fn = make_example_nll_fn(graphdef, mesh)
    seq_len, bs, pad = cfg.data.seq_len, cfg.scorer.score_batch_size, data.pad_id

    def whole(groups):
        flat = [e for g in groups for e in g]
        lp = -score_examples(flat, nll_fn, params, mesh, seq_len, pad, bs) * np.array([m[1:].sum() for _, m in flat])
        bounds = np.cumsum([0] + [len(g) for g in groups])
        return [lp[a:b] for a, b in zip(bounds[:-1], bounds[1:])]

    def shared(groups):
        return continuation_logprobs(graphdef, params, groups, mesh=mesh, pad_id=pad, batch_size=bs)

    print(f"model {cfg.model.init}, seq_len {seq_len}, batch {bs}, {args.rows} rows per subset, "
          f"{args.rounds} rounds, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
    print("| subset | rows | options | positions: whole / shared | whole s | shared s | speed-up "
          "| max abs. diff. of a log-prob | same choice on every row |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    totals = [0.0, 0.0]
    for src in data.manifest["sources"]:
        items = _task_items(data, src, args.rows)
        if tasks.choose_metric(cfg.eval.metrics.get(src["name"], "auto"), items, cfg.eval.exact_match_max_chars) \
                != "mc":
            continue
        rows = [it for it in items if it.options and it.answer in it.options]
        groups = tasks.encode_options(rows, data.tokenizer, seq_len)
        results, times = {}, {"whole": [], "shared": []}
        for fn in (whole, shared):  # compiles
            results[fn.__name__] = fn(groups)
        for _ in range(args.rounds):
            for fn in (whole, shared):
                t = time.perf_counter()
                fn(groups)
                times[fn.__name__].append(time.perf_counter() - t)
        tw, ts = statistics.median(times["whole"]), statistics.median(times["shared"])
        totals[0] += tw
        totals[1] += ts
        diff = max(float(np.max(np.abs(a - b))) for a, b in zip(results["whole"], results["shared"]))
        same = all(int(np.argmax(a)) == int(np.argmax(b)) for a, b in zip(results["whole"], results["shared"]))
        print(f"| {src['name']} | {len(rows)} | {sum(len(g) for g in groups)} | "
              f"{_whole_positions(groups, seq_len, bs):,} / {_shared_positions(groups):,} | {tw:.2f} | {ts:.2f} | "
              f"{tw / ts:.2f}x | {diff:.2e} | {'yes' if same else 'NO'} |", flush=True)
    if totals[1]:
        print(f"all subsets: whole {totals[0]:.2f} s, shared {totals[1]:.2f} s: {totals[0] / totals[1]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
