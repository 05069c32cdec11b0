"""`python -m hbo_jax.report RUN_DIR [RUN_DIR ...] [--out DIR] [--metric M]`: reports.

One run directory -> `<run_dir>/report/`: p_global.png, p_local.png, rewards.png,
drawn.png, eval.png and report.md (run facts, before/after table, final p_global,
mixing overhead). A figure whose data the run did not log (rewards of a fixed schedule,
`drawn` counts or eval.jsonl of an older run) is skipped, logged and noted in report.md.

Several run directories -> each one's report, plus a comparison in `--out`
(default `report_compare/`): compare.md, compare.json and compare.png, for the loss and
each task metric the runs have (or `--metric` alone), and the training loop's time.
Runs that sample alike form one group (seed replicas, or data-order replicas), shown as
mean ± std over its runs (std with ddof=1; 0 for a single run) with n: their config.yaml
are equal except `run_dir`, `train.seed`, `train.data_seed` and bookkeeping, with the
`mixing.*` settings compared as the strategy reads them (`settings_that_matter`: its
defaults resolved, the keys it never reads left out). A group's label names the keys
that differ between groups, except those at each strategy's own default.

Two eval sets: the tables (eval.json) use the full one (`data.max_eval_per_subset` rows
per subset at most), the curves (eval.jsonl) the small periodic one
(`eval.periodic_max_per_subset`); figures and reports say which they show.

`train.py` calls `write_report(run_dir)` at the end of a run (process 0 only).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from hbo_jax.algorithm import config_sections
from hbo_jax.config import MixingConfig
from hbo_jax.config_keys import GROUP_IGNORE, flatten, matches
from hbo_jax.errors import ConfigError
from hbo_jax.mixing.strategy import SCALEBIO_LOCAL_KEYS, settings_that_matter
from hbo_jax.records import dumps

log = logging.getLogger("hbo_jax.report")

TASK_METRICS = ("acc", "acc_norm", "exact_match")
# Where each eval set's per-subset cap is configured.
EVAL_SETS = {"full": ("data", "max_eval_per_subset"), "periodic": ("eval", "periodic_max_per_subset")}
FIGURES = ("p_global", "p_local", "rewards", "drawn", "eval")


def _ignored(key: str) -> bool:
    return matches(key, GROUP_IGNORE)  # the seed and bookkeeping do not make runs different experiments
_MARKERS = ("summary.json", "metrics.jsonl", "eval.json", "probabilities_start.json", "mixing.jsonl")


class NotARunDir(ValueError):
    """The path is not a run directory written by `hbo_jax.train`."""


def read_jsonl(path: Path) -> list[dict]:
    """JSON lines of a file; a missing file is empty, a torn line (killed run) is skipped."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            if line.strip():
                out.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning("%s: skipping an unreadable line", path)
    return out


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError:
        log.warning("%s: not valid JSON, ignored", path)
        return {}


@dataclass
class Run:
    """Everything a run directory logged (missing files are empty)."""

    path: Path
    config: dict
    summary: dict = field(default_factory=dict)
    start: dict | None = None
    mixing: list = field(default_factory=list)
    metrics: list = field(default_factory=list)
    eval_log: list = field(default_factory=list)
    eval: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.resolve().name

    @property
    def names(self) -> list[str]:
        if self.summary.get("subsets"):
            return list(self.summary["subsets"])
        for e in (self.eval.get("after"), self.eval.get("before")):
            if e:
                return [n for n in e if n != "macro_avg"]
        losses = [k[5:] for r in self.metrics[:1] for k in r if k.startswith("loss/")]
        return losses

    def names_for(self, d: int) -> list[str]:
        """Subset names for a [D] array (placeholders if the logs disagree)."""
        names = self.names
        return names if len(names) == d else [f"subset{i}" for i in range(d)]

    @property
    def total_steps(self) -> int:
        for v in (self.summary.get("steps"), self.config.get("train", {}).get("steps")):
            if isinstance(v, int) and v > 0:
                return v
        return max([r.get("step", 0) for r in self.metrics + self.mixing] + [1])

    @property
    def seed(self):
        return self.config.get("train", {}).get("seed")

    @property
    def data_seed(self):
        """`train.data_seed` when the run sets one (not -1), else None."""
        value = self.config.get("train", {}).get("data_seed", -1)
        return None if value == -1 else value

    @property
    def seed_label(self) -> str:
        """`train.seed`, or `seed/data_seed` (e.g. `0/2`) when the run sets a data seed."""
        return str(self.seed) if self.data_seed is None else f"{self.seed}/{self.data_seed}"

    @property
    def strategy(self) -> str:
        return self.summary.get("strategy") or self.config.get("mixing", {}).get("strategy", "?")

    def eval_set(self, which: str, sep: str = ", ") -> str:
        """Which eval set the tables ("full", eval.json) or the curves ("periodic", eval.jsonl) show."""
        section, key = EVAL_SETS[which]
        cap = self.config.get(section, {}).get(key)
        last = (self.eval.get("after") or self.eval.get("before") or {}) if which == "full" else (
            self.eval_log[-1].get("eval", {}) if self.eval_log else {})
        rows = last.get("macro_avg", {}).get("examples")
        head = f"the {which} eval set" + (f": {rows} rows" if rows else "")
        return head + (f"{sep}at most {cap} per subset ({section}.{key})" if cap else "")

    @property
    def experiment(self) -> dict:
        """The flat config keys that make it a different experiment (`group_runs`)."""
        algorithm = self.config.get("algorithm", "sampling")
        # Each algorithm reads only its own section: a ScaleBiO run's `mixing.*` keys (and
        # a sampling run's `scalebio.*` keys) are defaults nobody used.
        unread = tuple(f"{s}." for a, s in config_sections().items() if a != algorithm)
        flat = {k: v for k, v in flatten(self.config).items() if not _ignored(k) and not k.startswith(unread)}
        if algorithm == "scalebio" and (self.config.get("scalebio") or {}).get("local_actors"):
            mixing = self.config.get("mixing") or {}  # HBO's local actors inside ScaleBiO read these
            flat.update({f"mixing.{k}": mixing.get(k) for k in SCALEBIO_LOCAL_KEYS})
        if algorithm != "sampling":
            return flat
        mixing = mixing_settings(self.config.get("mixing"))
        if mixing is None:  # not a config this version reads: every key as written
            return flat
        return {**{k: v for k, v in flat.items() if not k.startswith("mixing.")},
                **{f"mixing.{k}": v for k, v in mixing.items()}}


def mixing_settings(mixing) -> dict | None:
    """`settings_that_matter` of a config.yaml's `mixing` section (None: it cannot be read)."""
    if not isinstance(mixing, dict):
        return None
    known = set(MixingConfig.__dataclass_fields__)
    try:
        return settings_that_matter(MixingConfig(**{k: v for k, v in mixing.items() if k in known}))
    except (ConfigError, KeyError, TypeError, ValueError):  # unknown strategy, contradicting keys
        return None


def load_run(run_dir: str | Path) -> Run:
    """Reads a run directory; raises NotARunDir when it is not one."""
    p = Path(run_dir)
    if not p.is_dir():
        raise NotARunDir(f"{p}: not a directory")
    if not (p / "config.yaml").is_file() or not any((p / m).is_file() for m in _MARKERS):
        raise NotARunDir(f"{p}: not a run directory (needs config.yaml and one of {', '.join(_MARKERS)})")
    try:
        config = yaml.safe_load((p / "config.yaml").read_text()) or {}
    except yaml.YAMLError as e:
        raise NotARunDir(f"{p}: config.yaml is not valid YAML ({e})") from e
    ev = _read_json(p / "eval.json")
    summary = _read_json(p / "summary.json")
    if not ev and summary.get("eval_after"):
        ev = {"before": summary.get("eval_before", {}), "after": summary["eval_after"]}
    return Run(p, config if isinstance(config, dict) else {}, summary,
               _read_json(p / "probabilities_start.json") or None, read_jsonl(p / "mixing.jsonl"),
               read_jsonl(p / "metrics.jsonl"), read_jsonl(p / "eval.jsonl"), ev)


def _fmt(v, digits: int = 4) -> str:
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
        return f"{v:.{digits}f}"
    return "—"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def eval_table(before: dict, after: dict, names: list[str]) -> list[str]:
    """Markdown rows: per subset and macro_avg, loss / ppl / task metrics before and after."""
    rows_for = [n for n in names if n in after or n in before] + ["macro_avg"]
    rows_for = [n for n in rows_for if n in after or n in before]
    tasks = [m for m in TASK_METRICS if any(m in e.get(n, {}) for e in (before, after) for n in rows_for)]
    header = ["subset", "loss before", "loss after", "ppl before", "ppl after", "metric"]
    header += [f"{m} {w}" for m in tasks for w in ("before", "after")] + ["rows used"]
    rows = []
    for n in rows_for:
        b, a = before.get(n, {}), after.get(n, {})
        kind = a.get("metric", b.get("metric", "—" if n != "macro_avg" else ""))
        row = [n, _fmt(b.get("loss")), _fmt(a.get("loss")), _fmt(b.get("ppl")), _fmt(a.get("ppl")), kind or "—"]
        row += [_fmt(e.get(m)) for m in tasks for e in (b, a)]
        rows.append(row + [_rows_used(a or b)])
    return _table(header, rows)


def _rows_used(e: dict) -> str:
    """`64 of 200` eval rows for the loss, and the task metric's count where it differs."""
    loss, total, task = e.get("examples"), e.get("eval_rows"), e.get("task_examples")
    out = "—" if loss is None else f"{loss} of {total}" if total else str(loss)
    return out if task is None or task == loss else f"{out}; task {task}"


def _seconds(value) -> str | None:
    return f"{value:.1f}s" if isinstance(value, (int, float)) else None


def _overhead(run: Run) -> str:
    s = run.summary
    if "mixing_share" in s:
        return (f"{100 * s['mixing_share']:.1f}% of the training loop "
                f"({s.get('mixing_seconds', float('nan')):.1f}s of {s.get('train_loop_seconds', float('nan')):.1f}s)")
    shares = [r["mixing_share"] for r in run.metrics if "mixing_share" in r]
    return f"{100 * float(np.mean(shares)):.1f}% (mean over log intervals)" if shares else "not logged"


def _updates(run: Run) -> str:
    n = run.summary.get("actor_updates")
    if isinstance(n, list) and len(n) == 2:
        return f"global {n[0]}, local {n[1]}"
    return str(n if n is not None else len([r for r in run.mixing if "p_global" in r and not r.get("replayed")]))


def write_report(run_dir: str | Path) -> dict:
    """Writes `<run_dir>/report/` (figures + report.md); returns {report, figures, skipped}."""
    from hbo_jax import plots

    run = load_run(run_dir)
    out = run.path / "report"
    out.mkdir(parents=True, exist_ok=True)
    figures, skipped = {}, {}
    for fig in FIGURES:
        try:
            path, why = getattr(plots, f"plot_{fig}")(run, out / f"{fig}.png")
        except Exception as e:  # a malformed older log must not fail the run that made it
            path, why = None, f"could not plot ({type(e).__name__}: {e})"
            plots.plt.close("all")
        if path is None:
            skipped[fig] = why
            log.info("report: skipping %s.png: %s", fig, why)
        else:
            figures[fig] = str(path)

    cfg, names = run.config, run.names
    facts = [("run directory", str(run.path)), ("strategy", run.strategy), ("steps", run.total_steps),
             ("seed", run.seed), ("data seed", run.data_seed), ("subsets", f"{len(names)} ({', '.join(names)})"),
             ("buckets (K)", cfg.get("data", {}).get("num_buckets")),
             ("difficulty", cfg.get("data", {}).get("difficulty")), ("model init", cfg.get("model", {}).get("init")),
             ("actor updates", _updates(run)),
             ("training loop", _seconds(run.summary.get("train_loop_seconds"))),
             ("data preparation", _seconds(run.summary.get("prepare_seconds"))),
             ("wall time", _seconds(run.summary.get("wall_seconds")))]
    md = [f"# Run report: {run.name}", ""] + [f"- **{k}**: {v}" for k, v in facts if v is not None] + [""]
    md += ["## Held-out evaluation (eval.json)", "",
           f"On {run.eval_set('full')}. The curves of eval.png use {run.eval_set('periodic')}; "
           "with fewer rows, their values differ from this table's.", ""]
    before, after = run.eval.get("before", {}), run.eval.get("after", {})
    md += eval_table(before, after, names) if (before or after) else ["*No eval.json in this run.*"]
    macro = after.get("macro_avg", {})
    if macro:
        md += ["", "Macro average after training: " + ", ".join(
            f"{k} {_fmt(v)}" for k, v in macro.items() if k in ("loss", "ppl", *TASK_METRICS))]
    md += ["", "## Final global sampling probabilities", ""]
    pg = run.summary.get("p_global_final") or {}
    if not pg:
        last = ([run.start] if run.start else []) + [r for r in run.mixing if "p_global" in r]
        pg = dict(zip(run.names_for(len(last[-1]["p_global"])), last[-1]["p_global"])) if last else {}
    drawn = [r["drawn"] for r in run.metrics if "drawn" in r]
    share = np.array(drawn, float).sum((0, 2)) if drawn else None
    if pg:
        hdr = ["subset", "p_global final"] + (["share of drawn examples"] if share is not None else [])
        md += _table(hdr, [[n, _fmt(p)] + ([_fmt(share[i] / max(share.sum(), 1))] if share is not None
                                            and i < len(share) else []) for i, (n, p) in enumerate(pg.items())])
    else:
        md.append("*No probabilities logged.*")
    md += ["", f"**Mixing overhead**: {_overhead(run)}", "", "## Figures", ""]
    if "eval" in figures and not run.eval_log:
        md += ["*eval.png: no eval.jsonl in this run (periodic evaluation off or an older run); "
               "before/after only.*", ""]
    for fig in FIGURES:
        md.append(f"![{fig}]({fig}.png)" if fig in figures else f"- *{fig}.png skipped: {skipped[fig]}*")
        md.append("")
    (out / "report.md").write_text("\n".join(md))
    log.info("report: wrote %s", out / "report.md")
    return {"report": str(out / "report.md"), "figures": figures, "skipped": skipped}


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
    return f"{_fmt(stats['mean'])} ± {_fmt(stats['std'])}" if stats else "—"


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
        md += _table(["group", "n", "seeds", *subsets, "macro"],
                     [[g["label"], str(g["n"]), seeds[id(g)]] + [_mean_std(g["stats"].get(m, {}).get(s))
                                                                 for s in [*subsets, "macro"]] for g in groups])
        md.append("")
    md += ["## Time", "",
           "The training loop's seconds compare strategies; data preparation (tokenizing, the scorer's "
           "warm-up and scoring) is shared by runs of one mixture and near zero when it is reused.", ""]
    md += _table(["group", "n", "training loop s", "data preparation s"],
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hbo_jax.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    parser.add_argument("--out", default="report_compare", help="comparison output directory (several runs)")
    parser.add_argument("--metric", default=None,
                        help="compare only this metric (loss, ppl, acc, acc_norm, exact_match); "
                             "default: the loss and each task metric the runs have")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    try:
        runs = [load_run(d) for d in args.run_dirs]
    except NotARunDir as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for r in runs:
        print(f"{r.path}: {write_report(r.path)['report']}")
    if len(runs) > 1:
        print(f"comparison: {compare(runs, args.out, args.metric)['compare']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
