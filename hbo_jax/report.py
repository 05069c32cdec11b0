"""Plots of what the actors did (matplotlib PNG) from a run directory's logs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def probability_plot(run_dir: str | Path, names: list[str], total_steps: int) -> Path:
    """Global probabilities as a stacked area over steps, local probabilities per subset.

    Reads `mixing.jsonl` (one record per actor update, with the probabilities in force
    from that step on) and the initial probabilities in `probabilities_start.json`.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    start = json.loads((run_dir / "probabilities_start.json").read_text())
    records = [start] + [r for r in read_jsonl(run_dir / "mixing.jsonl") if "p_global" in r]
    steps = [r["step"] for r in records] + [total_steps]
    pg = np.array([r["p_global"] for r in records] + [records[-1]["p_global"]])
    pl = np.array([r["p_local"] for r in records] + [records[-1]["p_local"]])
    d, k = pl.shape[1], pl.shape[2]

    cols = min(d, 5)
    rows = math.ceil(d / cols)
    fig = plt.figure(figsize=(3.2 * cols, 3.0 + 2.4 * rows), constrained_layout=True)
    grid = fig.add_gridspec(1 + rows, cols, height_ratios=[1.6] + [1] * rows)
    ax = fig.add_subplot(grid[0, :])
    colors = plt.get_cmap("tab10" if d <= 10 else "tab20")(np.arange(d))
    ax.stackplot(steps, pg.T, labels=names, colors=colors, step="post", alpha=0.9)
    ax.set_xlim(0, total_steps)
    ax.set_ylim(0, 1)
    ax.set_ylabel("p_global")
    ax.set_title("Global sampling probabilities (stacked)")
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    for i in range(d):
        a = fig.add_subplot(grid[1 + i // cols, i % cols])
        for j in range(k):
            a.step(steps, pl[:, i, j], where="post", label=f"bucket {j + 1}")
        a.set_title(names[i], fontsize=9)
        a.set_ylim(0, max(0.5, float(pl[:, i].max()) * 1.1))
        a.tick_params(labelsize=7)
        if i == 0:
            a.legend(fontsize=6, title="easy -> hard", title_fontsize=6)
    fig.suptitle(f"{run_dir.name}: sampling probabilities over training steps")
    out = run_dir / "probabilities.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
