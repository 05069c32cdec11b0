"""Several runs side by side (`python -m hbo_jax.report RUN_DIR RUN_DIR ...`): compare.md,
compare.json and compare.png.

Runs that sample alike form one group (seed replicas, or data-order replicas), shown as
mean ± std over its runs (std with ddof=1; 0 for a single run) with n: their config.yaml
are equal except `run_dir`, `train.seed`, `train.data_seed` and bookkeeping, with the
`mixing.*` settings compared as the strategy reads them (`settings_that_matter`: its
defaults resolved, the keys it never reads left out). A group's label names the keys
that differ between groups, except those at each strategy's own default.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from hbo_jax.records import dumps
from hbo_jax.run_files import EVAL_SETS, TASK_METRICS, Run, fmt, md_table, mixing_settings

log = logging.getLogger("hbo_jax.report")


def group_runs(runs: list[Run]) -> list[list[Run]]:
    """Runs of one experiment (`Run.experiment` equal: config.yaml up to `run_dir`, the
    seeds, bookkeeping and the mixing keys their strategy does not read), in first-seen order."""
    groups: dict[str, list[Run]] = {}
    for r in runs:
        groups.setdefault(json.dumps(r.experiment, sort_keys=True, default=str), []).append(r)
    return list(groups.values())


def group_labels(groups: list[list[Run]]) -> list[str]:
    """Each group's name: its strategy (when strategies differ, or nothing else does), then
    the keys that tell the groups apart.

    A key is named when the groups that have it (the strategy reads it) disagree, unless
    each of them holds its own strategy's default (hbo's temperature 1 vs temperature's
    10: the strategies' names say it). Strategy-free keys (train.*, data.*) are named
    whenever they differ.
    """
    flat = [g[0].experiment for g in groups]
    defaults = {f.get("mixing.strategy"): {f"mixing.{k}": v for k, v in (mixing_settings(
        {"strategy": f.get("mixing.strategy")}) or {}).items()} for f in flat}

    def named(key: str) -> bool:
        having = [f for f in flat if key in f]
        if len({json.dumps(f[key], default=str) for f in having}) < 2:
            return False
        own = [defaults[f.get("mixing.strategy")] for f in having]
        return key == "mixing.strategy" or not all(key in d and f[key] == d[key] for f, d in zip(having, own))

    keys = sorted(k for k in {k for f in flat for k in f} if k != "mixing.strategy" and named(k))
    short = {k: k.split(".")[-1] if sum(x.split(".")[-1] == k.split(".")[-1] for x in keys) == 1 else k
             for k in keys}
    show_strategy = named("mixing.strategy") or not keys
    return [", ".join([str(f.get("mixing.strategy", g[0].strategy))] * show_strategy
                      + [f"{short[k]}={f[k]}" for k in keys if k in f]) for f, g in zip(flat, groups)]


def metric_value(run: Run, subset: str, metric: str) -> float | None:
    """`metric` after training for a subset ("macro": macro_avg, else mean over subsets)."""
    after = run.eval.get("after", {})
    if subset == "macro":
        if after.get("macro_avg", {}).get(metric) is not None:  # null: not finite when written
            return float(after["macro_avg"][metric])
        vals = [v[metric] for n, v in after.items() if n != "macro_avg" and isinstance(v, dict) and metric in v]
        return float(np.mean(vals)) if vals else None
    v = after.get(subset, {}).get(metric)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _stats(values: list[float]) -> dict:
    a = np.array(values, float)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0, "n": len(a),
            "values": a.tolist()}


def _macro_curve(group: list[Run]) -> list[tuple]:
    """(step, mean, std) of macro eval loss over the steps every run of the group evaluated."""
    per_run = [{r["step"]: r["eval"]["macro_avg"]["loss"] for r in run.eval_log
                if "loss" in r.get("eval", {}).get("macro_avg", {})} for run in group]
    if not per_run or not all(per_run):
        return []
    steps = sorted(set.intersection(*(set(p) for p in per_run)))
    stats = [_stats([p[s] for p in per_run]) for s in steps]
    return [(s, st["mean"], st["std"]) for s, st in zip(steps, stats)]


def _metrics(runs: list[Run]) -> list[str]:
    """The loss, then each task metric some run has after training."""
    after = [v for r in runs for v in r.eval.get("after", {}).values() if isinstance(v, dict)]
    return ["loss", *(m for m in TASK_METRICS if any(m in v for v in after))]


def _caps(runs: list[Run], which: str) -> str:
    """The per-subset cap of an eval set over the runs ("16", or "16 or 32" when they differ)."""
    section, key = EVAL_SETS[which]
    caps = sorted({str(r.config.get(section, {}).get(key, "?")) for r in runs})
    return f"at most {section}.{key} = {' or '.join(caps)} rows per subset"


def _mean_std(stats: dict | None) -> str:
    return f"{fmt(stats['mean'])} ± {fmt(stats['std'])}" if stats else "—"


def compare(runs: list[Run], out: str | Path, metric: str | None = None) -> dict:
    """Writes compare.md / compare.json / compare.png into `out`; returns the groups' stats.

    `metric`: the one metric compared (default: the loss and each task metric the runs have).
    """
    from hbo_jax.plots import plot_compare

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    subsets = list(dict.fromkeys(n for r in runs for n in r.names))
    metrics = [metric] if metric else _metrics(runs)
    groups, grouped = [], group_runs(runs)
    for label, g in zip(group_labels(grouped), grouped):
        stats: dict = {}
        for m in metrics:
            for s in [*subsets, "macro"]:
                vals = [v for v in (metric_value(r, s, m) for r in g) if v is not None]
                if vals:
                    stats.setdefault(m, {})[s] = _stats(vals)
        times = {k: _stats(v) for k in ("train_loop_seconds", "prepare_seconds")
                 if (v := [r.summary[k] for r in g if isinstance(r.summary.get(k), (int, float))])}
        groups.append({"label": label, "n": len(g), "seeds": [r.seed for r in g],
                       "data_seeds": [r.data_seed for r in g], "runs": [str(r.path) for r in g],
                       "stats": stats, "seconds": times, "curve": _macro_curve(g)})
    for m in metrics:
        if not any(m in g["stats"] for g in groups):
            log.warning("report: no run has %r after training (eval.json); its comparison is empty", m)
    full, periodic = _caps(runs, "full"), _caps(runs, "periodic")
    md = ["# Comparison after training", "",
          "Mean ± std (ddof=1) over the seeds of each group; n = runs in the group. "
          "Seeds: train.seed, or train.seed/train.data_seed where a data seed is set. "
          "Groups = equal config.yaml except run_dir, train.seed, train.data_seed and bookkeeping keys "
          "(eval.*, tracking.*, distributed.*, logging and checkpoint cadence), with the mixing.* keys as each "
          "strategy reads them (its defaults resolved, the keys it ignores left out); a label names the keys "
          "that differ between groups, except those at each strategy's own default.", "",
          f"Tables and compare.png's bars: the full eval set (eval.json; {full}). compare.png's curves: "
          f"the periodic eval set (eval.jsonl; {periodic}); with fewer rows, their values differ from the "
          "tables'.", ""]
    seeds = {id(g): ",".join(r.seed_label for r in members) for g, members in zip(groups, grouped)}
    for m in metrics:
        md += [f"## {m} after training", ""]
        md += md_table(["group", "n", "seeds", *subsets, "macro"],
                     [[g["label"], str(g["n"]), seeds[id(g)]] + [_mean_std(g["stats"].get(m, {}).get(s))
                                                                 for s in [*subsets, "macro"]] for g in groups])
        md.append("")
    md += ["## Time", "",
           "The training loop's seconds compare strategies; data preparation (tokenizing, the scorer's "
           "warm-up and scoring) is shared by runs of one mixture and near zero when it is reused.", ""]
    md += md_table(["group", "n", "training loop s", "data preparation s"],
                 [[g["label"], str(g["n"]), _mean_std(g["seconds"].get("train_loop_seconds")),
                   _mean_std(g["seconds"].get("prepare_seconds"))] for g in groups])
    md += ["", "## Groups", ""]
    md += [f"- **{g['label']}**: " + ", ".join(g["runs"]) for g in groups] + ["", "![compare](compare.png)", ""]
    (out / "compare.md").write_text("\n".join(md))
    (out / "compare.json").write_text(dumps({"metrics": metrics, "subsets": subsets, "groups": groups,
                                             "eval_sets": {"tables": full, "curves": periodic}}, indent=1))
    plot_compare(groups, subsets, metrics, out / "compare.png", eval_sets=(full, periodic))
    log.info("report: wrote %s", out / "compare.md")
    return {"compare": str(out / "compare.md"), "groups": groups}

