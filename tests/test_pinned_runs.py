"""Short runs reproduce their pinned logs (tests/fixtures/pinned).

The fixtures come from `scripts/make_pinned_runs.py`; a change that alters what a run
computes (batches, rewards, actor updates, metrics) shows here as the first field that
differs. Floats compare to a relative 1e-5 (`make_pinned_runs.RTOL`: XLA's CPU kernels
round differently on different instruction sets), everything else exactly.
"""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from make_pinned_runs import FILES, OUT, RUNS, log_mismatch, pinned_outputs  # noqa: E402


@pytest.fixture(scope="module", params=sorted(RUNS))
def pinned(request, tmp_path_factory, shared_cache):
    name = request.param
    return name, pinned_outputs(name, tmp_path_factory.mktemp(name) / "run", shared_cache)


@pytest.mark.parametrize("file", FILES)
def test_run_reproduces_pinned_log(pinned, file):
    name, outputs = pinned
    pinned_file = OUT / name / file
    expected = pinned_file.read_text() if pinned_file.is_file() else None  # None: the run writes no such file
    where = log_mismatch(outputs[file], expected)
    assert where is None, f"{name}/{file}: {where}"


def test_a_float_within_the_tolerance_matches_its_pin():
    assert log_mismatch('{"loss": 1.2559441}\n', '{"loss": 1.2559440}\n') is None


def test_a_float_beyond_the_tolerance_is_named():
    assert log_mismatch('{"a": {"loss": 1.2451}}\n', '{"a": {"loss": 1.2559}}\n') == "[0].a.loss: 1.2451, pinned 1.2559"


def test_a_drawn_index_must_equal_its_pin_exactly():
    assert log_mismatch('{"drawn": [[3, 1]]}\n', '{"drawn": [[3, 0]]}\n') == "[0].drawn[0][1]: 1, pinned 0"


def test_a_missing_key_or_line_is_a_mismatch():
    assert log_mismatch('{"a": 1.0}\n', '{"a": 1.0, "b": 2}\n') == "[0]: keys ['b'] differ"
    assert log_mismatch('{"a": 1}\n', '{"a": 1}\n{"a": 2}\n') == "1 lines, pinned 2"


def test_a_nan_pinned_as_nan_matches():
    assert log_mismatch('{"loss": NaN}\n', '{"loss": NaN}\n') is None
