"""Compute options (rematerialisation policy, attention implementation, chunked loss, stacked blocks)
change speed and memory, never the numbers."""

import dataclasses
from pathlib import Path

import jax
import numpy as np
import pytest

from hbo_jax.config import MeshConfig, ModelConfig
from hbo_jax.models.hf import name_map
from hbo_jax.models.llama import LlamaSpec, init_params
from hbo_jax.models.loading import flat_params, layer_entry
from hbo_jax.models.pretrained import load_pretrained
from hbo_jax.parallel import make_mesh
from hbo_jax.step import masked_mean_loss, token_nll

PARITY = Path(__file__).parent / "fixtures" / "parity"


def _loss_and_grads(spec, mesh, ids):
    """(loss, the gradient by per-layer path: a stacked block's layer i under `layers.i.`)."""
    graphdef, params = init_params(spec, mesh, seed=0)
    fn = jax.jit(jax.value_and_grad(lambda p: masked_mean_loss(
        token_nll(graphdef, p, ids[:, :-1], ids[:, 1:]), np.ones(ids[:, 1:].shape, np.float32))))
    loss, grads = fn(params)
    flat = flat_params(jax.device_get(grads))
    names = name_map(dataclasses.replace(spec, scan_layers=False))  # every per-layer path
    return float(loss), np.concatenate([np.ravel(x if i is None else x[i])
                                        for x, i in (layer_entry(flat, path) for path in names)])


CFG = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64)
IDS = np.random.default_rng(0).integers(0, 64, (8, 17)).astype(np.int32)


@pytest.fixture(scope="module")
def base():
    """The default options' loss and gradients, computed once for every case."""
    return _loss_and_grads(LlamaSpec.from_config(CFG), make_mesh(MeshConfig()), IDS)


@pytest.mark.parametrize("remat,policy,attention,chunk,scan", [
    (True, "full", "auto", 0, False), (True, "dots", "auto", 0, False), (True, "dots_no_batch", "auto", 0, False),
    (False, "full", "xla", 0, False), (False, "full", "auto", 5, False), (True, "full", "auto", 4, False),
    (True, "dots", "auto", 5, True)])
def test_compute_options_leave_loss_and_gradients_unchanged(base, remat, policy, attention, chunk, scan):
    """... and so do stacked blocks (model.scan_layers), which start from the same weights."""
    opts = ModelConfig(**{**CFG.__dict__, "remat": remat, "remat_policy": policy, "attention": attention,
                          "loss_chunk": chunk, "scan_layers": scan})  # 16 positions: chunk 5 pads, 4 does not
    got = _loss_and_grads(LlamaSpec.from_config(opts), make_mesh(MeshConfig()), IDS)
    assert got[0] == pytest.approx(base[0], rel=1e-6)
    np.testing.assert_allclose(got[1], base[1], rtol=1e-4, atol=1e-7)


def test_pretrained_models_take_the_compute_options_from_config():
    mesh = make_mesh(MeshConfig())
    cfg = ModelConfig(remat=True, remat_policy="dots", attention="xla", loss_chunk=5)
    graphdef, params, spec = load_pretrained(f"hf:{PARITY / 'tied'}", mesh, cfg)
    assert (spec.remat, spec.remat_policy, spec.attention, spec.loss_chunk) == (True, "dots", "xla", 5)
    plain_graphdef, plain_params, _ = load_pretrained(f"hf:{PARITY / 'tied'}", mesh, ModelConfig())
    ids = np.arange(12, dtype=np.int32)[None] % spec.vocab_size
    np.testing.assert_allclose(np.asarray(token_nll(graphdef, params, ids, ids)),
                               np.asarray(token_nll(plain_graphdef, plain_params, ids, ids)), rtol=1e-5)
