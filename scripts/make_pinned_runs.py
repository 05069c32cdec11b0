"""Regenerates tests/fixtures/pinned: the logs of short runs, pinned to the last bit.

Usage: python scripts/make_pinned_runs.py [--cache DIR]

Four strategies (HBO with probes, HBO with both rewards from training, MoS+ and uniform)
run a few steps on the committed fixture mixture with 8 simulated CPU devices, as the
tests do. Their `metrics.jsonl`, `mixing.jsonl` and `eval.json`, less the wall-clock
fields, are written under tests/fixtures/pinned/<name>/. tests/test_pinned_runs.py
reruns them and compares them (`log_mismatch`): every key, integer, string and drawn
index exactly, floats to a relative `RTOL`, so a refactor that changes what a run computes
(a batch, a reward, an update, a metric) fails there. Regenerate only for a change that
is meant to alter the numbers, and say so in the commit.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "fixtures" / "pinned"
MIXTURE = ROOT / "tests" / "fixtures" / "mixture"
FILES = ("metrics.jsonl", "mixing.jsonl", "eval.json")
TIMING = {"loss_tokens_per_s", "mixing_share", "seconds"}  # wall clock: never pinned
# XLA's CPU kernels depend on the host's instruction set: the four runs on a host with AVX-512 FP16 and
# AMX (2026-12-01) differed from fixtures made on an earlier host in 1-23 float32 values per file (grad_norm,
# losses, actor probabilities: relative 4.8e-7 at most), every drawn index and every other field equal.
# A change to what a run computes moves its numbers by far more (one token too many in the loss's
# denominator: grad_norm 1.2451 against 1.2559, relative 9e-3).
RTOL = 1e-5

BASE = [
    "data.vocab_size=384", "data.seq_len=32", "data.num_buckets=2", "data.max_eval_per_subset=4",
    "model.hidden_size=32", "model.num_layers=1", "model.num_heads=2", "model.num_kv_heads=1",
    "model.intermediate_size=64", "scorer.warmup_steps=2", "scorer.batch_size=8", "scorer.score_batch_size=16",
    "train.batch_size=8", "train.steps=6", "train.log_every=2", "train.warmup_steps=1",
    "train.checkpoint_every=100", "mixing.global_every=3", "mixing.local_every=3",
    "mixing.global_probes_per_bucket=1", "mixing.local_probes_per_group=2", "mixing.inner_steps=5",
    "eval.every=3", "eval.periodic_max_per_subset=2", "eval.max_new_tokens=4", "tracking.tensorboard=false",
]
RUNS = {
    "hbo": ["mixing.strategy=hbo"],
    "hbo_no_probes": ["mixing.strategy=hbo", "mixing.global_source=train", "mixing.local_source=train",
                      "mixing.global_train_steps=2"],
    "mos_plus": ["mixing.strategy=mos_plus"],
    "uniform": ["mixing.strategy=uniform"],
}


def _strip(obj):
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in TIMING}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def pinned_outputs(name: str, run_dir: Path, cache: Path, extra: tuple[str, ...] = ()) -> dict[str, str | None]:
    """Runs one pinned configuration; returns {file: text without wall-clock fields, or None if absent}.

    `extra` overrides come last (tests: a setting that must not change the pinned logs).
    """
    from hbo_jax.train import main

    overrides = [f"run_dir={run_dir}", f"data.source_dir={MIXTURE}", f"data.cache_dir={cache}", *BASE, *RUNS[name],
                 *extra]
    if main(overrides) != 0:
        raise RuntimeError(f"pinned run {name} failed")
    out = {}
    for f in FILES:
        if not (run_dir / f).is_file():  # e.g. no mixing.jsonl for a static strategy
            out[f] = None
            continue
        text = (run_dir / f).read_text()
        if f.endswith(".jsonl"):
            out[f] = "".join(json.dumps(_strip(json.loads(line)), sort_keys=True) + "\n"
                             for line in text.splitlines())
        else:
            out[f] = json.dumps(_strip(json.loads(text)), sort_keys=True, indent=1) + "\n"
    return out


def log_mismatch(actual: str | None, expected: str | None, rtol: float = RTOL) -> str | None:
    """Where a pinned file's text (`pinned_outputs`) departs from its fixture, or None.

    Both are parsed (a JSON value per line for `.jsonl`): dict keys, list lengths, integers,
    booleans, strings and None must be equal, floats within `rtol` of each other (relative).
    """
    if actual is None or expected is None:
        return None if actual is expected else f"file {'missing' if actual is None else 'not pinned'}"
    lines_a, lines_e = actual.splitlines(), expected.splitlines()
    try:  # a .jsonl file: a value per line; else one JSON document
        docs_a, docs_e = [json.loads(x) for x in lines_a], [json.loads(x) for x in lines_e]
    except json.JSONDecodeError:
        docs_a, docs_e = [json.loads(actual)], [json.loads(expected)]
    if len(docs_a) != len(docs_e):
        return f"{len(docs_a)} lines, pinned {len(docs_e)}"
    return _mismatch(docs_a, docs_e, rtol, "")


def _mismatch(a, e, rtol: float, path: str) -> str | None:
    if isinstance(a, float) and isinstance(e, float):
        same = math.isclose(a, e, rel_tol=rtol) or (math.isnan(a) and math.isnan(e))  # NaN pinned as NaN
        return None if same else f"{path}: {a!r}, pinned {e!r}"
    if type(a) is not type(e):
        return f"{path}: {a!r}, pinned {e!r}"
    if isinstance(a, dict):
        if a.keys() != e.keys():
            return f"{path}: keys {sorted(a.keys() ^ e.keys())} differ"
        for k in a:
            where = _mismatch(a[k], e[k], rtol, f"{path}.{k}")
            if where:
                return where
        return None
    if isinstance(a, list):
        if len(a) != len(e):
            return f"{path}: {len(a)} items, pinned {len(e)}"
        for i, (x, y) in enumerate(zip(a, e)):
            where = _mismatch(x, y, rtol, f"{path}[{i}]")
            if where:
                return where
        return None
    return None if a == e else f"{path}: {a!r}, pinned {e!r}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", help="data cache (default: a temporary directory)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(args.cache) if args.cache else Path(tmp) / "cache"
        for name in RUNS:
            (OUT / name).mkdir(parents=True, exist_ok=True)
            for f, text in pinned_outputs(name, Path(tmp) / name, cache).items():
                (OUT / name / f).unlink(missing_ok=True)
                if text is not None:
                    (OUT / name / f).write_text(text)
            print(f"wrote {OUT / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
