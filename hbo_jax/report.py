"""`python -m hbo_jax.report RUN_DIR [RUN_DIR ...] [--out DIR] [--metric M]`: reports.

One run directory -> `<run_dir>/report/`: p_global.png, p_local.png, rewards.png,
drawn.png, eval.png and report.md (run facts, before/after table, final p_global,
mixing overhead). A figure whose data the run did not log (rewards of a fixed schedule,
`drawn` counts or eval.jsonl of an older run) is skipped, logged and noted in report.md.

Several run directories -> each one's report, plus a comparison in `--out`
(default `report_compare/`, `hbo_jax.compare`): compare.md, compare.json and compare.png,
for the loss and each task metric the runs have (or `--metric` alone), with seed
replicas grouped as mean ± std.

Two eval sets: the tables (eval.json) use the full one (`data.max_eval_per_subset` rows
per subset at most), the curves (eval.jsonl) the small periodic one
(`eval.periodic_max_per_subset`); figures and reports say which they show.

`train.py` calls `write_report(run_dir)` at the end of a run (process 0 only).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np

from hbo_jax.compare import compare
from hbo_jax.run_files import TASK_METRICS, NotARunDir, Run, fmt, load_run, md_table

log = logging.getLogger("hbo_jax.report")

FIGURES = ("p_global", "p_local", "rewards", "drawn", "eval")


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
        row = [n, fmt(b.get("loss")), fmt(a.get("loss")), fmt(b.get("ppl")), fmt(a.get("ppl")), kind or "—"]
        row += [fmt(e.get(m)) for m in tasks for e in (b, a)]
        rows.append(row + [_rows_used(a or b)])
    return md_table(header, rows)


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
            f"{k} {fmt(v)}" for k, v in macro.items() if k in ("loss", "ppl", *TASK_METRICS))]
    md += ["", "## Final global sampling probabilities", ""]
    pg = run.summary.get("p_global_final") or {}
    if not pg:
        last = ([run.start] if run.start else []) + [r for r in run.mixing if "p_global" in r]
        pg = dict(zip(run.names_for(len(last[-1]["p_global"])), last[-1]["p_global"])) if last else {}
    drawn = [r["drawn"] for r in run.metrics if "drawn" in r]
    share = np.array(drawn, float).sum((0, 2)) if drawn else None
    if pg:
        hdr = ["subset", "p_global final"] + (["share of drawn examples"] if share is not None else [])
        md += md_table(hdr, [[n, fmt(p)] + ([fmt(share[i] / max(share.sum(), 1))] if share is not None
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
