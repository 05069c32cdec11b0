"""Bad input names the file and line (policy `error`) or is counted (policy `skip`)."""

import json

import pytest

from hbo_jax.data.formats import DataError, SkipReport, read_conversations, to_conversation
from hbo_jax.train import main

from conftest import tiny_overrides

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
NO_ASSISTANT = {"messages": [{"role": "user", "content": "hi"}]}


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_missing_file_is_named(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl: file not found"):
        read_conversations(tmp_path / "nope.jsonl", "error", SkipReport())


def test_malformed_json_names_file_and_line(tmp_path):
    path = _write(tmp_path / "a.train.jsonl", [GOOD, '{"messages": [', GOOD])
    with pytest.raises(DataError, match=r"a\.train\.jsonl:2: .*"):
        read_conversations(path, "error", SkipReport())


def test_no_assistant_turn_names_file_and_line(tmp_path):
    path = _write(tmp_path / "a.train.jsonl", [GOOD, GOOD, NO_ASSISTANT])
    with pytest.raises(DataError, match=r"a\.train\.jsonl:3: no assistant turn"):
        read_conversations(path, "error", SkipReport())


def test_skip_policy_counts_every_bad_row(tmp_path):
    path = _write(tmp_path / "a.train.jsonl", [GOOD, "not json", NO_ASSISTANT, GOOD, b"\xff".decode("latin-1")])
    path.write_bytes(path.read_bytes().replace("ÿ".encode(), b"\xff"))
    report = SkipReport()
    rows = read_conversations(path, "skip", report)
    assert len(rows) == 2 and report.total == 3
    assert set(report.counts) == {"malformed JSON", "no assistant turn to train on", "non-UTF-8 bytes"}


@pytest.mark.parametrize("row", [
    {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
    {"instruction": "q", "input": "", "output": "a"},
    {"prompt": "q", "response": "a"},
    {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
])
def test_common_formats_normalise_to_the_same_conversation(row):
    assert to_conversation(row) == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]


def test_empty_subset_is_a_clear_cli_error(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    _write(src / "big.train.jsonl", [GOOD] * 8)
    (src / "empty.train.jsonl").write_text("")
    code = main(tiny_overrides(tmp_path / "run", tmp_path / "cache", f"data.source_dir={src}"))
    err = capsys.readouterr().err
    assert code == 2 and "empty.train.jsonl" in err and "usable training examples" in err


def test_missing_source_dir_is_a_clear_cli_error(tmp_path, capsys):
    code = main(tiny_overrides(tmp_path / "run", tmp_path / "cache", f"data.source_dir={tmp_path / 'none'}"))
    assert code == 2 and "directory not found" in capsys.readouterr().err


def test_missing_tokenizer_dir_is_a_clear_cli_error(tmp_path, capsys):
    code = main(tiny_overrides(tmp_path / "run", tmp_path / "cache", f"data.tokenizer={tmp_path / 'tok'}"))
    assert code == 2 and "not a tokenizer directory" in capsys.readouterr().err
