"""Held-out loss and perplexity per subset (and macro average)."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from hbo_jax.data.prepare import score_examples


def heldout_loss(nll_fn, params, stores: Sequence, names: Sequence[str], mesh, seq_len: int,
                 pad_id: int, max_per_subset: int, batch_size: int) -> dict[str, dict[str, float]]:
    """Token-weighted response NLL and perplexity on each subset's eval split."""
    out = {}
    for name, store in zip(names, stores):
        n = min(len(store), max_per_subset)
        if n == 0:
            continue
        exs = [store[i] for i in range(n)]
        nll = score_examples(exs, nll_fn, params, mesh, seq_len, pad_id, batch_size)
        tokens = np.array([m[1:].sum() for _, m in exs], np.float64)
        loss = float((nll * tokens).sum() / tokens.sum())
        out[name] = {"loss": loss, "ppl": math.exp(loss), "examples": n}
    if out:
        macro = float(np.mean([v["loss"] for v in out.values()]))
        out["macro_avg"] = {"loss": macro, "ppl": math.exp(macro),
                            "examples": int(sum(v["examples"] for v in out.values()))}
    return out


def format_table(before: dict, after: dict) -> str:
    """A plain-text table of held-out loss / perplexity before and after training."""
    rows = [f"{'subset':<20} {'loss before':>11} {'loss after':>10} {'ppl before':>10} {'ppl after':>9}"]
    for name in after:
        b, a = before.get(name, {}), after[name]
        rows.append(f"{name:<20} {b.get('loss', float('nan')):>11.3f} {a['loss']:>10.3f} "
                    f"{b.get('ppl', float('nan')):>10.2f} {a['ppl']:>9.2f}")
    return "\n".join(rows)
