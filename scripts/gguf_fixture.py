"""Writes a Hugging Face Llama / Qwen2 directory as a GGUF file the way llama.cpp's
converter lays it out; used by `make_parity_fixtures.py` and by tests/test_gguf.py.

Needs only numpy, safetensors and gguf (no torch, no hbo_jax), so both environments
can import it. llama.cpp conventions reproduced here: GGUF tensor names, the q/k row
permutation of the `llama` architecture (none for `qwen2`), metadata keys under the
architecture's prefix.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np

# Hugging Face name fragment -> GGUF name fragment (applied in order).
HF_TO_GGUF = {
    "model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "model.layers.": "blk.",
}


def llamacpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's conversion for `llama`: interleave the two rotary halves of each head's rows."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llamacpp_rope_factors(cfg: dict) -> np.ndarray:
    """llama.cpp's `rope_freqs` for a config with Llama-3 RoPE scaling: 1 for short
    wavelengths, `factor` for long ones, 1 / ((1 - s) / factor + s) in between."""
    rope = cfg["rope_parameters"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    freqs = 1.0 / rope["rope_theta"] ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    old, low, high, factor = (rope["original_max_position_embeddings"], rope["low_freq_factor"],
                              rope["high_freq_factor"], rope["factor"])
    out = []
    for freq in freqs:
        wavelen = 2 * np.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            s = (old / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - s) / factor + s))
    return np.asarray(out, np.float32)


def gguf_tensors(hf_dir: Path, arch: str) -> tuple[dict, dict[str, np.ndarray]]:
    """(config.json, GGUF-named fp32 tensors) of a Hugging Face directory."""
    from safetensors.numpy import load_file

    cfg = json.loads((hf_dir / "config.json").read_text())
    tensors: dict = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    out = {}
    for name, t in sorted(tensors.items()):
        t = t.astype(np.float32)
        if arch == "llama" and name.endswith("q_proj.weight"):
            t = llamacpp_permute(t, cfg["num_attention_heads"])
        elif arch == "llama" and name.endswith("k_proj.weight"):
            t = llamacpp_permute(t, cfg["num_key_value_heads"])
        for a, b in HF_TO_GGUF.items():
            name = name.replace(a, b)
        out[name] = t
    return cfg, out


def write_gguf(path: Path, hf_dir: Path, arch: str = "llama", edit: Callable | None = None,
               tokenizer: Callable | None = None, quantize: dict | None = None) -> Path:
    """Converts `hf_dir` to `path`.

    Args:
        arch: `general.architecture` (`llama` permutes q/k rows; others do not).
        edit: Called with the {gguf name: array} dict before writing (tests break files).
        tokenizer: Called with the open `gguf.GGUFWriter` to add tokenizer metadata.
        quantize: {gguf name: GGMLQuantizationType} for tensors to store quantized.
    """
    import gguf

    cfg, tensors = gguf_tensors(hf_dir, arch)
    if edit:
        edit(tensors)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_dimension_count(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])
    w.add_vocab_size(cfg["vocab_size"])
    rope = cfg.get("rope_parameters") or {}
    if rope.get("rope_type") == "llama3":
        tensors["rope_freqs.weight"] = llamacpp_rope_factors(cfg)
    if tokenizer:
        tokenizer(w)
    for name, t in tensors.items():
        kind = (quantize or {}).get(name)
        if kind is None:
            w.add_tensor(name, t)
        else:
            q = gguf.quants.quantize(t, kind)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
