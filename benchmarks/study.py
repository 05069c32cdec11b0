"""A results study: arms x seeds on one mixture, resumable, with its tables and figures.

    python benchmarks/study.py                                   # the SmolLM2-135M study
    python benchmarks/study.py --study benchmarks/studies/smollm2_135m.yaml --arms uniform hbo --seeds 0 1
    python benchmarks/study.py --mixture mine.yaml --results benchmarks/results/mine --docs docs/mine.md
    python benchmarks/study.py --report-only                     # tables and figures from the JSON alone

A study file (YAML) names the configs every arm shares (`configs`, `overrides`: the
model and the budget), the seeds, and the arms (each its own `configs` and `overrides`,
or `merge:` the finished seeds of another arm). Config paths are read from the study
file's folder, as hbo_jax reads paths in a config. `--mixture FILE` adds a config (a
user's `data.*`) after the shared ones, so a study runs on any mixture the same way.

Each arm and seed trains with `python -m hbo_jax.train` in its own process (run
directory `<runs>/<arm>/seed<S>`, `train.data_seed=S`: the same prepared data and
starting model for every arm), and its results go to `<results>/<arm>/seed<S>.json`.
A result that exists is never recomputed, so a study is finished over several sittings;
an interrupted run resumes from its last checkpoint. The docs section (between markers
in `--docs`) and the figures are rebuilt from the JSON files alone
(`benchmarks/study_tables.py`).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from study_tables import write_docs  # noqa: E402

DEFAULT_STUDY = ROOT / "benchmarks" / "studies" / "smollm2_135m.yaml"


@dataclass
class Arm:
    """One arm: its configs and overrides on top of the study's, or a merge of another arm's runs."""

    name: str
    configs: list[str] = field(default_factory=list)
    overrides: list[str] = field(default_factory=list)
    # {of: ARM, replica_seeds: [0, 1, 2], method: select|average, resample: bool, atol: float, seeds: [..]}:
    # the finished runs of ARM at those seeds (data-order replicas) merged, once per merge seed (the
    # study's seeds unless `seeds` names them: an average draws nothing, so one seed says it all).
    merge: dict | None = None


@dataclass
class Study:
    """What a study file says, with its config paths made absolute."""

    name: str
    configs: list[str]
    overrides: list[str]
    seeds: list[int]
    arms: list[Arm]
    static_arms: list[str]  # the baselines a learned arm is compared against (the best of them)


def load_study(path: Path, mixture: list[str] | None = None) -> Study:
    """Reads a study file; `mixture` configs go after the study's own."""
    raw = yaml.safe_load(path.read_text())
    here = path.resolve().parent

    def paths(xs):
        return [str((here / x).resolve()) for x in xs or []]

    unknown = set(raw) - {"name", "configs", "overrides", "seeds", "arms", "static_arms"}
    if unknown:
        raise SystemExit(f"{path}: unknown keys {sorted(unknown)}")
    arms = []
    for name, spec in (raw.get("arms") or {}).items():
        spec = spec or {}
        bad = set(spec) - {"configs", "overrides", "merge"}
        if bad:
            raise SystemExit(f"{path}: arm {name}: unknown keys {sorted(bad)}")
        arms.append(Arm(name, paths(spec.get("configs")), list(spec.get("overrides") or []), spec.get("merge")))
    names = {a.name for a in arms}
    for a in arms:
        if a.merge and a.merge.get("of") not in names:
            raise SystemExit(f"{path}: arm {a.name} merges arm {a.merge.get('of')!r}, which the study does not have")
    configs = paths(raw.get("configs")) + [str(Path(m).resolve()) for m in mixture or []]
    return Study(raw.get("name", path.stem), configs,
                 list(raw.get("overrides") or []), [int(s) for s in raw.get("seeds") or [0, 1]], arms,
                 list(raw.get("static_arms") or ["proportional", "temperature", "uniform"]))


def train_command(study: Study, arm: Arm, seed: int, run_dir: Path) -> list[str]:
    """The `python -m hbo_jax.train` command line of one arm and seed."""
    cfgs = [x for c in study.configs + arm.configs for x in ("--config", c)]
    return [sys.executable, "-m", "hbo_jax.train", *cfgs, *study.overrides, *arm.overrides,
            f"train.data_seed={seed}", f"run_dir={run_dir}"]


class OutOfTime(Exception):
    """The study's --budget-s ran out: what is finished is kept, the rest waits for a rerun."""


@dataclass
class Launch:
    """How the study starts its runs: their environment, and the time.monotonic() past which no
    run starts and a running one is stopped (--budget-s)."""

    env: dict[str, str]
    deadline: float = float("inf")


def run_environment(runs: Path) -> dict[str, str]:
    """The environment of the study's runs: this one, plus a persistent XLA compilation cache.

    Every arm compiles the same programs (the train step, the evaluation, generation). JAX
    writes those that took over a second to compile (its default threshold): in the SmolLM2
    study six programs, and a run's first step came 49 s after its start without them and
    9.5 s with them. An environment that names its own cache keeps it.
    """
    env = dict(os.environ)
    env.setdefault("JAX_COMPILATION_CACHE_DIR", str(runs / "xla_cache"))
    return env


def _run(cmd: list[str], log: Path, launch: Launch) -> None:
    left = launch.deadline - time.monotonic()
    if left <= 0:
        raise OutOfTime()
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"  $ {shlex.join(cmd)}\n    (log: {log})", flush=True)
    with log.open("a") as f:
        try:
            rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=launch.env,
                                 timeout=None if left == float("inf") else left)
        except subprocess.TimeoutExpired:
            raise OutOfTime() from None
    if rc != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
        raise SystemExit(f"failed (exit {rc}): {shlex.join(cmd)}\n--- last lines of {log} ---\n{tail}")


def _mixing_trajectory(run_dir: Path) -> dict:
    """Steps and probabilities logged in mixing.jsonl (global and local, or ScaleBiO's p)."""
    out: dict = {"step": [], "p_global": [], "p_local": []}
    start = run_dir / "probabilities_start.json"
    if start.is_file():  # the probabilities before the first update, at step 0
        first = json.loads(start.read_text())
        out["step"].append(0)
        out["p_global"].append(first.get("p_global"))
        out["p_local"].append(first.get("p_local"))
    path = run_dir / "mixing.jsonl"
    if not path.is_file():
        return out
    for line in path.read_text().splitlines():
        row = json.loads(line)
        p = row.get("p_global", row.get("p"))
        if p is None:
            continue
        out["step"].append(row["step"])
        out["p_global"].append(p)
        out["p_local"].append(row.get("p_local"))
    return out


def _strip(ev: dict) -> dict:
    """An eval result without the decoded samples (kept in the run directory)."""
    return {k: {kk: vv for kk, vv in v.items() if kk != "samples"} if isinstance(v, dict) else v
            for k, v in ev.items()}


def collect_run(run_dir: Path, cmd: list[str], study: Study, arm: Arm, seed: int) -> dict:
    """The result of a finished training run, from its run directory."""
    ev = json.loads((run_dir / "eval.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"study": study.name, "arm": arm.name, "seed": seed, "command": _shown(cmd), "code": _commit(),
            "subsets": summary.get("subsets"), "steps": summary.get("steps"),
            "before": _strip(ev["before"]), "after": _strip(ev["after"]),
            "seconds": {k: summary.get(k) for k in ("prepare_seconds", "train_loop_seconds", "wall_seconds")},
            "mixing": _mixing_trajectory(run_dir)}


def run_arm_seed(study: Study, arm: Arm, seed: int, runs: Path, results: Path, launch: Launch) -> dict | None:
    """Trains (or resumes) one arm and seed and writes its result JSON; skips a finished one."""
    out = results / arm.name / f"seed{seed}.json"
    if out.is_file():
        print(f"{arm.name} seed {seed}: done ({out.relative_to(ROOT) if out.is_relative_to(ROOT) else out})")
        return json.loads(out.read_text())
    if arm.merge:
        return merge_arm_seed(study, arm, seed, runs, results, launch)
    run_dir = runs / arm.name / f"seed{seed}"
    cmd = train_command(study, arm, seed, run_dir)
    print(f"{arm.name} seed {seed}: training", flush=True)
    t0 = time.time()
    if not ((run_dir / "eval.json").is_file() and (run_dir / "summary.json").is_file()):
        _run(cmd, run_dir.with_suffix(".log"), launch)
    res = collect_run(run_dir, cmd, study, arm, seed)
    res["seconds"]["study_wall"] = time.time() - t0
    _write(out, res)
    return res


def merge_arm_seed(study: Study, arm: Arm, seed: int, runs: Path, results: Path, launch: Launch) -> dict | None:
    """Merges the finished seeds of another arm (merge seed = `seed`) and evaluates the merge."""
    spec = arm.merge
    of = spec["of"]
    want = [runs / of / f"seed{s}" for s in spec.get("replica_seeds", [0, 1, 2])]
    replicas = [r for r in want if (r / "eval.json").is_file()]
    if len(replicas) < len(want):
        print(f"{arm.name} seed {seed}: waits for the runs of {of} at seeds {spec.get('replica_seeds', [0, 1, 2])} "
              f"({len(replicas)} of {len(want)} finished)")
        return None
    out_dir = runs / arm.name / f"seed{seed}"
    merged = out_dir / "merged"
    cmd = [sys.executable, "-m", "hbo_jax.merge", "--models", *map(str, replicas),
           "--method", spec.get("method", "select"), "--seed", str(seed), "--out", str(merged), "--overwrite"]
    if spec.get("resample"):
        cmd += ["--resample", "--atol", str(spec.get("atol", 0.0))]
    print(f"{arm.name} seed {seed}: merging {len(replicas)} runs of {of}", flush=True)
    t0 = time.time()
    log = out_dir.with_suffix(".log")
    _run(cmd, log, launch)
    ev_path = out_dir / "eval.json"
    ev_cmd = [sys.executable, "-m", "hbo_jax.evaluate", str(replicas[0]), "--model", f"hf:{merged}",
              "--out", str(ev_path)]
    _run(ev_cmd, log, launch)
    first = json.loads((replicas[0] / "eval.json").read_text())
    res = {"study": study.name, "arm": arm.name, "seed": seed, "code": _commit(),
           "command": _shown(cmd) + " && " + _shown(ev_cmd),
           "replicas": [r.name for r in replicas], "subsets": None, "steps": None,
           "before": _strip(first["before"]), "after": _strip(json.loads(ev_path.read_text())["eval"]),
           "seconds": {"study_wall": time.time() - t0}, "mixing": {"step": [], "p_global": [], "p_local": []}}
    _write(results / arm.name / f"seed{seed}.json", res)
    return res


def run_order(study: Study, wanted: list[str], seeds: list[int] | None) -> list[tuple[str, int]]:
    """(arm, seed) pairs in the order they run: trained arms seed-major (every arm gets a first seed
    first), then the merges, whose runs exist by then. `seeds` (from --seeds) overrides the study's
    seeds and a merge arm's own."""
    by_name = {a.name: a for a in study.arms}
    trained = [n for n in wanted if not by_name[n].merge]
    order = [(n, s) for s in seeds or study.seeds for n in trained]
    for n in wanted:
        if by_name[n].merge:
            order += [(n, s) for s in seeds or by_name[n].merge.get("seeds", study.seeds)]
    return order


def _shown(cmd: list[str]) -> str:
    """A command as the results record it: `python ...`, paths inside the checkout relative to it."""
    root = f"{ROOT}/"
    return shlex.join(["python", *(a.replace(root, "") for a in cmd[1:])])


def _commit() -> str | None:
    """The checkout's commit (with `+changes` when its tracked files differ from it), if git knows."""
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "hbo_jax"], cwd=ROOT).returncode != 0
    except (OSError, subprocess.CalledProcessError):
        return None
    return rev.stdout.strip() + ("+changes" if dirty else "")


def _write(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    tmp.replace(path)  # a result file is whole or absent: an interrupted write leaves no half result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--study", type=Path, default=DEFAULT_STUDY, help="the study file (YAML)")
    ap.add_argument("--mixture", action="append", default=[], help="config(s) with the mixture (data.*) to study")
    ap.add_argument("--arms", nargs="+", help="only these arms, in this order (default: every arm of the study)")
    ap.add_argument("--seeds", nargs="+", type=int, help="seeds (default: the study's)")
    ap.add_argument("--runs", type=Path, help="run directories (default: runs/study/<name>)")
    ap.add_argument("--results", type=Path, help="result JSON (default: benchmarks/results/<name>)")
    ap.add_argument("--docs", type=Path, default=ROOT / "docs" / "results.md",
                    help="the markdown file whose study section is rewritten")
    ap.add_argument("--report-only", action="store_true", help="rebuild tables and figures; train nothing")
    ap.add_argument("--budget-s", type=float, help="stop starting (and stop) runs after this many seconds; "
                    "a rerun continues where it stopped")
    args = ap.parse_args(argv)
    study = load_study(args.study, args.mixture)
    runs = args.runs or ROOT / "runs" / "study" / study.name
    launch = Launch(run_environment(runs), time.monotonic() + args.budget_s if args.budget_s else float("inf"))
    results = args.results or ROOT / "benchmarks" / "results" / study.name
    if not args.report_only:
        wanted = args.arms or [a.name for a in study.arms]
        by_name = {a.name: a for a in study.arms}
        missing = [a for a in wanted if a not in by_name]
        if missing:
            raise SystemExit(f"unknown arms {missing}; the study has {sorted(by_name)}")
        try:
            for name, seed in run_order(study, wanted, args.seeds):
                run_arm_seed(study, by_name[name], seed, runs, results, launch)
        except OutOfTime:
            print(f"out of time (--budget-s {args.budget_s:g}): the finished results are kept; rerun to continue")
    write_docs(study, results, args.docs, args.study)
    return 0


if __name__ == "__main__":
    sys.exit(main())
