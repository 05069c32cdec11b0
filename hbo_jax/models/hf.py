"""Hugging Face Llama / Qwen2 checkpoints in and out, offline, tensor by tensor.

`load_hf` reads a directory with `config.json` and `model.safetensors` (or a sharded
`model.safetensors.index.json`) straight into the sharded parameters of our NNX model:
each device shard is sliced out of the memory-mapped file, so neither the whole model
nor a second copy of it is ever built on the host (a host reads only the slices its
devices hold). `export_hf` writes `config.json` + `model.safetensors` (+ tokenizer
files) that `transformers.AutoModelForCausalLM.from_pretrained` loads; it too writes
one tensor at a time (`hbo_jax.models.tensor_io`, which also reads these directories,
run checkpoints and GGUF files by Hugging Face name).

The mapping between Hugging Face names and our parameter paths lives in one table,
`_NAME_TABLE`. Hugging Face `Linear` weights are `[out, in]`; our kernels are `[in, out]`,
so every kernel is transposed on the way in and out.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path

import jax
import numpy as np

from hbo_jax.errors import CheckpointMismatch
from hbo_jax.models.llama import LlamaSpec, RopeScaling, abstract_model
from hbo_jax.models.loading import VOCAB_AXES, flat_params, layer_entry, place_params
from hbo_jax.models.safetensors_writer import SafetensorsWriter
from hbo_jax.models.tensor_io import SafetensorsReader, TensorInfo

# (Hugging Face name, our parameter path, transposed). `{i}` is the layer index.
# Rows whose path is absent from a model (lm_head when tied, biases without
# qkv_bias) are skipped for that model.
_NAME_TABLE: tuple[tuple[str, str, bool], ...] = (
    ("model.embed_tokens.weight", "embed", False),
    ("model.norm.weight", "norm.weight", False),
    ("lm_head.weight", "lm_head.kernel", True),
    ("model.layers.{i}.input_layernorm.weight", "layers.{i}.input_norm.weight", False),
    ("model.layers.{i}.post_attention_layernorm.weight", "layers.{i}.post_attn_norm.weight", False),
    ("model.layers.{i}.self_attn.q_proj.weight", "layers.{i}.attn.q_proj.kernel", True),
    ("model.layers.{i}.self_attn.k_proj.weight", "layers.{i}.attn.k_proj.kernel", True),
    ("model.layers.{i}.self_attn.v_proj.weight", "layers.{i}.attn.v_proj.kernel", True),
    ("model.layers.{i}.self_attn.o_proj.weight", "layers.{i}.attn.o_proj.kernel", True),
    ("model.layers.{i}.self_attn.q_proj.bias", "layers.{i}.attn.q_proj.bias", False),
    ("model.layers.{i}.self_attn.k_proj.bias", "layers.{i}.attn.k_proj.bias", False),
    ("model.layers.{i}.self_attn.v_proj.bias", "layers.{i}.attn.v_proj.bias", False),
    ("model.layers.{i}.mlp.gate_proj.weight", "layers.{i}.mlp.gate_proj.kernel", True),
    ("model.layers.{i}.mlp.up_proj.weight", "layers.{i}.mlp.up_proj.kernel", True),
    ("model.layers.{i}.mlp.down_proj.weight", "layers.{i}.mlp.down_proj.kernel", True),
)

# Tensors some checkpoints carry that the model does not need.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

# Stored dtypes of an export (the `--dtype` choices), by their config.json name.
_EXPORT_DTYPES = {"float32": np.float32, "bfloat16": jax.numpy.bfloat16, "float16": np.float16}
_SUPPORTED_TYPES = ("llama", "qwen2")


def name_map(spec: LlamaSpec) -> dict[str, tuple[str, bool]]:
    """Our parameter path -> (Hugging Face tensor name, transposed) for a model shape.

    Args:
        spec: The model shape; decides whether `lm_head` and q/k/v biases exist.

    Returns:
        One entry per parameter of `LlamaLM(spec)`, in a stable order.
    """
    out = {}
    for hf_name, path, transposed in _NAME_TABLE:
        if path.startswith("lm_head") and spec.tie_embeddings:
            continue
        if path.endswith(".bias") and not spec.qkv_bias:
            continue
        layers = range(spec.num_layers) if "{i}" in path else [None]
        for i in layers:
            out[path.format(i=i)] = (hf_name.format(i=i), transposed)
    return out


# ----------------------------------------------------------------------------- config


def _rope(cfg: dict) -> tuple[float, RopeScaling | None]:
    """(rope_theta, scaling) from a v5 `rope_parameters` or legacy `rope_scaling` config."""
    params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    if params and all(isinstance(v, dict) for v in params.values()):
        raise CheckpointMismatch("config.json: per-layer rope_parameters are not supported")
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise CheckpointMismatch(f"config.json: rope type {kind!r} is not supported (default, llama3)")
    try:
        scaling = RopeScaling(
            factor=float(params["factor"]), low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(params.get(
                "original_max_position_embeddings", cfg.get("max_position_embeddings"))))
    except (KeyError, TypeError) as e:
        raise CheckpointMismatch(f"config.json: llama3 rope scaling lacks field {e}") from None
    return theta, scaling


def spec_from_hf_config(cfg: dict, *, dtype: str = "float32", param_dtype: str = "float32",
                        remat: bool = False) -> LlamaSpec:
    """Builds our model shape from a Hugging Face `config.json` dict.

    Args:
        cfg: The parsed `config.json` of a Llama or Qwen2 model.
        dtype: Compute dtype (`float32` or `bfloat16`).
        param_dtype: Dtype of the master weights.
        remat: Rematerialise each block in the backward pass.

    Returns:
        The LlamaSpec the checkpoint's weights fit.

    Raises:
        CheckpointMismatch: The architecture or one of its options is not supported;
            the message names the config field.
    """
    mtype = cfg.get("model_type")
    if mtype not in _SUPPORTED_TYPES:
        raise CheckpointMismatch(f"config.json: model_type {mtype!r} is not supported {_SUPPORTED_TYPES}")
    if cfg.get("hidden_act", "silu") != "silu":
        raise CheckpointMismatch(f"config.json: hidden_act {cfg['hidden_act']!r} is not supported (silu)")
    if cfg.get("mlp_bias"):
        raise CheckpointMismatch("config.json: mlp_bias=true is not supported")
    if mtype == "llama" and cfg.get("attention_bias"):
        raise CheckpointMismatch("config.json: attention_bias=true (o_proj bias) is not supported")
    if mtype == "qwen2" and cfg.get("use_sliding_window"):
        raise CheckpointMismatch("config.json: use_sliding_window=true is not supported")
    try:
        heads = int(cfg["num_attention_heads"])
        theta, scaling = _rope(cfg)
        context = cfg.get("max_position_embeddings")
        return LlamaSpec(
            vocab_size=int(cfg["vocab_size"]), hidden_size=int(cfg["hidden_size"]),
            num_layers=int(cfg["num_hidden_layers"]), num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or cfg["hidden_size"] // heads),
            intermediate_size=int(cfg["intermediate_size"]), rope_theta=theta,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=mtype == "qwen2", dtype=dtype, param_dtype=param_dtype, remat=remat,
            rope_scaling=scaling, max_position_embeddings=int(context) if context else None)
    except KeyError as e:
        raise CheckpointMismatch(f"config.json: required field {e} is missing") from None


def hf_config_from_spec(spec: LlamaSpec, max_position_embeddings: int | None = None,
                        torch_dtype: str = "float32", extra: dict | None = None) -> dict:
    """The `config.json` dict (transformers v5 layout) describing `spec`.

    The context length and RoPE settings are the spec's, so a model loaded from a
    checkpoint declares its source's (`max_position_embeddings`, `rope_parameters`).

    Args:
        spec: Our model shape.
        max_position_embeddings: Context length to declare when the spec carries none
            (a model built from ModelConfig); default 4096. Ignored otherwise.
        torch_dtype: Dtype the weights are stored in.
        extra: Fields to add or override (token ids, ...).

    Returns:
        A JSON-serialisable dict: `LlamaForCausalLM`, or `Qwen2ForCausalLM` when the
        spec has q/k/v biases.
    """
    if spec.rope_freq_factors is not None:
        raise CheckpointMismatch("per-frequency RoPE divisors (a GGUF 'rope_freqs' tensor without the Llama-3 "
                                 "form) have no Hugging Face config.json field; export is not possible")
    qwen = spec.qkv_bias
    rope = {"rope_type": "default", "rope_theta": spec.rope_theta}
    legacy_scaling = None
    if spec.rope_scaling is not None:
        s = spec.rope_scaling
        legacy_scaling = {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                          "high_freq_factor": s.high_freq_factor,
                          "original_max_position_embeddings": s.original_max_position_embeddings}
        rope = {**legacy_scaling, "rope_theta": spec.rope_theta}
    context = spec.max_position_embeddings or max_position_embeddings or 4096
    cfg = {
        "architectures": ["Qwen2ForCausalLM" if qwen else "LlamaForCausalLM"],
        "model_type": "qwen2" if qwen else "llama",
        "vocab_size": spec.vocab_size, "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size, "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads, "num_key_value_heads": spec.num_kv_heads,
        "head_dim": spec.head_dim, "hidden_act": "silu", "rms_norm_eps": spec.rms_norm_eps,
        "max_position_embeddings": context, "rope_parameters": rope,
        # transformers < 5 and the servers built on it read these two instead of rope_parameters.
        "rope_theta": spec.rope_theta, "rope_scaling": legacy_scaling,
        "tie_word_embeddings": spec.tie_embeddings,
        "dtype": torch_dtype, "use_cache": True,
    }
    if qwen:
        cfg.update(use_sliding_window=False, sliding_window=None)
    else:
        cfg.update(attention_bias=False, mlp_bias=False)
    cfg.update(extra or {})
    return cfg


# ----------------------------------------------------------------------------- loading


def load_hf(model_dir: str | Path, mesh, *, dtype: str = "float32", param_dtype: str = "float32",
            remat: bool = False, vocab_multiple: int = 1, scan_layers: bool = False):
    """Loads a Hugging Face Llama / Qwen2 directory into sharded NNX parameters.

    Args:
        model_dir: Directory with `config.json` and `model.safetensors` or
            `model.safetensors.index.json` + shards.
        mesh: The device mesh; parameters land in the shardings of `hbo_jax.parallel`.
        dtype: Compute dtype of the model.
        param_dtype: Dtype of the loaded parameters (weights are cast per tensor).
        remat: Rematerialise each block in the backward pass.
        vocab_multiple: Pad the vocabulary rows to a multiple of this (zeros).
        scan_layers: Stack the blocks' parameters on a leading layer axis (`LlamaSpec`).

    Returns:
        (graphdef, params, spec): `nnx.merge(graphdef, params)` is the model.

    Raises:
        CheckpointMismatch: A tensor is missing, has the wrong shape or is not
            expected, or the config is unsupported; the message names it.
    """
    model_dir = Path(model_dir)
    spec = dataclasses.replace(spec_from_hf_config(json.loads((model_dir / "config.json").read_text()),
                                                   dtype=dtype, param_dtype=param_dtype, remat=remat),
                               vocab_multiple=vocab_multiple, scan_layers=scan_layers)
    graphdef, abstract = abstract_model(spec)
    names = name_map(spec)
    src = SafetensorsReader(model_dir)
    have = set(src.names())
    used = {hf for hf, _ in names.values()}
    extra = sorted(n for n in have - used if not n.endswith(_IGNORED_SUFFIXES)
                   and not (spec.tie_embeddings and n == "lm_head.weight"))
    if extra:
        raise CheckpointMismatch(f"{model_dir}: unexpected tensor {extra[0]!r} (and {len(extra) - 1} more)")
    def source(hf_name: str):
        if hf_name not in have:
            raise CheckpointMismatch(f"{model_dir}: tensor {hf_name!r} is missing")
        return src.slice(hf_name)

    try:
        params = place_params(abstract, mesh, names, source, model_dir)
    finally:
        src.close()
    return graphdef, params, spec


def load_hf_tokenizer(model_dir: str | Path):
    """The tokenizer (with its chat template) saved in a Hugging Face directory."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


# ----------------------------------------------------------------------------- export


def _host_array(x) -> np.ndarray:
    if not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))


def export_hf(params, spec: LlamaSpec, tokenizer, out_dir: str | Path, *, dtype: str | None = None,
              max_position_embeddings: int | None = None, max_shard_bytes: int | None = None,
              overwrite: bool = False) -> Path:
    """Writes a directory that `transformers.AutoModelForCausalLM.from_pretrained` loads.

    Tensors are gathered and written one at a time (`safetensors_writer.SafetensorsWriter`), so
    host memory holds at most one full tensor beyond the model; the directory appears
    only once complete. In a multi-process run every process must call this (gathers
    are collective); only process 0 writes.

    Args:
        params: The model's `nnx.Param` state (as from `load_hf` or `init_params`).
        spec: The model shape.
        tokenizer: A `transformers` tokenizer, a `tokenizers.Tokenizer`, or None.
        out_dir: Output directory (created).
        dtype: Stored dtype (`float32`, `bfloat16`, `float16`); default the params'.
        max_position_embeddings: Context length to declare when the spec carries none
            (a model built from ModelConfig); default 4096. A spec loaded from a
            checkpoint declares its source's context length and RoPE settings.
        max_shard_bytes: Split the weights into shards of at most this many bytes with
            `model.safetensors.index.json`; None: one `model.safetensors`.
        overwrite: Replace an existing `out_dir`; otherwise one that is not empty is refused.

    Returns:
        The output directory.

    Raises:
        FileExistsError: `out_dir` exists and is not empty, without `overwrite`.
        CheckpointMismatch: The spec has no config.json form (nothing is written).
    """
    out_dir = Path(out_dir)
    hf_config_from_spec(spec, max_position_embeddings, "float32")  # fails before writing if it cannot be written
    stored = dtype or spec.param_dtype
    np_dtype = np.dtype(_EXPORT_DTYPES[stored])
    names = name_map(spec)

    def unpadded(path: str, arr):  # the real vocabulary's rows only
        axis = VOCAB_AXES.get(path)
        if axis is None or arr.shape[axis] == spec.vocab_size:
            return arr
        return jax.lax.slice_in_dim(arr, 0, spec.vocab_size, axis=axis)

    flat = flat_params(params)

    def tensor(path: str):  # a stacked block parameter: this layer's slice, made on device when written
        x, layer = layer_entry(flat, path)
        return unpadded(path, x if layer is None else x[layer])

    def shape(path: str) -> tuple[int, ...]:
        x, layer = layer_entry(flat, path)
        out = list(x.shape[1:] if layer is not None else x.shape)
        if path in VOCAB_AXES:
            out[VOCAB_AXES[path]] = spec.vocab_size
        return tuple(out)

    tensors = [TensorInfo(hf_name, shape(path)[::-1] if transposed else shape(path), np_dtype)
               for path, (hf_name, transposed) in names.items()]
    writer = (SafetensorsWriter(out_dir, tensors, max_shard_bytes=max_shard_bytes, overwrite=overwrite)
              if jax.process_index() == 0 else None)
    with writer or contextlib.nullcontext():
        for path, (hf_name, transposed) in names.items():
            arr = _host_array(tensor(path))  # collective: every process gathers, process 0 writes
            if writer:
                writer.write(hf_name, (arr.T if transposed else arr).astype(np_dtype))
        if writer:  # the config and tokenizer go into the same directory, published with the weights
            cfg = hf_config_from_spec(spec, max_position_embeddings, stored, tokenizer_ids(tokenizer))
            write_hf_metadata(writer.staging_dir, cfg, tokenizer)
    return out_dir


def hf_arrays(params, spec: LlamaSpec) -> dict[str, np.ndarray]:
    """A model's parameters on this host as Hugging Face tensors: names, `[out, in]`, no vocabulary padding.

    For small models (a whole copy in host memory); `export_hf` streams instead.
    """
    out = {}
    flat = flat_params(params)
    for path, (hf_name, transposed) in name_map(spec).items():
        arr = _host_array(flat[path])
        axis = VOCAB_AXES.get(path)
        if axis is not None:
            arr = np.take(arr, np.arange(spec.vocab_size), axis=axis)
        out[hf_name] = np.ascontiguousarray(arr.T if transposed else arr)
    return out


def write_hf_metadata(out_dir: Path, config: dict, tokenizer) -> None:
    """Writes `config.json`, `generation_config.json` (the config's token ids) and the tokenizer files.

    Args:
        out_dir: An existing directory (a writer's staging directory).
        config: The config.json dict.
        tokenizer: A `transformers` tokenizer, a `tokenizers.Tokenizer`, or None.
    """
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out_dir / "generation_config.json").write_text(json.dumps(
        {k: v for k, v in config.items() if k in ("bos_token_id", "eos_token_id", "pad_token_id")},
        indent=2) + "\n")
    if tokenizer is not None:
        _save_tokenizer(tokenizer, out_dir)


def tokenizer_ids(tokenizer) -> dict:
    """`{bos,eos,pad}_token_id` of a transformers tokenizer (those it has), for config.json."""
    if tokenizer is None or not hasattr(tokenizer, "save_pretrained"):
        return {}
    ids = {f"{k}_token_id": getattr(tokenizer, f"{k}_token_id", None) for k in ("bos", "eos", "pad")}
    return {k: v for k, v in ids.items() if v is not None}


def _save_tokenizer(tokenizer, out_dir: Path) -> None:
    if not hasattr(tokenizer, "save_pretrained"):  # a bare `tokenizers.Tokenizer`
        from transformers import PreTrainedTokenizerFast

        tokenizer = PreTrainedTokenizerFast(tokenizer_object=tokenizer)
    tokenizer.save_pretrained(str(out_dir))
