"""Short runs reproduce their pinned logs to the last bit (tests/fixtures/pinned).

The fixtures come from `scripts/make_pinned_runs.py`; a change that alters what a run
computes (batches, rewards, actor updates, metrics) shows here as a diff of the logs.
"""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from make_pinned_runs import FILES, OUT, RUNS, pinned_outputs  # noqa: E402


@pytest.fixture(scope="module", params=sorted(RUNS))
def pinned(request, tmp_path_factory, shared_cache):
    name = request.param
    return name, pinned_outputs(name, tmp_path_factory.mktemp(name) / "run", shared_cache)


@pytest.mark.parametrize("file", FILES)
def test_run_reproduces_pinned_log(pinned, file):
    name, outputs = pinned
    pinned_file = OUT / name / file
    expected = pinned_file.read_text() if pinned_file.is_file() else None  # None: the run writes no such file
    assert outputs[file] == expected, f"{name}/{file} differs from the pinned fixture"
