"""Hugging Face checkpoints: logits equal transformers' PyTorch reference; export round trips.

The fixtures in `tests/fixtures/parity/` (random tiny fp32 checkpoints and their
reference logits) are made by `scripts/make_parity_fixtures.py`, so these tests need
no torch; the one test that loads an export into transformers skips without it.
"""

import dataclasses
import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from hbo_jax.config import MeshConfig
from hbo_jax.models.hf import export_hf, load_hf
from hbo_jax.models.loading import CheckpointMismatch
from hbo_jax.parallel import make_mesh

PARITY = Path(__file__).parent / "fixtures" / "parity"
CONFIGS = ["llama3", "qwen2", "tied"]
TOL = 1e-4


def _mesh(shape=(2, 2, 2)):
    return make_mesh(MeshConfig(data=shape[0], fsdp=shape[1], tensor=shape[2]))


def _logits(graphdef, params, tokens) -> np.ndarray:
    # jitted, as the model always runs (op by op on a sharded mesh it took most of the test's time)
    return np.asarray(jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))(params, tokens))


def _reference(name):
    ref = np.load(PARITY / name / "reference.npz")
    return ref["tokens"], ref["logits"]


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_transformers(name):
    tokens, ref = _reference(name)
    graphdef, params, _ = load_hf(PARITY / name, _mesh())
    assert np.abs(_logits(graphdef, params, tokens) - ref).max() <= TOL


@pytest.mark.parametrize("shape", [(8, 1, 1), (1, 2, 4)])
def test_logits_match_transformers_on_other_meshes(shape):
    tokens, ref = _reference("qwen2")
    graphdef, params, _ = load_hf(PARITY / "qwen2", _mesh(shape))
    assert np.abs(_logits(graphdef, params, tokens) - ref).max() <= TOL


def test_llama3_fixture_depends_on_rope_scaling():
    tokens, ref = _reference("llama3")
    graphdef, params, spec = load_hf(PARITY / "llama3", _mesh())
    assert spec.rope_scaling is not None
    unscaled = nnx.merge(graphdef, params)
    unscaled.spec = dataclasses.replace(spec, rope_scaling=None)
    assert np.abs(np.asarray(unscaled(tokens)) - ref).max() > 100 * TOL


@pytest.mark.parametrize("name", CONFIGS)
def test_export_round_trip_gives_identical_logits(name, tmp_path):
    tokens, _ = _reference(name)
    mesh = _mesh()
    graphdef, params, spec = load_hf(PARITY / name, mesh)
    export_hf(params, spec, None, tmp_path / "out")
    graphdef2, params2, spec2 = load_hf(tmp_path / "out", mesh)
    assert spec2 == spec
    np.testing.assert_array_equal(_logits(graphdef2, params2, tokens), _logits(graphdef, params, tokens))


@pytest.mark.parametrize("name", ["qwen2"])  # biases, an untied head, a sharded checkpoint
def test_stacked_blocks_load_and_export_like_unrolled_ones(name, tmp_path):
    """model.scan_layers: the per-layer tensors stack on load (logits still match transformers)
    and unstack on export, into the very file the unrolled model exports."""
    tokens, ref = _reference(name)
    mesh = _mesh()
    graphdef, params, spec = load_hf(PARITY / name, mesh, scan_layers=True)
    assert params["layers"]["mlp"]["up_proj"]["kernel"].shape[0] == spec.num_layers
    assert np.abs(_logits(graphdef, params, tokens) - ref).max() <= TOL
    export_hf(params, spec, None, tmp_path / "scanned")
    _, plain, plain_spec = load_hf(PARITY / name, mesh)
    export_hf(plain, plain_spec, None, tmp_path / "plain")
    for f in ("model.safetensors", "config.json"):
        assert (tmp_path / "scanned" / f).read_bytes() == (tmp_path / "plain" / f).read_bytes(), f


def test_export_writes_tokenizer_that_autotokenizer_loads(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["hello world", "the quick brown fox"] * 10,
                            trainers.BpeTrainer(vocab_size=280, special_tokens=["<unk>"]))
    _, params, spec = load_hf(PARITY / "tied", _mesh())
    export_hf(params, spec, tok, tmp_path / "out")
    loaded = AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    assert loaded("hello brown fox")["input_ids"] == tok.encode("hello brown fox").ids


@pytest.mark.parametrize("name", CONFIGS)
def test_export_loads_in_transformers(name, tmp_path):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    tokens, _ = _reference(name)
    graphdef, params, spec = load_hf(PARITY / name, _mesh())
    export_hf(params, spec, None, tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=torch.float32)
    with torch.no_grad():
        theirs = model(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()
    diff = np.abs(theirs - _logits(graphdef, params, tokens)).max()
    print(f"{name}: export -> transformers max abs logit diff {diff:.3g}")
    assert diff <= TOL


def _copy_fixture(tmp_path, name="tied") -> Path:
    return Path(shutil.copytree(PARITY / name, tmp_path / name))


def _rewrite_tensors(path: Path, edit) -> None:
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


def test_missing_tensor_is_named(tmp_path):
    d = _copy_fixture(tmp_path)
    _rewrite_tensors(d / "model.safetensors", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointMismatch, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*missing"):
        load_hf(d, _mesh())


def test_wrong_shape_is_named(tmp_path):
    d = _copy_fixture(tmp_path)

    def shrink(t):
        t["model.layers.0.self_attn.k_proj.weight"] = t["model.layers.0.self_attn.k_proj.weight"][:8]

    _rewrite_tensors(d / "model.safetensors", shrink)
    with pytest.raises(CheckpointMismatch, match=r"model\.layers\.0\.self_attn\.k_proj\.weight.*shape"):
        load_hf(d, _mesh())


def test_unexpected_tensor_is_named(tmp_path):
    d = _copy_fixture(tmp_path)
    _rewrite_tensors(d / "model.safetensors",
                     lambda t: t.update({"model.layers.0.self_attn.o_proj.bias": np.zeros(64, np.float32)}))
    with pytest.raises(CheckpointMismatch, match=r"unexpected tensor 'model\.layers\.0\.self_attn\.o_proj\.bias'"):
        load_hf(d, _mesh())


def test_unsupported_architecture_names_the_field(tmp_path):
    d = _copy_fixture(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(CheckpointMismatch, match="model_type 'gpt2'"):
        load_hf(d, _mesh())


def test_unsupported_rope_type_names_the_field(tmp_path):
    d = _copy_fixture(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointMismatch, match="rope type 'yarn'"):
        load_hf(d, _mesh())
