"""The tables and figures of a study (`benchmarks/study.py`), from its result JSON files alone.

Every number in the docs section comes from `<results>/<arm>/seed<S>.json`; rerunning
`python benchmarks/study.py --report-only` rewrites the same section and figures.

Metrics, per arm and seed, on the held-out rows of every subset:
  - macro relative loss reduction: the mean over subsets of (loss before - loss after) /
    loss before. The raw macro loss is also shown, but one high-loss subset can decide
    it (a 4.0 -> 3.6 subset moves it as much as ten 0.4 -> 0.36 ones).
  - macro accuracy (multiple-choice subsets) and exact match (short-answer subsets).
Comparisons against the best static arm (the static arm with the highest mean macro
relative loss reduction, over at least two seeds once any static arm has two, on the seeds
those arms share) are paired
by seed: seed S of both arms saw the same prepared data and starting model. An arm
"beats" it when its mean paired difference is positive and larger than the seed spread
(the larger of the two arms' standard deviations over seeds) and every paired difference
is positive. A merge arm has no training seeds of its own (its values are draws over one
fixed set of replicas), so it is compared unpaired and said to be above or below every
seed of the best static arm, never to beat it.
"""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

TASK_METRICS = (("acc", "accuracy (mc)"), ("exact_match", "exact match"))
PRIMARY = "rel_reduction"


def load_results(results: Path) -> dict[str, dict[int, dict]]:
    """arm -> seed -> result, for every result file under `results`."""
    out: dict[str, dict[int, dict]] = {}
    for path in sorted(results.glob("*/seed*.json")):
        res = json.loads(path.read_text())
        out.setdefault(res["arm"], {})[int(res["seed"])] = res
    return out


def subset_names(res: dict) -> list[str]:
    """The subsets in the mixture's order (the result file's keys are sorted)."""
    names = [k for k in res["before"] if k != "macro_avg"]
    order = [s for s in res.get("subsets") or [] if s in names]
    return order + [s for s in names if s not in order]


def rel_reductions(res: dict) -> dict[str, float]:
    """(before - after) / before of each subset's held-out loss."""
    return {s: (res["before"][s]["loss"] - res["after"][s]["loss"]) / res["before"][s]["loss"]
            for s in subset_names(res) if res["before"][s].get("loss") and res["after"].get(s, {}).get("loss")}


def metrics(res: dict) -> dict[str, float]:
    """The macro metrics of one arm and seed."""
    rr = rel_reductions(res)
    out = {PRIMARY: statistics.mean(rr.values()), "loss": res["after"]["macro_avg"]["loss"]}
    for key, _ in TASK_METRICS:
        if key in res["after"]["macro_avg"]:
            out[key] = res["after"]["macro_avg"][key]
    return out


def _ms(vals: list[float], digits: int = 4) -> str:
    if not vals:
        return "-"
    if len(vals) == 1:
        return f"{vals[0]:.{digits}f} (1 seed)"
    return f"{statistics.mean(vals):.{digits}f} ± {statistics.stdev(vals):.{digits}f}"


def _sd(vals: list[float]) -> float:
    return statistics.stdev(vals) if len(vals) > 1 else 0.0


def best_static(table: dict[str, dict[int, dict]], static: list[str]) -> str | None:
    """The static arm with the highest mean macro relative loss reduction, among those with at least
    two seeds while any has (one seed is no evidence of being the best: a lucky seed would make
    every paired comparison a one-seed one); among all of them before. The means are over the
    seeds the candidates share, when they share any: an arm with a third seed is not judged on
    data orders the others never saw."""
    have = [a for a in static if table.get(a)]
    if not have:
        return None
    candidates = [a for a in have if len(table[a]) >= 2] or have
    common = set.intersection(*(set(table[a]) for a in candidates))
    return max(candidates, key=lambda a: statistics.mean(
        m[PRIMARY] for seed, m in table[a].items() if not common or seed in common))


def summary_rows(per_arm: dict[str, dict[int, dict]], before: dict) -> list[str]:
    keys = [PRIMARY, "loss"] + [k for k, _ in TASK_METRICS]
    rows = ["| arm | seeds | macro rel. loss reduction | macro loss after | "
            + " | ".join(h for _, h in TASK_METRICS) + " |", "|---|---|---:|---:|" + "---:|" * len(TASK_METRICS)]
    rows.append("| starting model | - | 0 | " + f"{before['loss']:.4f} | "
                + " | ".join(f"{before[k]:.4f}" if k in before else "-" for k, _ in TASK_METRICS) + " |")
    for arm, seeds in per_arm.items():
        cells = [_ms([m[k] for m in seeds.values() if k in m]) for k in keys]
        rows.append(f"| {arm} | {','.join(map(str, sorted(seeds)))} | " + " | ".join(cells) + " |")
    return rows


def _verdict(a: list[float], b: list[float], diffs: list[float], spread: float, best: str, paired: bool) -> str:
    """An arm's verdict against the best static arm on the primary metric.

    Paired (a trained arm): it beats the best static arm when its mean paired difference
    exceeds the seed spread and every paired difference is positive. Unpaired (a merge:
    its values are its merge seeds' draws over one fixed set of replicas, not training
    seeds): it is above every seed of the best static arm and by more than the spread;
    one set of replicas says nothing of how a merge of other replicas would do, and the
    verdict says so.
    """
    d = statistics.mean(diffs)
    if not paired:
        if len(b) < 2:
            return f"one seed of {best}: no verdict"
        if min(a) > max(b) and d > spread:
            return f"above every seed of {best} by more than the seed spread (one set of replicas, unpaired)"
        if max(a) < min(b) and -d > spread:
            return f"below every seed of {best} by more than the seed spread (one set of replicas, unpaired)"
        return "within the seed spread (unpaired)"
    if len(a) < 2 or len(b) < 2:
        verdict = "one seed: no verdict"
    elif d > spread and all(x > 0 for x in diffs):
        verdict = "**beats it** (by more than the seed spread)"
    elif -d > spread and all(x < 0 for x in diffs):
        verdict = "worse (by more than the seed spread)"
    else:
        verdict = "within the seed spread"
    return verdict + " (per seed: " + ", ".join(f"{x:+.4f}" for x in diffs) + ")"


def paired_rows(per_arm: dict[str, dict[int, dict]], best: str, merge_arms: set[str]) -> tuple[list[str], dict]:
    """Differences against the best static arm, per metric; and each arm's verdict on the primary metric."""
    keys = [PRIMARY, "loss"] + [k for k, _ in TASK_METRICS]
    rows = [f"| arm (minus {best}) | paired seeds | " + " | ".join(
        ["macro rel. loss reduction", "macro loss after"] + [h for _, h in TASK_METRICS]) + " | verdict |",
        "|---|---|" + "---:|" * len(keys) + "---|"]
    verdicts = {}
    for arm, seeds in per_arm.items():
        if arm == best:
            continue
        cells, verdict = [], "-"
        common = sorted(set(seeds) & set(per_arm[best])) if arm not in merge_arms else []
        for k in keys:
            a = [seeds[s][k] for s in common if k in seeds[s]] if common else [m[k] for m in seeds.values() if k in m]
            b = [per_arm[best][s][k] for s in common if k in per_arm[best][s]] if common else \
                [m[k] for m in per_arm[best].values() if k in m]
            if not a or not b:
                cells.append("-")
                continue
            diffs = [x - y for x, y in zip(a, b)] if common else [statistics.mean(a) - statistics.mean(b)]
            d = statistics.mean(diffs)
            spread = max(_sd(a), _sd(b))
            sign = "+" if d >= 0 else ""
            cells.append(f"{sign}{d:.4f} (spread {spread:.4f})" + ("" if common else " unpaired"))
            if k == PRIMARY:
                verdict = _verdict(a, b, diffs, spread, best, paired=bool(common)) if common or arm in merge_arms \
                    else f"no seed in common with {best}: no verdict"
                verdicts[arm] = (d, spread, verdict)
        pairs = ",".join(map(str, common)) if common else "unpaired (merge seeds)"
        rows.append(f"| {arm} | {pairs} | " + " | ".join(cells) + f" | {verdict} |")
    return rows, verdicts


def merge_rows(study, per_arm: dict[str, dict[int, dict]]) -> list[str]:
    """Each merge arm against the single runs it merged: the replicas' mean ± sd, their best, and
    the merge (mean over its merge seeds), on the primary metric and the macro loss."""
    rows = ["| merge | method | replicas (seeds of) | replicas: rel. loss reduction | best replica | merge "
            "| merge minus replicas' mean | replicas: macro loss | merge: macro loss |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for a in study.arms:
        if not a.merge or a.name not in per_arm:
            continue
        want = a.merge.get("replica_seeds", [0, 1, 2])
        reps = [per_arm.get(a.merge["of"], {}).get(s) for s in want]
        if any(r is None for r in reps):
            continue
        merged = list(per_arm[a.name].values())
        rr, mm = [r[PRIMARY] for r in reps], [m[PRIMARY] for m in merged]
        method = a.merge.get("method", "select") + (" + resample" if a.merge.get("resample") else "")
        rows.append(f"| {a.name} | {method} | {a.merge['of']} {','.join(map(str, want))} | {_ms(rr)} | "
                    f"{max(rr):.4f} | {_ms(mm)} | {statistics.mean(mm) - statistics.mean(rr):+.4f} | "
                    f"{_ms([r['loss'] for r in reps])} | {_ms([m['loss'] for m in merged])} |")
    return rows if len(rows) > 2 else []


def subset_rows(per_arm: dict[str, dict[int, dict]], subsets: list[str]) -> list[str]:
    rows = ["| arm | " + " | ".join(subsets) + " |", "|---|" + "---:|" * len(subsets)]
    for arm, seeds in per_arm.items():
        rr = [rel_reductions(r) for r in seeds.values()]
        rows.append(f"| {arm} | " + " | ".join(
            f"{statistics.mean(x[s] for x in rr):.3f}" if all(s in x for x in rr) else "-" for s in subsets) + " |")
    return rows


def task_subset_rows(per_arm: dict[str, dict[int, dict]], subsets: list[str], first: dict) -> list[str]:
    """Per task subset: its metric before and after (mean over seeds) per arm, with its base rates."""
    tasks = [s for s in subsets if first["before"][s].get("metric") in ("mc", "exact_match")]
    if not tasks:
        return []
    head = ["| subset | metric | rows | chance | majority answer | before (most common answer's share) | "
            + " | ".join(per_arm) + " | most common answer's share after (max over runs) |",
            "|---|---|---:|---:|---:|---:|" + "---:|" * len(per_arm) + "---:|"]
    for s in tasks:
        b = first["before"][s]
        key = "acc" if b["metric"] == "mc" else "exact_match"
        if key not in b:
            continue
        after = []
        shares = []
        for seeds in per_arm.values():
            vals = [r["after"][s][key] for r in seeds.values() if key in r["after"].get(s, {})]
            shares += [r["after"][s]["pred_share"] for r in seeds.values() if "pred_share" in r["after"].get(s, {})]
            after.append(f"{statistics.mean(vals):.3f}" if vals else "-")
        chance = f"{b['chance']:.3f}" if "chance" in b else "-"
        maj = f"{b['majority']:.3f}" if "majority" in b else "-"
        share = f" ({b['pred_share']:.2f})" if "pred_share" in b else ""
        top = f"{max(shares):.2f}" if shares else "-"
        head.append(f"| {s} | {b['metric']} | {b.get('task_examples', b.get('examples', '-'))} | {chance} | {maj} | "
                    f"{b[key]:.3f}{share} | " + " | ".join(after) + f" | {top} |")
    return head


def time_rows(per_arm: dict[str, dict[int, dict]]) -> list[str]:
    """Mean seconds per arm: the training loop, and the whole run less its data preparation (the
    base model scoring the mixture happens once per machine and cache, in whichever run comes first:
    counted in that run it would make one arm look slower); the preparations taken are listed below."""
    rows = ["| arm | training loop, s (mean) | whole run less data preparation, s (mean) |", "|---|---:|---:|"]
    prepared = []
    for arm, seeds in per_arm.items():
        loop = [r["seconds"]["train_loop_seconds"] for r in seeds.values() if r["seconds"].get("train_loop_seconds")]
        wall = []
        for seed, r in seeds.items():
            # the run's own wall clock (evaluations included); a merge's is the study's clock around it
            w = r["seconds"].get("wall_seconds") or r["seconds"].get("study_wall")
            prep = r["seconds"].get("prepare_seconds") or 0.0
            if w:
                wall.append(w - prep)
            if prep >= 60:
                prepared.append(f"{arm} seed {seed}: {prep:.0f} s")
        rows.append(f"| {arm} | {statistics.mean(loop):.0f} | " if loop else f"| {arm} | - | ")
        rows[-1] += f"{statistics.mean(wall):.0f} |" if wall else "- |"
    if prepared:
        rows += ["", "Data preparations (a minute or more, in the run that found no prepared data): "
                 + "; ".join(prepared) + "."]
    return rows


def paired_differences(table: dict[str, dict[int, dict]], best: str, subsets: list[str],
                       merge_arms: set[str]) -> dict[str, tuple[str, list[list[float]]]]:
    """Each other arm's relative loss reduction minus the best static arm's, per subset and then the
    macro (the last column), one row per seed: paired by seed where the two share seeds, else (a merge
    arm, whose seeds are draws over one replica set) each of its values minus the best arm's mean.

    Returns:
        arm -> (how it is paired, for the figure's titles; rows of len(subsets) + 1 differences).
    """
    def row(res: dict) -> list[float]:
        rr = rel_reductions(res)
        return [rr.get(s, float("nan")) for s in subsets] + [statistics.mean(rr.values())]

    ref = {seed: row(res) for seed, res in table[best].items()}
    ref_mean = [statistics.mean(col) for col in zip(*ref.values())]
    out = {}
    for arm, seeds in table.items():
        common = sorted(set(seeds) & set(ref)) if arm not in merge_arms else []
        if arm == best or not (common or arm in merge_arms):
            continue
        if common:
            out[arm] = (f"paired seed{'s' if len(common) > 1 else ''} " + ",".join(map(str, common)),
                        [[a - b for a, b in zip(row(seeds[s]), ref[s])] for s in common])
        else:
            out[arm] = (f"unpaired: minus {best}'s mean", [[a - b for a, b in zip(row(r), ref_mean)]
                                                           for r in seeds.values()])
    return out


def _paired_figure(diffs: dict[str, tuple[str, list[list[float]]]], best: str, subsets: list[str],
                   path: Path) -> Path:
    """Small multiples, one panel per arm: each seed's difference per subset (dots) and their mean (bar)."""
    import matplotlib.pyplot as plt
    import numpy as np

    cols = min(4, len(diffs))
    rows = -(-len(diffs) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols + 0.6, 2.6 * rows + 0.9), sharex=True, sharey=True,
                             squeeze=False)
    x = np.arange(len(subsets) + 1)
    for ax, (arm, (how, per_seed)) in zip(axes.flat, diffs.items()):
        d = np.array(per_seed)
        mean = np.nanmean(d, axis=0)
        ax.bar(x, mean, 0.7, color=np.where(mean >= 0, "tab:green", "tab:red"), alpha=0.45)
        for r in d:
            ax.plot(x, r, "o", ms=2.5, color="k")
        ax.axhline(0, color="k", lw=0.6)
        ax.axvline(len(subsets) - 0.5, color="grey", lw=0.5, ls=":")
        ax.set_title(f"{arm}\n({how})", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes.flat[len(diffs):]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xticks(x, subsets + ["macro"], rotation=60, ha="right", fontsize=7)
    for ax in axes[:, 0]:
        ax.set_ylabel(f"minus {best}", fontsize=8)
    fig.suptitle(f"Relative loss reduction minus {best}'s, per subset (dots: seeds; bars: their mean)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def figures(per_arm: dict[str, dict[int, dict]], subsets: list[str], out_prefix: Path, best: str | None = None,
            merge_arms: set[str] = frozenset()) -> list[Path]:
    """The compare figure (relative loss reduction per subset and arm), each arm's per-subset difference
    to the best static arm (with `best`), and the learned probabilities."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    paths = []
    arms = list(per_arm)
    cols = subsets + ["macro"]
    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(cols) + 2), 4.5))
    width = 0.8 / max(len(arms), 1)
    colors = plt.get_cmap("tab20")(np.arange(len(arms)) % 20)  # tab10's ten colours repeat past ten arms
    for i, arm in enumerate(arms):
        rr = [rel_reductions(r) for r in per_arm[arm].values()]
        per_seed = np.array([[x.get(s, np.nan) for s in subsets] + [np.mean(list(x.values()))] for x in rr])
        mean = np.nanmean(per_seed, axis=0)
        sd = np.nanstd(per_seed, axis=0, ddof=1) if len(per_seed) > 1 else np.zeros_like(mean)
        ax.bar(np.arange(len(cols)) + i * width - 0.4 + width / 2, mean, width, yerr=sd, label=arm, capsize=1.5,
               color=colors[i])
    ax.set_xticks(np.arange(len(cols)), cols, rotation=30, ha="right")
    ax.set_ylabel("relative loss reduction\n(before - after) / before")
    ax.set_title("Held-out loss reduction per subset (mean over seeds; bars: sd)")
    ax.legend(fontsize=7, ncol=2)
    ax.axhline(0, color="k", lw=0.5)
    fig.tight_layout()
    paths.append(out_prefix.with_name(out_prefix.name + "_compare.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    diffs = paired_differences(per_arm, best, subsets, merge_arms) if best else {}
    if diffs:
        paths.append(_paired_figure(diffs, best, subsets, out_prefix.with_name(out_prefix.name + "_paired.png")))

    learned = {a: s for a, s in per_arm.items() if any(_moves(r["mixing"]) for r in s.values())}
    if learned:
        n = len(learned)
        fig, axes = plt.subplots(1, n, figsize=(4 * n, 3.6), sharey=True, squeeze=False)
        for ax, (arm, seeds) in zip(axes[0], learned.items()):
            seed = min(seeds)
            mix = seeds[seed]["mixing"]
            p = np.array(mix["p_global"])
            for j, name in enumerate(subsets[: p.shape[1]]):
                ax.plot(mix["step"], p[:, j], label=name)
            ax.set_title(f"{arm} (seed {seed})")
            ax.set_xlabel("step")
        axes[0][0].set_ylabel("probability of the subset")
        axes[0][-1].legend(fontsize=6, loc="upper right")
        fig.tight_layout()
        paths.append(out_prefix.with_name(out_prefix.name + "_p_global.png"))
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def _moves(mix: dict) -> bool:
    p = mix.get("p_global") or []
    return len(p) > 1 and any(abs(a - b) > 1e-9 for a, b in zip(p[0], p[-1]))


def section(study, results: Path, docs: Path, study_path: Path) -> tuple[str, list[Path]]:
    """The generated markdown of a study and the figures it refers to."""
    table = load_results(results)
    order = [a.name for a in study.arms if a.name in table]
    table = {a: table[a] for a in order}  # the study's order; results of arms it no longer has are left out
    per_arm = {a: {s: metrics(r) for s, r in sorted(table[a].items())} for a in order}
    rel = lambda p: Path(p).resolve().relative_to(docs.resolve().parent.parent) \
        if Path(p).resolve().is_relative_to(docs.resolve().parent.parent) else Path(p)  # noqa: E731
    lines = [f"Study file `{rel(study_path)}`; raw results `{rel(results)}/<arm>/seed<S>.json`; regenerate "
             f"this section and its figures with `python benchmarks/study.py --study {rel(study_path)} --report-only` "
             "(without `--report-only` it first trains whatever arm and seed has no result yet).", ""]
    if not order:
        return "\n".join(lines + ["No results yet."]), []
    first = table[order[0]][min(table[order[0]])]
    subsets = subset_names(first)
    merge_arms = {a.name for a in study.arms if a.merge}
    lines += ["Shared settings (after the study's configs): `" + " ".join(study.overrides) + "`.", ""]
    for a in study.arms:
        if a.name in table:
            what = (f"merge of `{a.merge['of']}` seeds {a.merge.get('replica_seeds', [0, 1, 2])}: method="
                    + a.merge.get("method", "select")
                    + "".join(f" {k}={v}" for k, v in a.merge.items() if k not in ("of", "replica_seeds", "method"))
                    ) if a.merge else " ".join([Path(c).name for c in a.configs] + a.overrides) or "(shared only)"
            lines.append(f"- `{a.name}`: {what}")
    lines += ["", "### Macro metrics (mean ± sd over seeds)", ""]
    lines += summary_rows(per_arm, {"loss": first["before"]["macro_avg"]["loss"],
                                   **{k: first["before"]["macro_avg"][k] for k, _ in TASK_METRICS
                                      if k in first["before"]["macro_avg"]}})
    best = best_static(per_arm, study.static_arms)
    if best:
        rows, _ = paired_rows(per_arm, best, merge_arms)
        lines += ["", f"### Against the best static arm ({best}), paired by seed", "",
                  "Differences of the arm minus the best static arm (higher is better except loss); "
                  "spread: the larger seed standard deviation of the two arms.", ""] + rows
    merges = merge_rows(study, per_arm)
    if merges:
        lines += ["", "### Merged data-order replicas against the single runs they merged", "",
                  "The replicas are one arm's runs at different data seeds (same start, settings and initial "
                  "probabilities); the merge's column is the mean ± sd over its merge seeds (the draw of "
                  "each element's run), one value for an average.", ""] + merges
    lines += ["", "### Relative loss reduction per subset (mean over seeds)", ""] + subset_rows(table, subsets)
    tasks = task_subset_rows(table, subsets, first) if table else []
    if tasks:
        lines += ["", "### Task metrics per subset, with their base rates", "",
                  "chance: picking an option at random; majority answer: always giving the most common reference; "
                  "most common answer's share: how many rows got the model's most common answer (1.00: the same "
                  "answer to every question, a base rate, not knowledge).", ""] + tasks
    lines += ["", "### Time per run", ""] + time_rows(table)
    figs = figures(table, subsets, docs.parent / f"study_{study.name}", best, merge_arms)
    lines += [""] + [f"![{p.stem}]({p.name})" for p in figs]
    return "\n".join(lines), figs


def write_docs(study, results: Path, docs: Path, study_path: Path) -> None:
    """Rewrites the study's section of `docs` (between its markers; appended when absent)."""
    body, _ = section(study, results, docs, study_path)
    begin, end = f"<!-- study:{study.name}:begin -->", f"<!-- study:{study.name}:end -->"
    text = docs.read_text() if docs.is_file() else ""
    block = f"{begin}\n{body}\n{end}"
    if begin in text and end in text:
        text = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + f"\n\n## Study: {study.name}\n\n{block}\n"
    docs.parent.mkdir(parents=True, exist_ok=True)
    docs.write_text(text)
    print(f"wrote {docs}")
