"""The batched, length-bucketed scoring pass equals a plain per-example computation."""

import dataclasses

import jax
import numpy as np
import pytest

from hbo_jax.config import Config, MeshConfig, ModelConfig
from hbo_jax.data.prepare import difficulty, make_buckets
from hbo_jax.data.scoring import scored_columns
from hbo_jax.models.llama import LlamaSpec, init_params
from hbo_jax.parallel import make_mesh
from hbo_jax.step import make_example_nll_fn, token_nll

SPEC = LlamaSpec.from_config(ModelConfig(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                                         intermediate_size=64), vocab_size=50)


@pytest.fixture(scope="module")
def setup():
    mesh = make_mesh(MeshConfig(2, 2, 2))
    graphdef, params = init_params(SPEC, mesh, 0)
    rng = np.random.default_rng(0)
    examples = []
    for n in rng.integers(6, 40, 13):  # ragged lengths across several padding widths
        ids = rng.integers(3, 50, n).astype(np.int32)
        mask = np.zeros(n, np.uint8)
        mask[rng.integers(2, n - 2):] = 1
        examples.append((ids, mask))
    return mesh, graphdef, params, examples


_PLAIN = {}


def _plain_nll(graphdef, params, ids, mask):
    """One example at a time, right-padded to a fixed 64 (causal: padding cannot leak back)."""
    if "fn" not in _PLAIN:
        _PLAIN["fn"] = jax.jit(lambda p, x, y: token_nll(graphdef, p, x, y))
    x = np.zeros((1, 64), np.int32)
    y = np.zeros((1, 64), np.int32)
    x[0, :len(ids) - 1], y[0, :len(ids) - 1] = ids[:-1], ids[1:]
    nll = np.asarray(_PLAIN["fn"](params, x, y))[0, :len(ids) - 1]
    m = mask[1:].astype(np.float64)
    return float((nll * m).sum() / m.sum())


def _cfg():
    cfg = Config()
    cfg.data.seq_len = 48
    cfg.scorer.score_batch_size = 8
    return cfg


@pytest.mark.parametrize("kind", ["loss", "ppl"])
def test_batched_scores_equal_per_example(setup, kind):
    mesh, graphdef, params, examples = setup
    scores, nll0 = difficulty(kind, examples, make_example_nll_fn(graphdef, mesh), params, mesh, _cfg(), 0, "")
    host = jax.device_get(params)
    want = np.array([_plain_nll(graphdef, host, i, m) for i, m in examples])
    np.testing.assert_allclose(nll0, want, rtol=1e-5)
    np.testing.assert_allclose(scores, want if kind == "loss" else np.exp(want), rtol=1e-5)


def test_ifd_is_conditional_over_response_alone(setup):
    mesh, graphdef, params, examples = setup
    scores, _ = difficulty("ifd", examples, make_example_nll_fn(graphdef, mesh), params, mesh, _cfg(), 0, "")
    host = jax.device_get(params)
    want = []
    for ids, mask in examples:
        pos = np.flatnonzero(mask)
        alone_ids = ids[pos[0] - 1:]  # the token before the response, then the response
        alone_mask = np.concatenate([[0], np.ones(len(pos), np.uint8)])
        want.append(_plain_nll(graphdef, host, ids, mask) / _plain_nll(graphdef, host, alone_ids, alone_mask))
    np.testing.assert_allclose(scores, want, rtol=1e-5)


def test_buckets_are_equal_size_and_keep_every_example():
    scores = np.random.default_rng(0).random(23)
    bucket, edges = make_buckets(scores, 4)
    assert sorted(np.bincount(bucket).tolist()) == [5, 6, 6, 6]
    assert all(scores[bucket == j].max() <= scores[bucket == j + 1].min() for j in range(3))


def test_scored_columns_are_each_rows_positions_then_minus_one():
    mask = np.zeros((3, 32), np.float32)
    mask[0, [5, 6, 7]] = 1
    mask[2, 20:28] = 1  # 8 scored: a quarter of the width
    cols = scored_columns(mask)
    assert cols.shape == (3, 8)
    assert cols[0].tolist() == [5, 6, 7] + [-1] * 5
    assert cols[1].tolist() == [-1] * 8
    assert cols[2].tolist() == list(range(20, 28))


def test_scored_columns_are_none_past_half_the_width():
    mask = np.zeros((2, 32), np.float32)
    mask[1, 10:27] = 1  # 17 of 32
    assert scored_columns(mask) is None


@pytest.mark.parametrize("loss_chunk", [0, 4])
def test_head_at_scored_columns_equals_the_head_everywhere(setup, loss_chunk):
    mesh, _, _, _ = setup
    spec = dataclasses.replace(SPEC, loss_chunk=loss_chunk)
    graphdef, params = init_params(spec, mesh, 0)
    rng = np.random.default_rng(1)
    ids = rng.integers(3, 50, (8, 32)).astype(np.int32)
    targets = rng.integers(3, 50, (8, 32)).astype(np.int32)
    mask = np.zeros((8, 32), np.float32)
    for r in range(7):  # the last row scores nothing
        mask[r, rng.choice(32, rng.integers(1, 9), replace=False)] = 1
    fn = make_example_nll_fn(graphdef, mesh)
    everywhere, tokens = fn(params, ids, targets, mask)
    cols = scored_columns(mask)
    assert cols is not None and cols.shape[1] == 8
    picked, picked_tokens = fn(params, ids, targets, mask, cols)
    np.testing.assert_allclose(np.asarray(picked), np.asarray(everywhere), rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(np.asarray(picked_tokens), np.asarray(tokens))
