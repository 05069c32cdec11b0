"""Every input format gives the same token ids and loss masks as OpenAI-messages JSONL.

Fixtures are written by the tests: JSONL (messages, ShareGPT, Alpaca, prompt/response,
gzip), Parquet (pyarrow), `datasets` save_to_disk directories and a TFDS ArrayRecord
dataset built by a local builder (no TensorFlow, no network).
"""

import gzip
import json

import numpy as np
import pytest

from hbo_jax.data.formats import DataError, SkipReport, iter_rows, read_conversations
from hbo_jax.data.sources import Source
from hbo_jax.data.tokenizer import conversation_texts, encode, train_bpe

# (prompt, answer) pairs every format can express; the first has an Alpaca `input`.
PAIRS = [("Add these\n\n2 and 2", "4"), ("Name a colour.", "Blue, like the sky."),
         ("Say hello in French.", "Bonjour"), ("Is ice cold?", "Yes, ice is cold.")]
MULTI = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
         {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"},
         {"role": "assistant", "content": "6"}]


def _conv(prompt, answer):
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


CONVS = [_conv(p, a) for p, a in PAIRS]


def _jsonl(path, rows, opener=open):
    with opener(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


def _messages_rows(multi=True):
    return [{"messages": c, "id": i} for i, c in enumerate(CONVS + ([MULTI] if multi else []))]


def _sharegpt(tmp):
    who = {"user": "human", "assistant": "gpt", "system": "system"}
    rows = [{"conversations": [{"from": who[m["role"]], "value": m["content"]} for m in c]} for c in CONVS + [MULTI]]
    return _jsonl(tmp / "sharegpt.jsonl", rows), True


def _alpaca(tmp):
    rows = [{"instruction": "Add these", "input": "2 and 2", "output": "4"}]
    rows += [{"instruction": p, "input": "", "output": a} for p, a in PAIRS[1:]]
    return _jsonl(tmp / "alpaca.jsonl", rows), False


def _prompt_response(tmp):
    rows = [{"prompt": p, "response": a} for p, a in PAIRS[:2]] + [{"prompt": p, "completion": a} for p, a in PAIRS[2:]]
    return _jsonl(tmp / "pr.jsonl", rows), False


def _gzip(tmp):
    return _jsonl(tmp / "chat.jsonl.gz", _messages_rows(), gzip.open), True


def _parquet(tmp):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp / "chat.parquet"
    pq.write_table(pa.Table.from_pylist(_messages_rows()), path, row_group_size=2)  # several batches
    return str(path), True


def _hf_dataset(tmp):
    import datasets

    datasets.Dataset.from_list(_messages_rows()).save_to_disk(str(tmp / "hf"))
    return str(tmp / "hf"), True


def _hf_dataset_dict(tmp):
    import datasets

    ds = datasets.Dataset.from_list(_messages_rows())
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp / "hfdict"))
    return str(tmp / "hfdict"), True  # no #split: training inputs default to `train`


def _hf_columnar(tmp):
    """`datasets.Sequence({...})` stores turns column-wise: {role: [...], content: [...]}."""
    import datasets

    feats = datasets.Features({"messages": datasets.Sequence(
        {"role": datasets.Value("string"), "content": datasets.Value("string")})})
    cols = [{"role": [m["role"] for m in c], "content": [m["content"] for m in c]} for c in CONVS + [MULTI]]
    datasets.Dataset.from_dict({"messages": cols}, features=feats).save_to_disk(str(tmp / "hfcol"))
    return str(tmp / "hfcol"), True


def _tfds(tmp):
    import tensorflow_datasets as tfds

    rows = _messages_rows()

    class HboJaxFormatsChat(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, disable_shuffling=True, features=tfds.features.FeaturesDict({
                "messages": tfds.features.Sequence({"role": tfds.features.Text(), "content": tfds.features.Text()}),
                "id": np.int64}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for r in rows:
                yield r["id"], r

    HboJaxFormatsChat(data_dir=str(tmp / "tfds"), file_format="array_record").download_and_prepare()
    return str(tmp / "tfds" / "hbo_jax_formats_chat" / "1.0.0") + "#train", True


WRITERS = {"sharegpt": _sharegpt, "alpaca": _alpaca, "prompt_response": _prompt_response, "jsonl.gz": _gzip,
           "parquet": _parquet, "hf_save_to_disk": _hf_dataset, "hf_dataset_dict": _hf_dataset_dict,
           "hf_columnar_turns": _hf_columnar, "tfds_array_record": _tfds}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    texts = [conversation_texts(c) for c in CONVS + [MULTI]] * 4
    return train_bpe(texts, 300, tmp_path_factory.mktemp("tok") / "bpe")


@pytest.mark.parametrize("kind", list(WRITERS))
def test_format_round_trips_to_the_messages_jsonl_tokens(tok, tmp_path, kind):
    spec, multi = WRITERS[kind](tmp_path)
    ref = read_conversations(_jsonl(tmp_path / "ref.jsonl", _messages_rows(multi)), "error", SkipReport())
    got = read_conversations(spec, "error", SkipReport())
    want_enc, got_enc = encode(tok, ref), encode(tok, got)
    assert len(got_enc) == len(want_enc) == len(PAIRS) + multi
    for (wi, wm), (gi, gm) in zip(want_enc, got_enc):
        np.testing.assert_array_equal(gi, wi)
        np.testing.assert_array_equal(gm, wm)


@pytest.mark.parametrize("fmt", ["messages", "sharegpt", "alpaca", "prompt_response"])
def test_forced_format_reads_its_own_rows(tmp_path, fmt):
    path = {"messages": lambda t: (_jsonl(t / "m.jsonl", _messages_rows(False)), 0), "sharegpt": _sharegpt,
            "alpaca": _alpaca, "prompt_response": _prompt_response}[fmt](tmp_path)[0]
    convs = read_conversations(path, "error", SkipReport(), fmt)
    assert convs[:len(PAIRS)] == CONVS


def test_forced_format_mismatch_names_file_line_and_format(tmp_path):
    path = _jsonl(tmp_path / "a.jsonl", [{"instruction": "q", "output": "a"}, _messages_rows()[0]])
    with pytest.raises(DataError, match=r"a\.jsonl:2: row does not fit format=alpaca"):
        read_conversations(path, "error", SkipReport(), "alpaca")


def test_forced_format_mismatch_is_counted_under_skip(tmp_path):
    path, _ = _parquet(tmp_path)
    report = SkipReport()
    assert read_conversations(path, "skip", report, "sharegpt") == []
    assert report.counts == {"row does not fit format=sharegpt": len(PAIRS) + 1}
    assert report.examples["row does not fit format=sharegpt"][0] == f"{path}[0]"


def test_extra_row_fields_pass_through_tabular_sources(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [dict(r, options=["4", "5"]) for r in _messages_rows(False)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "ev.parquet")
    got = [row for _, row in iter_rows(tmp_path / "ev.parquet")]
    assert got == rows


def test_non_utf8_bytes_in_tfds_rows_are_a_named_bad_row(tmp_path):
    from hbo_jax.data.sources import _clean

    where, row = _clean("x[3]", {"messages": {"role": [b"user"], "content": [b"\xff"]}})
    assert (where, row.reason) == ("x[3]", "non-UTF-8 bytes")


def test_unsupported_file_type_is_named(tmp_path):
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=r"data\.csv: unsupported file type"):
        Source.parse(str(tmp_path / "data.csv"))


def test_unknown_split_lists_the_splits(tmp_path):
    spec, _ = _hf_dataset_dict(tmp_path)
    with pytest.raises(DataError, match=r"no split 'dev' \(splits: \['train', 'test'\]\)"):
        Source.parse(spec + "#dev")


def test_file_digests_are_remembered_until_the_file_changes(tmp_path, monkeypatch):
    import os

    from hbo_jax.data import sources

    f = tmp_path / "a.jsonl"
    f.write_text('{"prompt": "p", "response": "r"}\n')
    sources.use_hash_store(tmp_path / "store" / "hashes.json")
    first = sources.file_sha(f)
    reads = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda p, *a, **k: (reads.append(str(p)), real_open(p, *a, **k))[1])
    sources.use_hash_store(tmp_path / "store" / "hashes.json")  # a new run: the store is read from disk
    assert sources.file_sha(f) == first and str(f) not in reads
    monkeypatch.undo()
    f.write_text('{"prompt": "p", "response": "changed"}\n')
    os.utime(f, ns=(1, 1))  # even an old mtime: size or mtime differ from the stored stamp
    assert sources.file_sha(f) != first
    sources.use_hash_store(None)
