"""What preparation reports about the rows it changed: cut, dropped and skipped rows.

Examples longer than data.seq_len are cut (counted per subset and split) or, with
data.too_long=drop, skipped like bad rows. Skips are summarised per reason with the
first positions; a subset whose every row was skipped says so; a symlink loop among
the inputs is named as one.
"""

import json
import logging
import os
import re

import pytest

from hbo_jax.config import ConfigError, load_config
from hbo_jax.data.formats import DataError, SkipReport, iter_conversations
from hbo_jax.data.prepare import TOO_LONG, _key_settings, data_notes, mixture, prepared_key
from hbo_jax.parallel import make_mesh
from hbo_jax.scorer import prepare
from hbo_jax.train import main

from conftest import tiny_overrides

SEQ_LEN = 32  # tiny_overrides' data.seq_len


def _short(i):
    return {"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": f"ok {i}"}]}


def _long(i):
    # Digits are single tokens for the trained BPE: 80 numbers are far more than seq_len tokens.
    prompt = " ".join(str(k) for k in range(i, i + 80))
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": "ok"}]}


def _write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _source(root):
    """`long`: 3 of 9 train and 1 of 3 eval rows too long; `short`: 8 good rows, 4 malformed."""
    _write(root / "long.train.jsonl", [_short(i) for i in range(6)] + [_long(i) for i in range(3)])
    _write(root / "long.eval.jsonl", [_short(10), _long(10), _short(11)])
    bad = '{"messages": ['
    _write(root / "short.train.jsonl", [_short(20 + i) if i % 3 else bad for i in range(12)])
    return root


def _prepare(tmp_path, *extra):
    cfg = load_config(None, tiny_overrides(tmp_path / "run", tmp_path / "cache", *extra))
    return prepare(cfg, make_mesh(cfg.mesh))


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
    """A whole run on `_source` (default data.too_long=truncate) and the warnings it logged."""
    root = tmp_path_factory.mktemp("source")
    src = _source(root / "src")
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logging.getLogger("hbo_jax").addHandler(handler)
    try:
        code = main(tiny_overrides(root / "run", root / "cache", f"data.source_dir={src}"))
    finally:
        logging.getLogger("hbo_jax").removeHandler(handler)
    manifest = json.loads(next((root / "cache" / "prepared").glob("*/manifest.json")).read_text())
    return code, root / "run", manifest, [r.getMessage() for r in records], src


@pytest.fixture(scope="module")
def drop_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("drop")
    src = _source(root / "src")
    return _prepare(root, f"data.source_dir={src}", "data.too_long=drop"), src


def test_cut_examples_are_counted_per_subset_and_split(source_run):
    code, _, manifest, _, _ = source_run
    cut = {s["name"]: s["truncated"] for s in manifest["subsets"]}
    assert code == 0 and cut == {"long": {"train": 3, "eval": 1}, "short": {"train": 0, "eval": 0}}


def test_cut_examples_are_logged_once_per_subset_with_their_share(source_run):
    lines = [m for m in source_run[3] if "longer than data.seq_len" in m]
    assert lines == [f"data: subset 'long': 3 of 9 train examples (33.3%) and 1 of 3 eval examples (33.3%) "
                     f"were longer than data.seq_len={SEQ_LEN} and were cut to fit (data.too_long=drop "
                     "skips them instead)"]


def test_summary_counts_cut_examples(source_run):
    summary = json.loads((source_run[1] / "summary.json").read_text())
    assert summary["data_truncated"] == {"long": {"train": 3, "eval": 1}, "short": {"train": 0, "eval": 0}}


def test_skip_log_names_the_first_positions_per_reason(source_run):
    src = source_run[4]
    lines = [m for m in source_run[3] if "malformed JSON" in m]
    first = ", ".join(f"{src / 'short.train.jsonl'}:{n}" for n in (1, 4, 7))
    assert lines == [f"data: skipped 4 x malformed JSON (first at {first})"]


def test_dropped_examples_reach_neither_training_nor_eval(drop_data):
    data, _ = drop_data
    stores = data.train[data.names.index("long")], data.eval[data.names.index("long")]
    assert [len(s) for s in stores] == [6, 2] and max(int(s.lengths.max()) for s in stores) <= SEQ_LEN + 1


def test_dropped_examples_are_skips_with_a_reason_and_positions(drop_data):
    data, src = drop_data
    skipped = data.manifest["skipped"]
    train = src / "long.train.jsonl"
    assert skipped["by_reason"][TOO_LONG] == 4
    assert skipped["examples"][TOO_LONG] == [f"{train}:7", f"{train}:8", f"{train}:9"]


def _key_config(tmp_path, *extra):
    return load_config(None, [f"data.source_dir={_source(tmp_path / 'src')}", f"data.cache_dir={tmp_path}", *extra])


def test_drop_changes_the_cache_key(tmp_path):
    cfg, drop = _key_config(tmp_path), _key_config(tmp_path, "data.too_long=drop")
    assert prepared_key(cfg) != prepared_key(drop)


def test_default_too_long_keeps_the_cache_key_of_before_the_option(tmp_path):
    # The key hashes these settings: without the option in them, data prepared before it existed is reused.
    cfg = _key_config(tmp_path)
    assert "too_long" not in _key_settings(cfg, mixture(cfg))["data"]


def test_unknown_too_long_choice_is_named():
    with pytest.raises(ConfigError, match=r"data\.too_long='cut' is not one of \['truncate', 'drop'\]"):
        load_config(None, ["data.too_long=cut"])


def test_subset_of_only_too_long_rows_says_every_row_was_dropped(tmp_path):
    src = _source(tmp_path / "src")
    _write(src / "huge.train.jsonl", [_long(i) for i in range(3)])
    at = ", ".join(f"{src / 'huge.train.jsonl'}:{n}" for n in (1, 2, 3))
    with pytest.raises(DataError, match=re.escape(f"every training row (3 of 3) of subset 'huge' was skipped: "
                                                  f"3 x {TOO_LONG} (at {at})")):
        _prepare(tmp_path, f"data.source_dir={src}", "data.too_long=drop")


def test_subset_of_only_bad_rows_says_every_row_was_skipped_and_why(tmp_path):
    src = _source(tmp_path / "src")
    path = _write(src / "bad.train.jsonl", ['{"messages": [', {"messages": [{"role": "user", "content": "q"}]},
                                            '{"messages": ['])
    with pytest.raises(DataError, match=rf"every training row \(3 of 3\) of subset 'bad' was skipped: "
                                        rf"2 x malformed JSON \(at {path}:1, {path}:3\); "
                                        rf"1 x no assistant turn to train on \(at {path}:2\)"):
        _prepare(tmp_path, f"data.source_dir={src}")


def test_subset_whose_eval_rows_were_all_skipped_is_noted():
    manifest = {"key": "k", "seq_len": SEQ_LEN, "skipped": {"total": 2, "by_reason": {"malformed JSON": 2}},
                "subsets": [{"name": "x", "train": 8, "eval": 0, "truncated": {"train": 0, "eval": 0},
                             "skipped": {"train": 0, "eval": 2}}]}
    assert "subset 'x': every eval row (2 of 2) was skipped, so it has no held-out loss" in data_notes(manifest)


def test_cuts_counted_over_rows_a_train_fraction_dropped_are_not_reported():
    # data prepared before the count kept to the train_fraction's rows: "300 of 75 (400.0%)"
    manifest = {"key": "k", "seq_len": SEQ_LEN, "skipped": {"total": 0, "by_reason": {}},
                "subsets": [{"name": "x", "train": 75, "eval": 2, "truncated": {"train": 300, "eval": 1}}]}
    assert data_notes(manifest) == ["examples cut to data.seq_len were not counted (or miscounted) when prepared "
                                    "data k was made (the cache key is the same); delete it to count them"]


def test_data_prepared_before_cuts_were_counted_says_so():
    manifest = {"key": "k", "seq_len": SEQ_LEN, "skipped": {"total": 0, "by_reason": {}},
                "subsets": [{"name": "x", "train": 8, "eval": 2}]}
    assert data_notes(manifest) == ["examples cut to data.seq_len were not counted (or miscounted) when prepared "
                                    "data k was made (the cache key is the same); delete it to count them"]


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_skip_position_is_the_one_the_error_policy_names(tmp_path, kind):
    rows = [_short(0), {"messages": [{"role": "user", "content": "q"}]}]
    if kind == "jsonl":
        path = _write(tmp_path / "a.jsonl", rows)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = tmp_path / "a.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path)
    report = SkipReport()
    list(iter_conversations(path, "skip", report))
    with pytest.raises(DataError) as err:
        list(iter_conversations(path, "error", SkipReport()))
    assert str(err.value).startswith(report.examples["no assistant turn to train on"][0] + ": ")


def _loop(tmp_path, a="a.jsonl", b="b.jsonl"):
    os.symlink(tmp_path / b, tmp_path / a)
    os.symlink(tmp_path / a, tmp_path / b)
    return tmp_path / a


@pytest.mark.parametrize("spec", ["a.jsonl", "*.jsonl"])
def test_symlink_loop_is_named_with_the_config_key(tmp_path, spec):
    path = _loop(tmp_path)
    cfg = load_config(None, ["data.source_dir=''", f"data.subsets.x.train=[{tmp_path / spec}]"])
    with pytest.raises(DataError, match=rf"data\.subsets\.x\.train\[0\]=.*: {path}: symlink loop"):
        mixture(cfg)


def test_symlink_loop_in_source_dir_is_named(tmp_path):
    path = _loop(tmp_path, "x.train.jsonl", "y.jsonl")
    cfg = load_config(None, [f"data.source_dir={tmp_path}"])
    with pytest.raises(DataError, match=rf"data\.source_dir={tmp_path}: {path}: symlink loop"):
        mixture(cfg)
