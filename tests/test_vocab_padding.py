"""model.vocab_multiple: padded vocabulary rows shard evenly, are never predicted, and
never reach an export."""

from pathlib import Path

import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from hbo_jax.config import MeshConfig, ModelConfig
from hbo_jax.models.hf import export_hf, load_hf
from hbo_jax.models.llama import LlamaSpec, init_params
from hbo_jax.parallel import make_mesh

PARITY = Path(__file__).parent / "fixtures" / "parity"
MULTIPLE = 96  # the fixtures' vocabulary of 256 pads to 288

def _mesh():
    return make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))

@pytest.mark.parametrize("name", ["llama3", "tied"])
def test_padded_model_gives_the_reference_logits_and_never_predicts_padding(name):
    ref = np.load(PARITY / name / "reference.npz")
    graphdef, params, spec = load_hf(PARITY / name, _mesh(), vocab_multiple=MULTIPLE)
    assert spec.padded_vocab == 288 and params["embed"][...].shape == (288, spec.hidden_size)
    logits = np.asarray(nnx.merge(graphdef, params)(ref["tokens"]))
    assert np.abs(logits[..., :256] - ref["logits"]).max() <= 1e-4
    assert np.all(logits[..., 256:] == np.finfo(np.float32).min)

@pytest.mark.parametrize("name", ["llama3", "tied"])
def test_export_of_a_padded_model_equals_the_unpadded_export(name, tmp_path):
    mesh = _mesh()
    for multiple, out in ((1, "plain"), (MULTIPLE, "padded")):
        _, params, spec = load_hf(PARITY / name, mesh, vocab_multiple=multiple)
        export_hf(params, spec, None, tmp_path / out)
    for f in ("model.safetensors", "config.json"):
        assert (tmp_path / "padded" / f).read_bytes() == (tmp_path / "plain" / f).read_bytes(), f

def test_padding_lets_an_odd_vocabulary_shard():
    mesh = make_mesh(MeshConfig(data=1, fsdp=2, tensor=4))
    cfg = ModelConfig(hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=32,
                      tie_embeddings=False)
    specs = {}
    for multiple in (1, 8):
        spec = LlamaSpec.from_config(ModelConfig(**{**cfg.__dict__, "vocab_multiple": multiple}), vocab_size=250)
        _, params = init_params(spec, mesh, 0)
        specs[multiple] = (params["embed"][...].sharding.spec, params["lm_head"]["kernel"][...].sharding.spec)
    assert specs[1] == (P(None, None), P("fsdp", None))
    assert specs[8] == (P(("fsdp", "tensor"), None), P("fsdp", "tensor"))

