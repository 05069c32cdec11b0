"""The subsets of a `data.source_dir`: two directory layouts, any supported input kind.

    DIR/<subset>.train.<ext>   DIR/<subset>.eval.<ext>      files side by side
    DIR/<subset>/train.<ext>   DIR/<subset>/eval.<ext>      one folder per subset

`<ext>` is any file kind `hbo_jax.data.sources` reads (`.jsonl`, `.jsonl.gz`, `.parquet`);
in a subset folder, `train` / `eval` may also be a `datasets` save_to_disk or TFDS
directory, the eval input may be named `validation` or `test` instead, and the folder
itself may be a saved `datasets` DatasetDict (its train split, and its validation or test
split for eval). The eval input is optional. Both layouts may be mixed in one directory.
"""

from __future__ import annotations

import json
from pathlib import Path

from hbo_jax.data.sources import EVAL_SPLITS, TRAIN_SPLITS, Source, Subset, missing_reason
from hbo_jax.errors import DataError

FILE_EXTS = (".jsonl", ".jsonl.gz", ".parquet")
EVAL_NAMES = ("eval", *EVAL_SPLITS)  # what an eval input of a subset folder may be called


def _split_name(name: str, ext: str) -> str | None:
    return name[: -len(ext)] if name.endswith(ext) else None


def _flat(src: Path) -> dict[str, tuple[Path, Path | None]]:
    """`<name>.train.<ext>` files (and their `<name>.eval.<ext>`) -> name -> (train, eval)."""
    out = {}
    for path in sorted(src.iterdir()):
        for ext in FILE_EXTS:
            name = _split_name(path.name, f".train{ext}")
            if name:
                ev = next((src / f"{name}.eval{e}" for e in FILE_EXTS if _present(src / f"{name}.eval{e}")), None)
                out[name] = (path, ev)
    return out


def _present(path: Path) -> bool:
    return path.exists() or path.is_symlink()  # a dangling link is reported, not ignored


def _input(folder: Path, stems: tuple[str, ...]) -> Path | None:
    """The first `<stem>.<ext>` file or `<stem>` directory in a subset folder."""
    for stem in stems:
        for candidate in (*(folder / f"{stem}{ext}" for ext in FILE_EXTS), folder / stem):
            if _present(candidate):
                return candidate
    return None


def _is_dataset_dir(path: Path) -> bool:
    return any((path / f).is_file() for f in ("dataset_dict.json", "state.json", "dataset_info.json"))


def _folder_subset(folder: Path, key: str) -> Subset | None:
    """A subset folder's inputs, or None when the folder is not one."""
    train = _input(folder, ("train",))
    if train is not None:
        ev = _input(folder, EVAL_NAMES)
        return Subset(folder.name, [_parse(train, key, TRAIN_SPLITS)], [_parse(ev, key, EVAL_SPLITS)] if ev else [],
                      "auto", key)
    if (folder / "dataset_dict.json").is_file():  # a saved DatasetDict with its own splits
        splits = json.loads((folder / "dataset_dict.json").read_text()).get("splits", [])
        ev = next((s for s in EVAL_SPLITS if s in splits), None)
        return Subset(folder.name, [_parse(folder, key, TRAIN_SPLITS)],
                      [_parse(folder, key, EVAL_SPLITS)] if ev else [], "auto", key)
    stray = next(iter(sorted(folder.glob("train.*"))), None)
    if stray is not None:  # meant as a subset, in a kind that is not read: say so rather than skip it
        _parse(stray, key, TRAIN_SPLITS)
    return None


def _parse(path: Path, key: str, splits: tuple[str, ...]) -> Source:
    try:
        return Source.parse(str(path), splits=splits)
    except DataError as e:
        raise DataError(f"{key}: {e}") from None


def no_subsets_message(src: Path) -> str:
    """The error for a directory in neither layout: both layouts, and where else to turn."""
    strays = sorted(p.relative_to(src) for p in [*src.glob("*.train.*"), *src.glob("*/train.*")]
                    if not p.name.endswith(FILE_EXTS))
    hint = f" (found {', '.join(map(str, strays[:3]))}: not a supported file type)" if strays else ""
    return (f"data.source_dir={src}: no subsets found{hint}. It takes either layout, with files in "
            f"{', '.join(FILE_EXTS)} (the eval file is optional):\n"
            f"  {src}/<subset>.train.jsonl  and  {src}/<subset>.eval.jsonl\n"
            f"  {src}/<subset>/train.jsonl  and  {src}/<subset>/eval.jsonl\n"
            "For any other layout, list each subset's files or globs under data.subsets.<subset>.train and "
            ".eval in a config file (README, 'Your own data').")


def source_dir_subsets(src: Path, key: str) -> list[Subset]:
    """The subsets of a source directory, in name order (or its `manifest.json` order).

    Args:
        src: The directory.
        key: Where it was configured, for messages (`data.source_dir=...`).

    Raises:
        DataError: no subset in either layout, a subset in both, or an unreadable input.
    """
    out: dict[str, Subset] = {}
    for name, (train, ev) in _flat(src).items():
        for p in (train, ev):
            if p is not None and not p.is_file():  # a dangling link or a symlink loop
                raise DataError(f"{key}: {p}: {missing_reason(p)}")
        out[name] = Subset(name, [_parse(train, key, TRAIN_SPLITS)], [_parse(ev, key, EVAL_SPLITS)] if ev else [],
                           "auto", key)
    for folder in sorted(p for p in src.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if _is_dataset_dir(folder) and not (folder / "dataset_dict.json").is_file():
            continue  # a single saved dataset is data, not a subset folder
        sub = _folder_subset(folder, key)
        if sub is None:
            continue
        if sub.name in out:
            raise DataError(f"{key}: subset {sub.name!r} is given twice: as {out[sub.name].train[0]} and as "
                            f"{sub.train[0]}; keep one")
        out[sub.name] = sub
    if not out:
        raise DataError(no_subsets_message(src))
    subsets = list(out.values())
    manifest = src / "manifest.json"
    if manifest.is_file():  # keep the recipe's order (largest first)
        order = list(json.loads(manifest.read_text()).get("subsets", {}))
        subsets.sort(key=lambda s: order.index(s.name) if s.name in order else len(order))
    return subsets
