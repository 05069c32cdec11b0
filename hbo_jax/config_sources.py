"""Where a run's configuration comes from: YAML files composed in order, then dotted overrides.

`--config A.yaml --config B.yaml key=value` merges the defaults, A, B and the overrides in
that order: a later source wins key by key (dictionaries such as `data.subsets` merge by
key, lists are replaced). `ConfigSources` remembers which source set each key, so the
run's `config.yaml` and log say which files were merged and what each one set.

Relative input paths written in a YAML file are read from that file's folder, so a
mixture YAML can sit next to its data and be used from anywhere: `data.source_dir`,
`data.subsets.*.train` / `.eval`, `data.embedded_archives`, `data.tokenizer` and the
path of an `hf:` / `gguf:` `model.init`. Where runs live (`run_dir`,
`mixing.replay_from`: another run's directory) and `data.cache_dir` stay relative to the
current directory, like the run directories on the command line (`configs/replay.yaml`
replays `runs/demo`), as do all paths given as dotted overrides.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf

from hbo_jax.config_keys import flatten
from hbo_jax.errors import ConfigError

COMMAND_LINE = "command line"
_INIT_PREFIXES = ("hf:", "gguf:")
# Dictionaries whose keys are names the user chose: provenance is kept per entry, not per leaf.
_NAMED = ("data.subsets.", "eval.metrics.")


def _is_relative(path: str) -> bool:
    return bool(path) and not (os.path.isabs(path) or path.startswith("~") or "://" in path
                               or path.startswith("tfds:"))


def _from(folder: Path, path: str) -> str:
    return os.path.normpath(os.path.join(folder, path)) if _is_relative(path) else path


def _resolve_paths(tree: dict, folder: Path) -> None:
    """Makes the relative input paths of one YAML file's tree absolute, from `folder` (in place)."""
    data, model = (tree.get(k) if isinstance(tree.get(k), dict) else {} for k in ("data", "model"))
    if isinstance(data.get("source_dir"), str):
        data["source_dir"] = _from(folder, data["source_dir"])
    if isinstance(data.get("tokenizer"), str) and data["tokenizer"] != "train":
        data["tokenizer"] = _from(folder, data["tokenizer"])
    if isinstance(data.get("embedded_archives"), list):
        data["embedded_archives"] = [_from(folder, p) if isinstance(p, str) else p for p in data["embedded_archives"]]
    for sub in (data.get("subsets") or {}).values():
        for split in ("train", "eval"):
            if isinstance(sub, dict) and isinstance(sub.get(split), list):
                sub[split] = [_from(folder, p) if isinstance(p, str) else p for p in sub[split]]
    init = model.get("init")
    if isinstance(init, str) and init.startswith(_INIT_PREFIXES):
        prefix, path = init.split(":", 1)
        model["init"] = f"{prefix}:{_from(folder, path)}"


def read_yaml(path: str | os.PathLike, paths_from_file: bool = True) -> dict:
    """One config file as a plain dict, its relative input paths read from its folder.

    Args:
        path: The YAML file.
        paths_from_file: Resolve relative input paths from the file's folder (False for a
            run's own `config.yaml`, whose paths are as the run was given them).

    Raises:
        ConfigError: The file is missing, is not YAML, or is not a mapping.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        tree = OmegaConf.to_container(OmegaConf.load(p), resolve=False)
    except yaml.YAMLError as e:  # e.g. a subset name declared twice
        raise ConfigError(f"{p}: {' '.join(str(e).split())}") from None
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{p}: a config file is a mapping of keys (run_dir: ..., train: ...), not a list")
    if paths_from_file:
        _resolve_paths(tree, p.parent.absolute())
    return tree


def _keys(tree: dict) -> list[str]:
    """The dotted keys a source sets; a user-named entry (`data.subsets.code`) counts as one key."""
    out = []
    for key in flatten(tree):
        named = next((p for p in _NAMED if key.startswith(p)), None)
        if named:
            key = named + key[len(named):].split(".")[0]
        if key not in out:
            out.append(key)
    return out


@dataclass
class ConfigSources:
    """The files and overrides a configuration was composed from, and which one set each key."""

    files: list[str] = field(default_factory=list)
    overrides: list[str] = field(default_factory=list)
    set_by: dict[str, str] = field(default_factory=dict)  # dotted key -> file, or COMMAND_LINE
    # (key, earlier source, later source) where a later source replaced an earlier one's value.
    replaced: list[tuple[str, str, str]] = field(default_factory=list)

    def add(self, source: str, tree: dict[str, Any]) -> None:
        """Records the keys one source sets (call in merge order)."""
        for key in _keys(tree):
            if key in self.set_by and self.set_by[key] != source:
                self.replaced.append((key, self.set_by[key], source))
            self.set_by[key] = source

    def by_source(self) -> dict[str, list[str]]:
        """Source -> the keys whose final value it gave, in merge order."""
        out: dict[str, list[str]] = {s: [] for s in [*self.files, COMMAND_LINE]}
        for key, source in self.set_by.items():
            out[source].append(key)
        return {s: keys for s, keys in out.items() if keys}

    def lines(self) -> list[str]:
        """What the log and the header of the run's config.yaml say, one line each."""
        order = [*self.files, *([f"{COMMAND_LINE}: {' '.join(self.overrides)}"] if self.overrides else [])]
        out = ["merged in this order, later wins: defaults (hbo_jax/config.py)" + "".join(f", {s}" for s in order)]
        out += [f"from {source}: {', '.join(keys)}" for source, keys in self.by_source().items()]
        out += [f"{key}: {later} replaced the value from {earlier}" for key, earlier, later in self.replaced]
        return out

    def header(self) -> str:
        """The lines as a YAML comment block (YAML readers ignore it)."""
        return "".join(f"# {line}\n" for line in ["resolved configuration of this run", *self.lines()])
