"""The jitted step on 8 fake devices against single-device and plain-NumPy references."""

import jax
import numpy as np
import pytest

from hbo_jax.config import MeshConfig, ModelConfig
from hbo_jax.models.llama import LlamaSpec, init_params
from hbo_jax.parallel import global_batch_from_host, make_mesh
from hbo_jax.step import init_train_state, make_optimizer, make_train_step, state_shardings, token_nll

SPEC = LlamaSpec.from_config(ModelConfig(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                         intermediate_size=64), vocab_size=64)
D, K, B, T = 3, 2, 16, 12


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    mask = (rng.random((B, T)) < 0.6).astype(np.float32)
    mask[:, 0] = 1.0  # every example has loss tokens
    return {"input_ids": rng.integers(0, 64, (B, T)).astype(np.int32),
            "targets": rng.integers(0, 64, (B, T)).astype(np.int32), "loss_mask": mask,
            "group_id": rng.integers(0, D * K, B).astype(np.int32)}


def _run_step(mesh_cfg: MeshConfig, batch):
    mesh = make_mesh(mesh_cfg, jax.devices()[: abs(mesh_cfg.data * mesh_cfg.fsdp * mesh_cfg.tensor)])
    graphdef, params = init_params(SPEC, mesh, seed=0)
    tx = make_optimizer(1e-3, 10, 1, 0.0, 1.0)
    host_params = jax.device_get(params)  # the step donates the state's buffers
    state = init_train_state(params, tx, mesh)
    step = make_train_step(graphdef, tx, mesh, D * K, state_shardings(state))
    _, metrics = step(state, global_batch_from_host(batch, mesh))
    return jax.device_get(metrics), graphdef, host_params


@pytest.fixture(scope="module")
def single():
    return _run_step(MeshConfig(1, 1, 1), _batch())


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 2, 2), (1, 2, 4)])
def test_sharded_group_stats_equal_single_device(single, shape):
    sharded, _, _ = _run_step(MeshConfig(*shape), _batch())
    for key in ("loss", "grad_norm", "group_example_nll", "group_token_nll", "group_tokens", "group_examples"):
        np.testing.assert_allclose(sharded[key], single[0][key], rtol=2e-5, atol=1e-5, err_msg=key)


def test_group_stats_equal_plain_numpy(single):
    metrics, graphdef, params = single
    batch = _batch()
    nll = np.asarray(token_nll(graphdef, params, batch["input_ids"], batch["targets"]))
    m = batch["loss_mask"]
    ex = (nll * m).sum(1) / m.sum(1)
    want_ex = np.zeros(D * K)
    want_n = np.zeros(D * K)
    for g, e in zip(batch["group_id"], ex):
        want_ex[g] += e
        want_n[g] += 1
    np.testing.assert_allclose(metrics["group_example_nll"], want_ex, rtol=1e-5)
    np.testing.assert_array_equal(metrics["group_examples"], want_n)
    np.testing.assert_allclose(metrics["loss"], (nll * m).sum() / m.sum(), rtol=1e-5)


def test_sharded_forward_equals_single_device():
    tokens = np.random.default_rng(1).integers(0, 64, (8, T)).astype(np.int32)
    outs = []
    for shape in [(1, 1, 1), (2, 2, 2)]:
        mc = MeshConfig(*shape)
        mesh = make_mesh(mc, jax.devices()[: shape[0] * shape[1] * shape[2]])
        graphdef, params = init_params(SPEC, mesh, seed=0)
        outs.append(np.asarray(jax.jit(lambda p, t: token_nll(graphdef, p, t, t))(params, tokens)))
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-5, atol=1e-5)


def test_group_ppl_ratio_is_one_against_own_nll():
    """With ref_nll = the model's own per-example NLL, every example's ratio is exactly ~1."""
    mesh = make_mesh(MeshConfig(2, 2, 2))
    graphdef, params = init_params(SPEC, mesh, seed=0)
    batch = _batch()
    nll = np.asarray(token_nll(graphdef, jax.device_get(params), batch["input_ids"], batch["targets"]))
    m = batch["loss_mask"]
    batch["ref_nll"] = ((nll * m).sum(1) / m.sum(1)).astype(np.float32)
    tx = make_optimizer(1e-3, 10, 1, 0.0, 1.0)
    state = init_train_state(params, tx, mesh)
    step = make_train_step(graphdef, tx, mesh, D * K, state_shardings(state), ref_nll=True)
    _, metrics = step(state, global_batch_from_host(batch, mesh))
    np.testing.assert_allclose(metrics["group_ppl_ratio"], metrics["group_examples"], rtol=1e-5)
