"""Matplotlib (Agg) figures of one run's logs and of a comparison between runs.

Every `plot_*` function takes a loaded run (`hbo_jax.run_files.Run`) and an output path and
returns `(path, None)` when it wrote the figure or `(None, reason)` when the run has no
data for it (an older run directory, or a strategy without actors or rewards).
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.colors as mcolors  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

Result = tuple[Path | None, str | None]


def _colors(n: int):
    return plt.get_cmap("tab10" if n <= 10 else "tab20")(np.arange(n) % 20)


def _grid(fig, n: int, top_rows: int = 0, cols: int = 5, top_ratio: float = 1.6):
    """A figure grid: `top_rows` full-width rows, then one small panel per subset."""
    cols = max(1, min(n, cols))
    rows = math.ceil(n / cols)
    grid = fig.add_gridspec(top_rows + rows, cols, height_ratios=[top_ratio] * top_rows + [1] * rows)
    tops = [fig.add_subplot(grid[r, :]) for r in range(top_rows)]
    panels = [fig.add_subplot(grid[top_rows + i // cols, i % cols]) for i in range(n)]
    return tops, panels


def _figure(n: int, top_rows: int, cols: int = 5):
    rows = math.ceil(n / max(1, min(n, cols)))
    return plt.figure(figsize=(max(10.0, 3.2 * min(n, cols) + 1.5), 3.2 * top_rows + 2.4 * rows),
                      constrained_layout=True)


def _save(fig, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _schedule(run):
    """(step edges [U+1], p_global [U, D], p_local [U, D, K]) of the probabilities in force."""
    recs = ([run.start] if run.start else []) + [r for r in run.mixing if "p_global" in r]
    if not recs:
        return None
    end = max(run.total_steps, recs[-1]["step"] + 1)
    edges = np.array([r["step"] for r in recs] + [end], float)
    pl = np.array([r["p_local"] for r in recs], float) if all("p_local" in r for r in recs) else None
    return edges, np.array([r["p_global"] for r in recs], float), pl


def plot_p_global(run, out: Path) -> Result:
    sched = _schedule(run)
    if sched is None:
        return None, "no probabilities_start.json and no mixing.jsonl records with p_global"
    edges, pg, _ = sched
    names = run.names_for(pg.shape[1])
    fig, ax = plt.subplots(figsize=(10, 4.5), constrained_layout=True)
    x = np.append(edges[:-1], edges[-1])
    ax.stackplot(x, np.vstack([pg, pg[-1:]]).T, labels=names, colors=_colors(len(names)), step="post", alpha=0.9)
    ax.set(xlim=(edges[0], edges[-1]), ylim=(0, 1), xlabel="training step", ylabel="p_global",
           title=f"{run.name}: global sampling probabilities (stacked)")
    handles, labels = ax.get_legend_handles_labels()  # top of the stack first
    ax.legend(handles[::-1], labels[::-1], loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    return _save(fig, out), None


def plot_p_local(run, out: Path) -> Result:
    sched = _schedule(run)
    if sched is None or sched[2] is None:
        return None, "no p_local in probabilities_start.json / mixing.jsonl"
    edges, _, pl = sched
    d, k = pl.shape[1], pl.shape[2]
    names = run.names_for(d)
    fig = _figure(d, 0)
    _, panels = _grid(fig, d)
    norm = local_norm(pl)
    mesh = None
    for i, ax in enumerate(panels):
        mesh = ax.pcolormesh(edges, np.arange(k + 1) + 0.5, pl[:, i, :].T, cmap="RdBu_r", norm=norm)
        ax.set_title(names[i], fontsize=9)
        ax.set_yticks(np.arange(1, k + 1), [f"b{j}" for j in range(1, k + 1)])
        ax.tick_params(labelsize=7)
    fig.colorbar(mesh, ax=panels, shrink=0.8, label=f"p_local (white: uniform 1/K = {1 / k:.3g})")
    fig.suptitle(f"{run.name}: local probabilities per subset (bucket x step; b1 = easiest); "
                 "red: sampled more than uniform, blue: less")
    return _save(fig, out), None


def local_norm(pl: np.ndarray) -> mcolors.Normalize:
    """The heatmaps' colour scale: centred on uniform (1/K), spanning the data's largest
    deviation from it, so the differences that exist fill the colour range (a 0-max scale
    paints cells of 0.19-0.33 alike)."""
    k = pl.shape[-1]
    return mcolors.CenteredNorm(vcenter=1 / k, halfrange=max(float(np.abs(pl - 1 / k).max()), 1e-6))


def _bucket_lines(panels, steps, values: np.ndarray, titles: list[str], **kw) -> None:
    """One panel per subset, one line per bucket: values [steps, subsets, buckets]."""
    for i, ax in enumerate(panels):
        for j in range(values.shape[2]):
            ax.plot(steps, values[:, i, j], label=f"b{j + 1}", **kw)
        ax.set_title(titles[i], fontsize=9)
        ax.tick_params(labelsize=7)
    panels[0].legend(fontsize=6, title="easy -> hard", title_fontsize=6)


def plot_rewards(run, out: Path) -> Result:
    glob = [r for r in run.mixing if "reward_global" in r]
    loc = [r for r in run.mixing if "reward_local" in r]
    if not glob and not loc:
        return None, "no actor rewards in mixing.jsonl (a fixed or replayed schedule)"
    d = len((glob or loc)[0]["reward_global" if glob else "reward_local"])
    names = run.names_for(d)
    fig = _figure(d if loc else 0, 1 if glob else 0)
    tops, panels = _grid(fig, d if loc else 0, top_rows=1 if glob else 0)
    if glob:
        ax, steps, r = tops[0], [x["step"] for x in glob], np.array([x["reward_global"] for x in glob])
        for i, c in enumerate(_colors(d)):
            ax.plot(steps, r[:, i], marker=".", color=c, label=names[i])
        ax.set(xlabel="step of the update", ylabel="reward", title="global reward per subset")
        ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    if loc:
        steps, r = [x["step"] for x in loc], np.array([x["reward_local"] for x in loc])
        _bucket_lines(panels, steps, r, [f"{n}: local reward" for n in names], marker=".")
    fig.suptitle(f"{run.name}: actor rewards per update")
    return _save(fig, out), None


def plot_drawn(run, out: Path) -> Result:
    recs = [r for r in run.metrics if "drawn" in r]
    if not recs:
        return None, "metrics.jsonl has no 'drawn' counts (written by newer train.py)"
    steps, drawn = [r["step"] for r in recs], np.array([r["drawn"] for r in recs], float)
    d = drawn.shape[1]
    names = run.names_for(d)
    fig = _figure(d, 1)
    tops, panels = _grid(fig, d, top_rows=1)
    tops[0].stackplot(steps, drawn.sum(2).T, labels=names, colors=_colors(d), alpha=0.9)
    tops[0].set(xlabel="training step", ylabel="examples per log interval",
                title="examples drawn per subset (stacked)")
    tops[0].legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    _bucket_lines(panels, steps, drawn, [f"{n} ({int(drawn[:, i].sum())} total)" for i, n in enumerate(names)])
    fig.suptitle(f"{run.name}: examples drawn per subset and bucket")
    return _save(fig, out), None


def plot_eval(run, out: Path) -> Result:
    curve = [r for r in run.eval_log if isinstance(r.get("eval"), dict)]
    before, after = run.eval.get("before", {}), run.eval.get("after", {})
    if not curve and not (before or after):
        return None, "no eval.jsonl and no eval.json"
    names = [n for n in run.names if n in after or n in before] or [n for n in after if n != "macro_avg"]
    colors = dict(zip(names, _colors(len(names))))
    sets = {which: run.eval_set(which, sep="\n") for which in ("full", "periodic")}  # one fact a line
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(14, 5), constrained_layout=True,
                                 gridspec_kw={"width_ratios": [1.4, 1]})
    if curve:
        steps = [r["step"] for r in curve]
        for n in [*names, "macro_avg"]:
            y = [r["eval"].get(n, {}).get("loss", np.nan) for r in curve]
            macro = n == "macro_avg"
            ax.plot(steps, y, marker=".", label=n, color="black" if macro else colors[n], lw=2.5 if macro else 1.2)
        ax.set(xlabel="training step", ylabel="held-out loss (periodic eval set)",
               title=f"during training (eval.jsonl):\n{sets['periodic']}")
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    else:
        ax.text(0.5, 0.5, "no eval.jsonl (periodic evaluation off or older run)", ha="center", va="center")
        ax.set_axis_off()
    bar_names = [n for n in [*names, "macro_avg"] if n in before or n in after]
    x = np.arange(len(bar_names))
    for off, (label, e) in zip((-0.2, 0.2), (("before", before), ("after", after))):
        bx.bar(x + off, [e.get(n, {}).get("loss", np.nan) for n in bar_names], 0.4, label=label)
    bx.set_xticks(x, bar_names, rotation=45, ha="right", fontsize=8)
    bx.set(ylabel="held-out loss (full eval set)",
           title=f"before vs after training (eval.json):\n{sets['full']}")
    bx.legend()
    fig.suptitle(f"{run.name}: held-out evaluation (the curves use a smaller eval set than the bars)")
    return _save(fig, out), None


def plot_compare(groups: list[dict], subsets: list[str], metrics: list[str], out: Path,
                 eval_sets: tuple[str, str] = ("", "")) -> Path:
    """One row of bars per metric (the full eval set): per subset and macro, the difference
    to the first group (the baseline) as mean ± std over seeds, so small effects stay
    visible across subsets of very different scale (one group alone: absolute values);
    macro eval loss curves (the periodic eval set) below. `eval_sets`: what the bars'
    and the curves' eval sets are, for the titles."""
    rows = len(metrics) + 1
    fig, axes = plt.subplots(rows, 1, figsize=(max(8.0, 1.1 * (len(subsets) + 1) * max(1, len(groups)) ** 0.5 + 4),
                                               4.5 * rows), constrained_layout=True, squeeze=False)
    colors = _colors(len(groups))
    for metric, ax in zip(metrics, axes[:-1, 0]):
        _compare_bars(ax, groups, subsets, metric, colors, eval_sets[0])
    bx = axes[-1, 0]
    for g, c in zip(groups, colors):
        if g.get("curve"):
            steps, m, s = (np.array(v, float) for v in zip(*g["curve"]))
            bx.plot(steps, m, marker=".", color=c, label=f"{g['label']} (n={g['n']})")
            bx.fill_between(steps, m - s, m + s, color=c, alpha=0.2)
    if any(g.get("curve") for g in groups):
        bx.set(xlabel="training step", ylabel="macro held-out loss (periodic eval set)",
               title="macro eval loss during training, mean ± std\nperiodic eval set (eval.jsonl)"
               + (f"; {eval_sets[1]}" if eval_sets[1] else ""))
        bx.legend(fontsize=8)
    else:
        bx.text(0.5, 0.5, "no eval.jsonl in these runs", ha="center", va="center")
        bx.set_axis_off()
    return _save(fig, out)


def _compare_bars(ax, groups: list[dict], subsets: list[str], metric: str, colors, eval_set: str) -> None:
    stats = [g["stats"].get(metric, {}) for g in groups]
    cols = [c for c in [*subsets, "macro"] if any(c in st for st in stats)] or ["macro"]
    base, relative = stats[0], len(groups) > 1
    shown = list(zip(groups, stats, colors))[1:] if relative else list(zip(groups, stats, colors))
    width = 0.8 / max(1, len(shown))
    x = np.arange(len(cols))
    for gi, (g, st, c) in enumerate(shown):
        mean = np.array([st[s]["mean"] if s in st else np.nan for s in cols])
        if relative:
            mean = mean - np.array([base[s]["mean"] if s in base else np.nan for s in cols])
        ax.bar(x + (gi - (len(shown) - 1) / 2) * width, mean, width, yerr=[st[s]["std"] if s in st else 0.0
                                                                          for s in cols],
               capsize=3, color=c, label=f"{g['label']} (n={g['n']})")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(x, cols, rotation=45, ha="right", fontsize=8)
    where = "full eval set (eval.json)" + (f"; {eval_set}" if eval_set else "")
    if relative:
        ax.set(ylabel=f"{metric} minus baseline", title=f"{metric} after training relative to {groups[0]['label']} "
               f"(n={groups[0]['n']}); error bars: std over seeds\n{where}")
    else:
        ax.set(ylabel=f"{metric} after training", title=f"{metric} per subset, mean ± std over seeds\n{where}")
    ax.legend(fontsize=8)
