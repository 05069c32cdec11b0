"""A mixture declared in `data.subsets` (files, globs, several input kinds) prepares and trains.

Errors name the config key: globs matching nothing, missing files, duplicate subset
names. The prepare cache key follows every input file's content.
"""

import gzip
import json

import pytest

from hbo_jax.config import ConfigError, load_config
from hbo_jax.data.formats import DataError
from hbo_jax.data.prepare import mixture, prepared_key
from hbo_jax.tasks import read_eval_items
from hbo_jax.train import main

from conftest import FIXTURE, tiny_overrides


def _sum_row(i, fmt="messages"):
    q, a = f"What is {i} plus {i + 3}?", f"{2 * i + 3}"
    if fmt == "alpaca":
        return {"instruction": q, "input": "", "output": a}
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def _jsonl(path, lines, opener=open):
    path.parent.mkdir(parents=True, exist_ok=True)
    with opener(path, "wt", encoding="utf-8") as f:
        f.writelines((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines)
    return path


def _write_mixture(root):
    """Three subsets in three input kinds, with known bad rows; returns (overrides, rows in)."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    bad = ['{"messages": [', {"messages": [{"role": "user", "content": "no answer"}]}]
    _jsonl(root / "code" / "part1.jsonl.gz", [_sum_row(i) for i in range(8)] + bad[:1], gzip.open)
    _jsonl(root / "code" / "part2.jsonl.gz", [_sum_row(i) for i in range(8, 16)] + bad[1:], gzip.open)
    eval_rows = [dict(_sum_row(i), options=[str(2 * i + 3), str(2 * i + 4)]) for i in range(40, 44)]
    _jsonl(root / "code_eval.jsonl", eval_rows)
    # Forced alpaca: the one messages-format row does not fit and is skipped.
    pq.write_table(pa.Table.from_pylist([_sum_row(i, "alpaca") for i in range(20, 32)]), root / "math.parquet")
    _jsonl(root / "math_extra.jsonl", [_sum_row(99)])
    pq.write_table(pa.Table.from_pylist([_sum_row(i, "alpaca") for i in range(60, 63)]), root / "math_eval.parquet")
    # A DatasetDict: the same directory gives `train` for training and `test` for eval.
    datasets.DatasetDict({"train": datasets.Dataset.from_list([_sum_row(i) for i in range(50, 60)]),
                          "test": datasets.Dataset.from_list([_sum_row(i) for i in range(70, 73)])}
                         ).save_to_disk(str(root / "chat_hf"))
    overrides = [
        "data.source_dir=''",
        f"data.subsets.code.train=[{root}/code/*.jsonl.gz]", f"data.subsets.code.eval=[{root}/code_eval.jsonl]",
        f"data.subsets.math.train=[{root}/math.parquet,{root}/math_extra.jsonl]", "data.subsets.math.format=alpaca",
        f"data.subsets.math.eval=[{root}/math_eval.parquet]",
        f"data.subsets.chat.train=[{root}/chat_hf]", f"data.subsets.chat.eval=[{root}/chat_hf]",
    ]
    rows_in = (16 + 2 + 4) + (13 + 3) + (10 + 3)
    return overrides, rows_in


@pytest.fixture(scope="module")
def declared_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    overrides, rows_in = _write_mixture(root / "data")
    run_dir = root / "run"
    code = main(tiny_overrides(run_dir, root / "cache", *overrides))
    prepared = next((root / "cache" / "prepared").glob("*/manifest.json"))
    return code, run_dir, json.loads(prepared.read_text()), rows_in


def test_declared_mixture_with_globs_trains_end_to_end(declared_run):
    code, run_dir, manifest, _ = declared_run
    assert code == 0 and (run_dir / "summary.json").is_file()
    assert [s["name"] for s in manifest["subsets"]] == ["code", "math", "chat"]  # declaration order


def test_counts_in_equal_counts_out_plus_reported_skips(declared_run):
    _, _, manifest, rows_in = declared_run
    out = sum(s["train"] + s["eval"] for s in manifest["subsets"])
    assert manifest["skipped"]["total"] == 3
    assert out + manifest["skipped"]["total"] == rows_in


def test_eval_options_reach_the_task_metric(declared_run):
    _, run_dir, _, _ = declared_run
    ev = json.loads((run_dir / "eval.json").read_text())
    assert ev["after"]["code"]["metric"] == "mc"


def test_glob_matching_nothing_is_a_cli_error_naming_the_key(tmp_path, capsys):
    code = main(tiny_overrides(tmp_path / "run", tmp_path / "cache", "data.source_dir=''",
                               f"data.subsets.code.train=[{tmp_path}/none/*.jsonl]"))
    err = capsys.readouterr().err
    assert code == 2 and "data.subsets.code.train[0]" in err and "matches no file" in err


def test_missing_file_names_the_key(tmp_path):
    cfg = load_config(None, [f"data.subsets.math.train=[{tmp_path}/math.parquet]", "data.source_dir=''"])
    with pytest.raises(DataError, match=r"data\.subsets\.math\.train\[0\]=.*math\.parquet: file not found"):
        mixture(cfg)


def test_duplicate_subset_name_in_yaml_is_a_config_error(tmp_path):
    (tmp_path / "c.yaml").write_text("data:\n  subsets:\n    code: {train: [a.jsonl]}\n    code: {train: [b.jsonl]}\n")
    with pytest.raises(ConfigError, match="duplicate key code"):
        load_config(tmp_path / "c.yaml")


def test_subset_clashing_with_source_dir_is_named(tmp_path):
    path = _jsonl(tmp_path / "chat.jsonl", [_sum_row(i) for i in range(4)])
    cfg = load_config(None, [f"data.source_dir={FIXTURE}", f"data.subsets.chat.train=[{path}]"])
    with pytest.raises(DataError, match=r"data\.subsets\.chat: duplicate subset name; data\.source_dir="):
        mixture(cfg)


def test_source_dir_and_declared_subsets_combine(tmp_path):
    path = _jsonl(tmp_path / "extra.jsonl", [_sum_row(i) for i in range(4)])
    cfg = load_config(None, [f"data.source_dir={FIXTURE}", f"data.subsets.extra.train=[{path}]"])
    names = [s.name for s in mixture(cfg)]
    assert len(names) == 6 and names[-1] == "extra"


def test_changed_input_file_changes_the_prepare_key(tmp_path):
    path = _jsonl(tmp_path / "d" / "a.jsonl", [_sum_row(i) for i in range(4)])
    cfg = load_config(None, ["data.source_dir=''", f"data.subsets.a.train=[{tmp_path}/d/*.jsonl]"])
    before = prepared_key(cfg)
    assert prepared_key(cfg) == before
    _jsonl(path, [_sum_row(i) for i in range(5)])
    assert prepared_key(cfg) != before


def test_format_override_changes_the_prepare_key(tmp_path):
    _jsonl(tmp_path / "a.jsonl", [_sum_row(i) for i in range(4)])
    base = ["data.source_dir=''", f"data.subsets.a.train=[{tmp_path}/a.jsonl]"]
    cfg, forced = load_config(None, base), load_config(None, base + ["data.subsets.a.format=messages"])
    assert prepared_key(cfg) != prepared_key(forced)


def test_eval_items_keep_options_from_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [dict(_sum_row(i), options=["x", str(2 * i + 3)]) for i in range(3)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "ev.parquet")
    items = read_eval_items([str(tmp_path / "ev.parquet")])
    assert [(it.answer, it.options) for it in items] == [(str(2 * i + 3), ["x", str(2 * i + 3)]) for i in range(3)]


def test_tfds_name_is_found_in_tfds_data_dir(tmp_path, monkeypatch):
    import numpy as np
    import tensorflow_datasets as tfds

    class HboJaxMixTiny(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "prompt": tfds.features.Text(), "response": tfds.features.Text(), "id": np.int64}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(4), "validation": self._generate_examples(2)}

        def _generate_examples(self, n):
            for i in range(n):
                yield i, {"prompt": f"q{i}", "response": f"a{i}", "id": i}

    HboJaxMixTiny(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
    cfg = load_config(None, ["data.source_dir=''", "data.subsets.t.train=[tfds:hbo_jax_mix_tiny]",
                             "data.subsets.t.eval=[tfds:hbo_jax_mix_tiny]"])
    (sub,) = mixture(cfg)
    assert [str(s.split) for s in sub.train + sub.eval] == ["train", "validation"]
