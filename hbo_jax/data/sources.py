"""Where training rows come from: input specs, globs, readers and content hashes.

An input is named by a spec string:

  /data/chat.jsonl, /data/chat.jsonl.gz   JSON Lines (one row per line)
  /data/math.parquet                       Parquet (one row per table row)
  /data/hf_dir                             a `datasets` Dataset saved with `save_to_disk`
  /data/hf_dict#test                       a saved DatasetDict, split `test`
  /data/tfds/my_ds/1.0.0#train             a TFDS dataset prepared as ArrayRecord
  tfds:my_ds#train                         the same, found in $TFDS_DATA_DIR
  /data/code/*.jsonl.gz                    a glob: every match, sorted

Directories with splits default to `train` for training inputs and `validation`, then
`test`, for eval inputs. Tabular rows (Parquet, Arrow, TFDS) are turned into the same
plain dicts a JSON line gives (bytes -> str, arrays -> lists, a column-wise sequence of
turns -> a list of turns), so `formats.to_conversation` and the bad-input policy treat
every kind alike. TFDS data is read with `tfds` random-access data sources: no
TensorFlow, no download.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from hbo_jax.errors import DataError

TRAIN_SPLITS = ("train",)
EVAL_SPLITS = ("validation", "test")
_GLOB = "*?["
_TURN_KEYS = ("messages", "conversations")


@dataclass(frozen=True)
class BadRow:
    """A row that could not even be parsed (yielded by the readers in place of the row)."""

    reason: str
    detail: str = ""


@dataclass
class Source:
    """One resolved input: a file or dataset directory, its reader kind and split."""

    path: Path
    kind: str  # jsonl | parquet | hf | tfds
    split: str | None = None
    _digest: str | None = field(default=None, repr=False, compare=False)

    def __str__(self) -> str:  # a spec that parses back to this source
        return f"{self.path}#{self.split}" if self.split else str(self.path)

    @property
    def root(self) -> Path:
        """What holds the rows: the file, or a saved DatasetDict's split directory."""
        return self.path / self.split if self.kind == "hf" and self.split else self.path

    @classmethod
    def parse(cls, spec: str, kind: str | None = None, splits: tuple[str, ...] = TRAIN_SPLITS) -> "Source":
        """Resolves a spec string (no globs); raises DataError if it names nothing readable.

        Args:
            spec: See the module docstring.
            kind: Force a reader kind (`jsonl` for the `<subset>.train.jsonl` layout).
            splits: Split names tried in order when a directory has splits and the spec names none.
        """
        text, split = spec, None
        if "#" in spec and not Path(spec).expanduser().exists():
            text, split = spec.rsplit("#", 1)
        if text.startswith("tfds:"):
            path, kind = _tfds_dir(text[len("tfds:"):]), "tfds"
        else:
            path = Path(text).expanduser()
            kind = kind or _kind(path)
        if kind == "hf":
            path, split = _hf_split(path, split, splits)
        elif kind == "tfds":
            path, split = _tfds_split(path, split, splits)
        elif split:
            raise DataError(f"{spec}: '#{split}' names a split, but {path.name} is a single file")
        return cls(path, kind, split)

    def digest(self) -> str:
        """sha256 of the input's bytes (every file of a dataset directory) and its split."""
        if self._digest is None:
            h = hashlib.sha256(f"{self.kind}#{self.split}".encode())
            root = self.root
            files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
            for f in files:
                h.update(str(f.relative_to(root) if f != root else f.name).encode())
                h.update(file_sha(f).encode())
            self._digest = h.hexdigest()
        return self._digest


# Where file digests are remembered across runs (set by `prepare` to the cache root):
# a file whose path, size and mtime are unchanged is not read again.
_HASH_STORE: dict = {"path": None, "entries": None}


def use_hash_store(path: Path | None) -> None:
    """Remembers file digests in the JSON file `path` (None: hash every time)."""
    _HASH_STORE.update(path=path, entries=None)


def _store_entries() -> dict:
    if _HASH_STORE["entries"] is None:
        path = _HASH_STORE["path"]
        try:
            _HASH_STORE["entries"] = json.loads(path.read_text()) if path and path.is_file() else {}
        except (OSError, json.JSONDecodeError):
            _HASH_STORE["entries"] = {}  # a damaged store only costs a re-hash
    return _HASH_STORE["entries"]


def file_sha(path: Path) -> str:
    """sha256 of a file's bytes; reused from the hash store while size and mtime match."""
    st = path.stat()
    key, stamp = str(path.resolve()), [st.st_size, st.st_mtime_ns]
    entries = _store_entries() if _HASH_STORE["path"] else {}
    hit = entries.get(key)
    if hit and hit[:2] == stamp:
        return hit[2]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    if _HASH_STORE["path"]:
        entries[key] = stamp + [h.hexdigest()]
        store = _HASH_STORE["path"]
        store.parent.mkdir(parents=True, exist_ok=True)
        tmp = store.with_name(f"{store.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(entries))
        os.replace(tmp, store)  # atomic: concurrent runs never read a torn store
    return h.hexdigest()


def missing_reason(path: Path, what: str = "file") -> str:
    """Why a path that does not exist as a file or directory cannot be read.

    `Path.exists` and `is_file` say False for a symlink loop as for a missing file; only
    `os.stat`'s errno tells them apart, and "not found" would send the user looking for a
    file that is there.

    Args:
        path: The path that could not be read.
        what: What was expected there (`file`, `directory`), for the not-found message.
    """
    try:
        os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "symlink loop (following its links never reaches a file)"
    return f"{what} not found"


def _kind(path: Path) -> str:
    if not path.exists():
        raise DataError(f"{path}: {missing_reason(path)}")
    if path.is_file():
        name = path.name.lower()
        if name.endswith((".jsonl", ".jsonl.gz")):
            return "jsonl"
        if name.endswith(".parquet"):
            return "parquet"
        raise DataError(f"{path}: unsupported file type; expected .jsonl, .jsonl.gz, .parquet, a "
                        "`datasets` save_to_disk directory or a TFDS ArrayRecord dataset directory")
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        return "hf"
    if (path / "dataset_info.json").is_file() or _tfds_versions(path):
        return "tfds"
    raise DataError(f"{path}: directory is neither a `datasets` save_to_disk directory (state.json / "
                    "dataset_dict.json) nor a TFDS dataset directory (dataset_info.json)")


def _pick(path: Path, split: str | None, available: list[str], splits: tuple[str, ...]) -> str:
    if split is not None:
        if split not in available:
            raise DataError(f"{path}: no split {split!r} (splits: {available})")
        return split
    for s in splits:
        if s in available:
            return s
    raise DataError(f"{path}: none of the splits {list(splits)} exists (splits: {available}); "
                    f"name one as {path}#<split>")


def _hf_split(path: Path, split: str | None, splits: tuple[str, ...]) -> tuple[Path, str | None]:
    if (path / "dataset_dict.json").is_file():  # a DatasetDict: one save_to_disk dir per split
        available = json.loads((path / "dataset_dict.json").read_text())["splits"]
        return path, _pick(path, split, available, splits)
    if split is not None:
        raise DataError(f"{path}: a single saved Dataset has no splits (drop '#{split}')")
    return path, None


def _tfds_versions(path: Path) -> list[Path]:
    return [p for p in path.iterdir() if p.is_dir() and (p / "dataset_info.json").is_file()
            and p.name.replace(".", "").isdigit()]


def _tfds_dir(name: str) -> Path:
    """The prepared directory of a TFDS dataset name (`name[/config][:version]`) in $TFDS_DATA_DIR."""
    import tensorflow_datasets as tfds

    try:
        path = Path(tfds.builder(name, data_dir=os.environ.get("TFDS_DATA_DIR")).data_dir)
    except Exception as e:  # unknown names, bad versions: tfds raises many kinds
        raise DataError(f"tfds:{name}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    if not (path / "dataset_info.json").is_file():
        raise DataError(f"tfds:{name}: not prepared in {path}; prepare it with "
                        "file_format='array_record' first (nothing is downloaded here)")
    return path


def _tfds_split(path: Path, split: str | None, splits: tuple[str, ...]) -> tuple[Path, str]:
    if not (path / "dataset_info.json").is_file():  # the dataset dir: take its newest version
        versions = _tfds_versions(path)
        path = max(versions, key=lambda p: tuple(int(x) for x in p.name.split(".")))
    info = json.loads((path / "dataset_info.json").read_text())
    available = [s["name"] for s in info.get("splits", [])]
    return path, _pick(path, split, available, splits)


def expand(patterns: list[str], key: str, splits: tuple[str, ...] = TRAIN_SPLITS) -> list[Source]:
    """Resolves a config list of specs and globs; errors name the config key.

    Args:
        patterns: Specs as written in the config (globs allowed).
        key: The config key the list came from (`data.subsets.code.train`).
        splits: Default splits for directories with splits.
    """
    out: list[Source] = []
    for i, pattern in enumerate(patterns):
        where = f"{key}[{i}]={pattern!r}"
        text, split = pattern, ""
        if "#" in pattern and not Path(pattern).expanduser().exists():
            text, split = pattern.rsplit("#", 1)
            split = f"#{split}"
        if any(c in text for c in _GLOB) and not text.startswith("tfds:"):
            matches = sorted(glob.glob(os.path.expanduser(text), recursive=True))
            if not matches:
                raise DataError(f"{where}: the glob matches no file")
            specs = [m + split for m in matches]
        else:
            specs = [pattern]
        for spec in specs:
            try:
                src = Source.parse(spec, splits=splits)
            except DataError as e:
                raise DataError(f"{where}: {e}") from None
            if src not in out:  # overlapping globs: each input once
                out.append(src)
    return out


def _plain(value, key: str = ""):
    """Tabular values -> what JSON would give; raises UnicodeDecodeError on bad bytes."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        out = {k: _plain(v, k) for k, v in value.items()}
        # TFDS and `datasets` Sequence({...}) store turns column-wise: {role: [...], content: [...]}.
        for k in _TURN_KEYS:
            cols = out.get(k)
            if isinstance(cols, dict) and cols and all(isinstance(v, list) for v in cols.values()):
                n = {len(v) for v in cols.values()}
                if len(n) == 1:
                    out[k] = [dict(zip(cols, vals)) for vals in zip(*cols.values())]
        return out
    return value


def _clean(where: str, row) -> tuple[str, dict | BadRow]:
    try:
        return where, _plain(row)
    except UnicodeDecodeError:
        return where, BadRow("non-UTF-8 bytes")


def _arrow_batches(src: Source):
    import pyarrow as pa
    import pyarrow.parquet as pq

    if src.kind == "parquet":
        yield from pq.ParquetFile(src.path).iter_batches(batch_size=1024)
        return
    state = json.loads((src.root / "state.json").read_text())
    for f in state["_data_files"]:  # `datasets` writes Arrow IPC streams
        with pa.memory_map(str(src.root / f["filename"])) as mm:
            yield from pa.ipc.open_stream(mm)


def table_rows(src: Source) -> Iterator[tuple[str, dict | BadRow]]:
    """(where, row) for a Parquet file, `datasets` directory or TFDS dataset; where = `path[i]`."""
    if src.kind in ("parquet", "hf"):
        i = 0
        for batch in _arrow_batches(src):
            for row in batch.to_pylist():
                yield _clean(f"{src}[{i}]", row)
                i += 1
        return
    if src.kind != "tfds":
        raise DataError(f"{src}: no table reader for kind {src.kind!r}")
    import tensorflow_datasets as tfds

    try:
        ds = tfds.builder_from_directory(str(src.path)).as_data_source(split=src.split)
    except NotImplementedError as e:  # TFRecord needs TensorFlow; ArrayRecord/Parquet do not
        raise DataError(f"{src}: {str(e).splitlines()[0]} (prepare it with file_format='array_record')") from None
    chunk = 256  # batched random access is much faster than one record at a time
    for a in range(0, len(ds), chunk):
        for i, row in enumerate(ds.__getitems__(range(a, min(a + chunk, len(ds)))), a):
            yield _clean(f"{src}[{i}]", row)


@dataclass
class Subset:
    """One named subset of the mixture: its train and eval inputs and row format."""

    name: str
    train: list[Source]
    eval: list[Source]
    format: str = "auto"
    key: str = ""  # where it was declared, for error messages

    def digests(self) -> dict:
        return {"format": self.format, "train": [s.digest() for s in self.train],
                "eval": [s.digest() for s in self.eval]}


def declared_subsets(subsets: dict) -> list[Subset]:
    """Subsets declared in `data.subsets` (name -> SubsetConfig), in declaration order."""
    out = []
    for name, sc in subsets.items():
        key = f"data.subsets.{name}"
        if not sc.train:
            raise DataError(f"{key}.train: list at least one training file or glob")
        out.append(Subset(name, expand(list(sc.train), f"{key}.train", TRAIN_SPLITS),
                          expand(list(sc.eval), f"{key}.eval", EVAL_SPLITS), sc.format, key))
    return out
