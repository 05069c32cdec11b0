"""Sequence packing: layout, segment isolation, and an exact match with the unpacked step."""

import json

import jax
import numpy as np
import pytest

from hbo_jax.config import MeshConfig, ModelConfig
from hbo_jax.data.packing import PackingError, default_pack_rows, first_fit_rows, pack, step_rows
from hbo_jax.data.store import collate
from hbo_jax.models.llama import LlamaSpec, init_params
from hbo_jax.parallel import global_batch_from_host, make_mesh
from hbo_jax.step import init_train_state, make_optimizer, make_train_step, state_shardings, token_nll
from hbo_jax.train import main

from conftest import tiny_overrides

SPEC = LlamaSpec.from_config(ModelConfig(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                         intermediate_size=64), vocab_size=64)
D, K, T = 3, 2, 16
LENGTHS = [9, 5, 17, 3, 12, 7, 4, 21]  # token ids per example (17 and 21 exceed T + 1: truncated)


def _examples(lengths=LENGTHS, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for n in lengths:
        mask = (rng.random(n) < 0.7).astype(np.uint8)
        mask[1] = 1  # every example has a loss token
        out.append((rng.integers(1, 64, n).astype(np.int32), mask))
    return out


def test_layout_segments_positions_first_fit():
    ex = _examples()
    b = pack(ex, T, pad_id=0, rows=5, first_index=10)
    # First-fit in plan order over slots min(n, T + 1) - 1 = 8, 4, 16, 2, 11, 6, 3, 16.
    want_rows = [0, 0, 1, 0, 2, 3, 2, 4]
    for e, (ids, mask) in enumerate(ex):
        n = min(len(ids), T + 1) - 1
        r, cols = np.nonzero(b["segment_ids"] == 11 + e)
        assert set(r) == {want_rows[e]} and len(cols) == n  # one row, no token dropped
        assert np.all(np.diff(cols) == 1)  # contiguous
        np.testing.assert_array_equal(b["positions"][r, cols], np.arange(n))
        np.testing.assert_array_equal(b["input_ids"][r, cols], ids[:n])
        np.testing.assert_array_equal(b["targets"][r, cols], ids[1:n + 1])
        np.testing.assert_array_equal(b["loss_mask"][r, cols], mask[1:n + 1])
    pad = b["segment_ids"] == 0
    assert not b["loss_mask"][pad].any() and np.all(b["input_ids"][pad] == 0)
    assert first_fit_rows([min(len(i), T + 1) - 1 for i, _ in ex], T) == 5


def test_pack_that_does_not_fit_raises_clear_error():
    with pytest.raises(PackingError, match="data.pack_rows"):
        pack(_examples(), T, pad_id=0, rows=2)


def test_default_pack_rows_sized_from_mean_length_and_batch_axes():
    assert default_pack_rows(64, 64.0, 256, 1) == 20  # 16 rows of mean-length examples + 25%
    assert default_pack_rows(64, 64.0, 256, 8) == 24  # rounded up to the batch axes
    assert default_pack_rows(8, 32.0, 32, 8) == 8  # capped at batch_size


def test_packed_forward_equals_each_example_alone():
    mesh = make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    graphdef, params = init_params(SPEC, mesh, seed=0)
    ex = _examples()
    b = pack(ex, T, pad_id=0, rows=5)
    packed = np.asarray(token_nll(graphdef, params, b["input_ids"], b["targets"], b["positions"],
                                  b["segment_ids"]))
    alone = collate(ex, T, pad_id=0)
    single = np.asarray(token_nll(graphdef, params, alone["input_ids"], alone["targets"]))
    for e, (ids, _) in enumerate(ex):
        n = min(len(ids), T + 1) - 1
        r, cols = np.nonzero(b["segment_ids"] == e + 1)
        np.testing.assert_allclose(packed[r, cols], single[e, :n], rtol=1e-5, atol=1e-5)


def _step(batch, packing, mesh_shape=(1, 1, 1)):
    mesh = make_mesh(MeshConfig(*mesh_shape), jax.devices()[: int(np.prod(mesh_shape))])
    graphdef, params = init_params(SPEC, mesh, seed=0)
    tx = make_optimizer(1e-2, 10, 1, 0.0, 1.0)
    state = init_train_state(params, tx, mesh)
    step = make_train_step(graphdef, tx, mesh, D * K, state_shardings(state), ref_nll=True, packing=packing)
    state, metrics = step(state, global_batch_from_host(batch, mesh))
    return jax.device_get(metrics), jax.device_get(state.params)


@pytest.fixture(scope="module")
def steps():
    ex = _examples()
    rng = np.random.default_rng(3)
    extra = {"group_id": rng.integers(0, D * K, len(ex)).astype(np.int32),
             "ref_nll": rng.uniform(3, 5, len(ex)).astype(np.float32)}
    unpacked = _step({**collate(ex, T, 0), **extra}, packing=False)
    packed = _step({**pack(ex, T, 0, rows=8), **extra}, packing=True, mesh_shape=(2, 2, 2))
    return unpacked, packed


@pytest.mark.parametrize("key", ["loss", "tokens", "grad_norm", "group_token_nll", "group_tokens",
                                 "group_examples", "group_example_nll", "group_ppl_ratio"])
def test_packed_step_metrics_equal_unpacked(steps, key):
    (m0, _), (m1, _) = steps
    np.testing.assert_allclose(m1[key], m0[key], rtol=1e-5, atol=1e-6, err_msg=key)


def test_packed_step_update_equals_unpacked(steps):
    (_, p0), (_, p1) = steps
    for a, b in zip(jax.tree.leaves(p0), jax.tree.leaves(p1)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


def test_packed_run_draws_batch_size_per_step(tmp_path, shared_cache):
    run_dir = tmp_path / "packed"
    argv = tiny_overrides(run_dir, shared_cache, "data.packing=true", "train.steps=3",
                          "mixing.local_source=train")
    assert main(argv) == 0
    lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [int(np.sum(l["drawn"])) for l in lines] == [8, 8, 8]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["packing"]["examples"] == 24 and summary["packing"]["rows"] == 8


def test_overflowing_run_uses_one_row_per_example(tmp_path, shared_cache):
    run_dir = tmp_path / "tight"
    argv = tiny_overrides(run_dir, shared_cache, "data.packing=true", "data.pack_rows=2",
                          "mesh.data=2", "mesh.tensor=4")
    assert main(argv) == 0  # the fixture's examples fill seq_len=32: 8 of them need 8 rows
    lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [int(np.sum(l["drawn"])) for l in lines] == [8, 8]
    packing = json.loads((run_dir / "summary.json").read_text())["packing"]
    assert packing["overflow_steps"] == packing["steps"] == 2 and packing["examples"] == 16


class _Lengths:
    """A store stand-in: only offsets (lengths) and items of that many tokens."""

    def __init__(self, lengths):
        self.offsets = np.concatenate([[0], np.cumsum(lengths)])

    def __getitem__(self, i):
        n = self.offsets[i + 1] - self.offsets[i]
        return np.ones(n, np.int32), np.ones(n, np.uint8)


def test_overflow_is_decided_for_all_hosts_alike():
    """A host whose own slice fits still overflows when another host's slice does not."""
    stores = [_Lengths([17, 17, 3, 3])]
    plan = {"dataset": np.zeros(4, int), "index": np.array([2, 3, 0, 1])}  # host 0: short; host 1: long
    assert step_rows(plan, stores, 4, 2, T, pack_rows=1) == 2
    plan["index"] = np.array([2, 3, 3, 2])  # both hosts fit one row
    assert step_rows(plan, stores, 4, 2, T, pack_rows=1) == 1
