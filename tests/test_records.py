"""Run records are strict JSON; a damaged JSONL log is repaired on resume, with a warning."""

import json
import logging
import math

from hbo_jax.records import JsonlWriter, dumps


def _refuse(name):
    raise ValueError(f"not JSON: {name}")


def test_non_finite_floats_are_written_as_null():
    text = dumps({"loss": math.nan, "grad_norm": [math.inf, -math.inf, 1.5], "step": 3})
    assert json.loads(text, parse_constant=_refuse) == {"loss": None, "grad_norm": [None, None, 1.5], "step": 3}


def test_the_writer_writes_strict_json(tmp_path):
    JsonlWriter(tmp_path / "m.jsonl").write({"step": 1, "loss": math.nan})
    assert json.loads((tmp_path / "m.jsonl").read_text(), parse_constant=_refuse) == {"step": 1, "loss": None}


def test_a_damaged_line_inside_the_log_is_dropped_naming_its_line(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n{"step": 4}\n')
    with caplog.at_level(logging.WARNING, logger="hbo_jax.records"):
        JsonlWriter(path).truncate(3)
    assert [json.loads(l)["step"] for l in path.read_text().splitlines()] == [1, 3]
    assert "unreadable line 2 of 4" in caplog.text and "metrics.jsonl" in caplog.text


def test_a_whole_last_record_without_its_newline_is_kept(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}')
    JsonlWriter(path).truncate(5)
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'


def test_a_resumed_trace_keeps_the_records_up_to_its_step_and_drops_the_rest(tmp_path):
    from hbo_jax.distributed import Trace

    path = tmp_path / "trace" / "process_0.jsonl"
    path.parent.mkdir()
    path.write_text("".join(json.dumps({"step": s, "kind": k}) + "\n" for s in (1, 2, 3) for k in ("batch", "mixer")))
    Trace(tmp_path, True, slice(0, 8), start=2)  # resumes from the checkpoint of step 2
    assert [json.loads(l)["step"] for l in path.read_text().splitlines()] == [1, 1, 2, 2]
