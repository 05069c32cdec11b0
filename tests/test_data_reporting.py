"""What preparation reports about its inputs and the rows it changed.

A symlink loop among the inputs is named as one.
"""

import os

import pytest

from hbo_jax.config import load_config
from hbo_jax.data.formats import DataError
from hbo_jax.data.prepare import mixture


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
