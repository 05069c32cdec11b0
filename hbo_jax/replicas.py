"""`python -m hbo_jax.replicas`: train K data-order replicas of one run, then merge them.

    python -m hbo_jax.replicas --k 3 --out runs/replicas [--config FILE] [key=value ...] \\
        [--merge select|average|none] [--resample] [--seed S]

Replica i is the run `--config` + overrides with `run_dir=OUT/r<i>` and
`train.data_seed=<i>` (`--data-seeds` to choose them): same starting model, prepared data,
buckets, hyperparameters and initial probabilities; only the order of the training batches
(and the probes) differs. They train one after another (a finished replica is skipped, a
stopped one resumes); `--only I` trains replica I alone, e.g. one per host or GPU group on
storage they all see, and a final call with `--merge-only` merges them. The merge
(`hbo_jax.merge`) writes `OUT/merged_<method>[_resample]`, a Hugging Face directory that
`python -m hbo_jax.evaluate OUT/r0 --model hf:OUT/merged_select` evaluates on the same data.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

log = logging.getLogger(__name__)


def replica_overrides(out: Path, data_seed: int, i: int) -> list[str]:
    """What replica `i` sets on top of the shared config."""
    return [f"run_dir={out / f'r{i}'}", f"train.data_seed={data_seed}"]


def train_replicas(out: Path, k: int, config: str | None, overrides: list[str], *,
                   data_seeds: list[int] | None = None, only: int | None = None) -> list[Path]:
    """Trains the replicas (all, or replica `only`) with `hbo_jax.train.run`; returns every replica's run dir."""
    import json

    from hbo_jax.config import load_config
    from hbo_jax.distributed import StopRequest, initialize
    from hbo_jax.errors import ConfigError
    from hbo_jax.train import run

    seeds = list(range(k)) if data_seeds is None else list(data_seeds)
    if len(seeds) != k or len(set(seeds)) != k:
        raise ConfigError(f"--data-seeds: {seeds} is not {k} distinct seeds")
    if only is not None and not 0 <= only < k:
        raise ConfigError(f"--only {only}: not a replica index in 0..{k - 1}")
    for key in ("run_dir=", "train.data_seed="):
        if any(o.startswith(key) for o in overrides):
            raise ConfigError(f"override {key}...: set per replica by this command (use --out / --data-seeds)")
    dirs, started = [out / f"r{i}" for i in range(k)], False
    for i in range(k) if only is None else [only]:
        cfg = load_config(config, [*overrides, *replica_overrides(out, seeds[i], i)])
        summary = dirs[i] / "summary.json"
        if summary.is_file() and json.loads(summary.read_text()).get("steps") == cfg.train.steps:
            log.info("%s: finished already (summary.json), not retrained", dirs[i])
            continue
        if not started:  # jax.distributed once per process
            initialize(cfg.distributed)
            started = True
        with StopRequest() as stop:
            result = run(cfg, stop)
        if "stopped" in result:
            raise ConfigError(f"{dirs[i]}: stopped at step {result['step']}; run the same command again to resume")
    return dirs


def main(argv: list[str] | None = None) -> int:
    from hbo_jax.cli import USER_ERRORS, setup_logging
    from hbo_jax.merge import METHODS, merge

    ap = argparse.ArgumentParser(prog="python -m hbo_jax.replicas", description=__doc__.split("\n\n")[0])
    ap.add_argument("--k", type=int, required=True, help="number of replicas")
    ap.add_argument("--out", type=Path, required=True, help="replicas go to OUT/r<i>, the merge to OUT/merged_*")
    ap.add_argument("--config", help="YAML file (configs/*.yaml); default the demo run")
    ap.add_argument("--data-seeds", type=int, nargs="+", help="train.data_seed of each replica (default 0..K-1)")
    ap.add_argument("--only", type=int, help="train replica ONLY alone (one per host / GPU group), no merge")
    ap.add_argument("--merge-only", action="store_true", help="merge replicas trained before, train nothing")
    ap.add_argument("--merge", choices=(*METHODS, "none"), default="select")
    ap.add_argument("--resample", action="store_true", help="merge: --resample (select only)")
    ap.add_argument("--seed", type=int, default=0, help="merge: --seed")
    ap.add_argument("--overwrite", action="store_true", help="merge: replace an existing merged directory")
    ap.add_argument("overrides", nargs="*", help="dotted config overrides shared by every replica")
    args = ap.parse_args(argv)
    setup_logging()
    try:
        dirs = [args.out / f"r{i}" for i in range(args.k)]
        if not args.merge_only:
            dirs = train_replicas(args.out, args.k, args.config, args.overrides, data_seeds=args.data_seeds,
                                  only=args.only)
        if args.merge == "none" or args.only is not None:
            return 0
        out = args.out / (f"merged_{args.merge}" + ("_resample" if args.resample else ""))
        merge(None, dirs, out, method=args.merge, resample=args.resample, seed=args.seed, overwrite=args.overwrite)
    except (*USER_ERRORS, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"merged {args.k} replicas into {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
