"""data.source_dir layouts: `<subset>.train.<ext>` files and one folder per subset, any file kind."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hbo_jax.data.layout import source_dir_subsets
from hbo_jax.errors import DataError

ROW = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}


def _jsonl(path: Path, n: int = 2) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(ROW) + "\n" for _ in range(n)))
    return path


def _parquet(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist([{"prompt": "2+2?", "response": "4"}] * 2), path)
    return path


def _inputs(subsets) -> dict:
    return {s.name: ([str(t.path) for t in s.train], [str(e.path) for e in s.eval]) for s in subsets}


def test_one_folder_per_subset_with_any_file_kind(tmp_path):
    a_train, a_eval = _jsonl(tmp_path / "a" / "train.jsonl"), _jsonl(tmp_path / "a" / "eval.jsonl")
    b_train, b_eval = _parquet(tmp_path / "b" / "train.parquet"), _jsonl(tmp_path / "b" / "validation.jsonl")
    c_train = _jsonl(tmp_path / "c" / "train.jsonl")
    assert _inputs(source_dir_subsets(tmp_path, "k")) == {
        "a": ([str(a_train)], [str(a_eval)]), "b": ([str(b_train)], [str(b_eval)]), "c": ([str(c_train)], [])}


def test_flat_files_of_any_kind_and_folders_mix(tmp_path):
    flat = _parquet(tmp_path / "x.train.parquet")
    flat_eval = _jsonl(tmp_path / "x.eval.jsonl")
    folder = _jsonl(tmp_path / "y" / "train.jsonl")
    assert _inputs(source_dir_subsets(tmp_path, "k")) == {"x": ([str(flat)], [str(flat_eval)]),
                                                          "y": ([str(folder)], [])}


def test_a_directory_in_neither_layout_shows_both_and_points_to_data_subsets(tmp_path):
    _jsonl(tmp_path / "a" / "training_data.jsonl")
    with pytest.raises(DataError) as e:
        source_dir_subsets(tmp_path, "k")
    msg = str(e.value)
    assert f"{tmp_path}/<subset>.train.jsonl" in msg and f"{tmp_path}/<subset>/train.jsonl" in msg
    assert "data.subsets.<subset>.train" in msg


def test_an_unsupported_train_file_is_named(tmp_path):
    _jsonl(tmp_path / "a" / "train.jsonl")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "train.csv").write_text("q,a\n")
    with pytest.raises(DataError, match=r"k: .*b/train.csv: unsupported file type"):
        source_dir_subsets(tmp_path, "k")


def test_a_subset_in_both_layouts_is_refused(tmp_path):
    _jsonl(tmp_path / "a.train.jsonl")
    _jsonl(tmp_path / "a" / "train.jsonl")
    with pytest.raises(DataError, match="subset 'a' is given twice"):
        source_dir_subsets(tmp_path, "k")
