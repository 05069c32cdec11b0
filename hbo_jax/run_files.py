"""A finished run directory read back: its config, summary, logs and evaluations (`load_run`).

`report` (one run's report) and `compare` (several runs side by side) read runs through
this module, and format numbers and tables alike with `fmt` and `md_table`.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from hbo_jax.algorithm import config_sections
from hbo_jax.config import MixingConfig
from hbo_jax.config_keys import GROUP_IGNORE, flatten, matches
from hbo_jax.errors import ConfigError
from hbo_jax.mixing.strategy import SCALEBIO_LOCAL_KEYS, settings_that_matter

log = logging.getLogger("hbo_jax.report")

TASK_METRICS = ("acc", "acc_norm", "exact_match")
# Where each eval set's per-subset cap is configured.
EVAL_SETS = {"full": ("data", "max_eval_per_subset"), "periodic": ("eval", "periodic_max_per_subset")}


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



def fmt(v, digits: int = 4) -> str:
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
        return f"{v:.{digits}f}"
    return "—"


def md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]

