"""Compute options (rematerialisation policy, attention implementation, chunked loss)
change speed and memory, never the numbers."""

from pathlib import Path

import jax
import numpy as np
import pytest

from hbo_jax.config import MeshConfig, ModelConfig
from hbo_jax.models.llama import LlamaSpec, init_params
from hbo_jax.models.pretrained import load_pretrained
from hbo_jax.parallel import make_mesh
from hbo_jax.step import masked_mean_loss, token_nll

PARITY = Path(__file__).parent / "fixtures" / "parity"


def _loss_and_grads(spec, mesh, ids):
    graphdef, params = init_params(spec, mesh, seed=0)
    fn = jax.jit(jax.value_and_grad(lambda p: masked_mean_loss(
        token_nll(graphdef, p, ids[:, :-1], ids[:, 1:]), np.ones(ids[:, 1:].shape, np.float32))))
    loss, grads = fn(params)
    return float(loss), np.concatenate([np.ravel(np.asarray(g)) for g in jax.tree.leaves(grads)])


@pytest.mark.parametrize("remat,policy,attention,chunk", [
    (True, "full", "auto", 0), (True, "dots", "auto", 0), (True, "dots_no_batch", "auto", 0),
    (False, "full", "xla", 0), (False, "full", "auto", 5), (True, "full", "auto", 4)])
def test_compute_options_leave_loss_and_gradients_unchanged(remat, policy, attention, chunk):
    mesh = make_mesh(MeshConfig())
    cfg = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                      intermediate_size=64)
    ids = np.random.default_rng(0).integers(0, 64, (8, 17)).astype(np.int32)
    base = _loss_and_grads(LlamaSpec.from_config(cfg), mesh, ids)
    opts = ModelConfig(**{**cfg.__dict__, "remat": remat, "remat_policy": policy, "attention": attention,
                          "loss_chunk": chunk})  # 16 positions: chunk 5 pads the last chunk, 4 does not
    got = _loss_and_grads(LlamaSpec.from_config(opts), mesh, ids)
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
