"""Llama-family decoder in Flax NNX: RMSNorm, RoPE, grouped-query attention, SwiGLU.

Covers Llama 2/3, Qwen2 (qkv bias) and SmolLM2 (tied embeddings) through config.
Kernels are stored `[in, out]`; every parameter carries logical axis names in its
`out_sharding` metadata, resolved to mesh axes by `hbo_jax.parallel`. Parameters are
created without eager sharding: `init_sharded` builds them inside `jax.jit` with the
resolved output shardings, so nothing is materialised unsharded. An optional functional
KV cache (`LlamaLM.hidden_cached`) serves `hbo_jax.models.generate`.

With `scan_layers`, the blocks are one `Block` whose parameters carry a leading layer
axis (logical name `layers`, never sharded), run by `jax.lax.scan`: XLA compiles one
block instead of `num_layers`, and a layer's parameters can be picked by a traced index
(`LayerOverride`, which LISA layer sampling uses). The stacked parameters are the
unrolled model's, initialised in the same order, so both layouts start from equal weights.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct

from hbo_jax.config import ModelConfig
from hbo_jax.models import ghost as ghost_ops
from hbo_jax.models.ghost import Ghost
from hbo_jax.parallel import tree_shardings

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# What the backward pass may keep from the forward of a rematerialised block: nothing
# (recompute the whole block), every matmul output, or the matmul outputs without a
# batch dimension (weights-side products; the MaxText-style middle ground).
REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3 RoPE frequency scaling (`rope_type: llama3` in Hugging Face configs).

    Attributes:
        factor: Divisor applied to the low frequencies (long wavelengths).
        low_freq_factor: Wavelengths above `original_max_position_embeddings /
            low_freq_factor` are divided by `factor`.
        high_freq_factor: Wavelengths below `original_max_position_embeddings /
            high_freq_factor` are kept; the band in between is interpolated.
        original_max_position_embeddings: Context length the model was pretrained with.
    """

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class LlamaSpec:
    """Resolved, hashable model shape (ModelConfig with the vocab filled in)."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rope_theta: float
    rms_norm_eps: float
    tie_embeddings: bool
    qkv_bias: bool
    dtype: str
    param_dtype: str
    remat: bool
    rope_scaling: RopeScaling | None = None
    # Per-frequency RoPE divisors [head_dim / 2] (llama.cpp's `rope_freqs` tensor) when
    # a GGUF file's scaling has no Llama-3 form we can name; None otherwise.
    rope_freq_factors: tuple[float, ...] | None = None
    # Context length the source checkpoint declares (config.json `max_position_embeddings`,
    # GGUF `<arch>.context_length`); metadata only (positions are not limited), kept so an
    # export declares the base model's own. None for a model built from ModelConfig.
    max_position_embeddings: int | None = None
    remat_policy: str = "full"  # with remat: full | dots | dots_no_batch (see REMAT_POLICIES)
    attention: str = "auto"  # auto | xla | cudnn (jax.nn.dot_product_attention implementation)
    vocab_multiple: int = 1  # the embedding and head rows are padded to a multiple of this
    loss_chunk: int = 0  # >0: the training loss unembeds this many positions at a time
    scan_layers: bool = False  # blocks stacked on a leading "layers" axis, run by one lax.scan

    @property
    def padded_vocab(self) -> int:
        """Rows of the embedding table and output head (>= vocab_size; padding is never predicted)."""
        return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple

    @classmethod
    def from_config(cls, cfg: ModelConfig, vocab_size: int | None = None) -> "LlamaSpec":
        vocab = cfg.vocab_size or vocab_size
        if not vocab:
            raise ValueError("model.vocab_size is 0 and no tokenizer vocabulary was given")
        return cls(
            vocab_size=vocab, hidden_size=cfg.hidden_size, num_layers=cfg.num_layers,
            num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
            head_dim=cfg.head_dim or cfg.hidden_size // cfg.num_heads,
            intermediate_size=cfg.intermediate_size, rope_theta=cfg.rope_theta,
            rms_norm_eps=cfg.rms_norm_eps, tie_embeddings=cfg.tie_embeddings,
            qkv_bias=cfg.qkv_bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype, remat=cfg.remat,
            remat_policy=cfg.remat_policy, attention=cfg.attention, vocab_multiple=cfg.vocab_multiple,
            loss_chunk=cfg.loss_chunk, scan_layers=cfg.scan_layers)

    def num_params(self) -> int:
        d, h, kv, hd, f, v = (self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim,
                              self.intermediate_size, self.vocab_size)
        attn = d * hd * (h + 2 * kv) + h * hd * d + (hd * (h + 2 * kv) if self.qkv_bias else 0)
        layer = attn + 3 * d * f + 2 * d
        return self.num_layers * layer + v * d * (1 if self.tie_embeddings else 2) + d


def _param(init, rngs: nnx.Rngs, shape, dtype, names) -> nnx.Param:
    return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=names, eager_sharding=False)


class Linear(nnx.Module):
    """y = x @ kernel (+ bias); kernel [in, out] with logical axis names."""

    def __init__(self, d_in, d_out, names, spec: LlamaSpec, rngs, bias=False):
        pdt = DTYPES[spec.param_dtype]
        self.kernel = _param(nnx.initializers.normal(d_in ** -0.5), rngs, (d_in, d_out), pdt, names)
        self.bias = _param(nnx.initializers.zeros, rngs, (d_out,), pdt, names[1:]) if bias else None
        self.dtype = DTYPES[spec.dtype]

    def __call__(self, x, ghost: Ghost | None = None):
        if ghost is not None:
            b = None if self.bias is None else self.bias[...].astype(self.dtype)
            return ghost_ops.linear(x, self.kernel[...].astype(self.dtype), b, ghost)
        y = x @ self.kernel[...].astype(self.dtype)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, spec: LlamaSpec, rngs):
        self.weight = _param(nnx.initializers.ones, rngs, (dim,), DTYPES[spec.param_dtype], ("norm",))
        self.eps = spec.rms_norm_eps

    def __call__(self, x, ghost: Ghost | None = None):
        # Normalise in fp32 whatever the compute dtype, as the reference implementations do.
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        w = self.weight[...].astype(jnp.float32)
        return (y * w if ghost is None else ghost_ops.scale(y, w, ghost)).astype(x.dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None = None,
                  factors: tuple[float, ...] | None = None) -> jax.Array:
    """Inverse frequencies [head_dim / 2], with Llama-3 scaling or explicit per-frequency
    divisors (`factors`) applied when given."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if factors is not None:
        return inv_freq / jnp.asarray(factors, jnp.float32)
    if scaling is None:
        return inv_freq
    old_len = scaling.original_max_position_embeddings
    wavelen = 2 * jnp.pi / inv_freq
    scaled = jnp.where(wavelen > old_len / scaling.low_freq_factor, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= old_len / scaling.high_freq_factor) & (wavelen <= old_len / scaling.low_freq_factor)
    return jnp.where(medium, smoothed, scaled)


def rope_tables(positions: jax.Array, head_dim: int, theta: float, scaling: RopeScaling | None = None,
                factors: tuple[float, ...] | None = None):
    """cos/sin tables [B, T, head_dim] in the HF `rotate_half` layout."""
    inv_freq = rope_inv_freq(head_dim, theta, scaling, factors)
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x, cos, sin):
    """x [B, T, N, H]; rotates pairs (i, i + H/2)."""
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    out = x.astype(jnp.float32) * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return out.astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, spec: LlamaSpec, rngs):
        d, h, kv, hd = spec.hidden_size, spec.num_heads, spec.num_kv_heads, spec.head_dim
        self.spec = spec
        # Separate q/k/v projections keep head sharding clean (no fused-qkv reshape).
        self.q_proj = Linear(d, h * hd, ("embed", "heads"), spec, rngs, bias=spec.qkv_bias)
        self.k_proj = Linear(d, kv * hd, ("embed", "kv_heads"), spec, rngs, bias=spec.qkv_bias)
        self.v_proj = Linear(d, kv * hd, ("embed", "kv_heads"), spec, rngs, bias=spec.qkv_bias)
        self.o_proj = Linear(h * hd, d, ("heads", "embed"), spec, rngs)

    @property
    def _impl(self) -> str | None:
        return None if self.spec.attention == "auto" else self.spec.attention

    def __call__(self, x, cos, sin, cache=None, index=None, mask=None, ghost: Ghost | None = None):
        """Causal self-attention; with `cache`, also returns the updated cache.

        Args:
            x: Inputs [B, T, D].
            cos, sin: RoPE tables [B, T, head_dim].
            cache: Optional (keys, values), each [B, S, kv_heads, head_dim].
            index: Cache slot of x's first token (a scalar shared by all rows).
            mask: With a cache, which slots each query sees: bool [B, T, S]. Without
                one, an optional bool [B, T, T] segment-and-causal mask (packed rows).
        """
        b, t, _ = x.shape
        s = self.spec
        q = self.q_proj(x, ghost).reshape(b, t, s.num_heads, s.head_dim)
        k = self.k_proj(x, ghost).reshape(b, t, s.num_kv_heads, s.head_dim)
        v = self.v_proj(x, ghost).reshape(b, t, s.num_kv_heads, s.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is None:
            if mask is not None:  # packed rows: causal within each segment only
                out = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], implementation=self._impl)
            else:  # right padding plus a causal mask never lets a real token attend to padding
                out = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=self._impl)
            return self.o_proj(out.reshape(b, t, s.num_heads * s.head_dim), ghost)
        # Functional cache: write this chunk's keys/values at `index`, attend over all
        # slots; the explicit mask carries both causality and left padding.
        k = jax.lax.dynamic_update_slice_in_dim(cache[0], k.astype(cache[0].dtype), index, axis=1)
        v = jax.lax.dynamic_update_slice_in_dim(cache[1], v.astype(cache[1].dtype), index, axis=1)
        out = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], implementation=self._impl)
        return self.o_proj(out.reshape(b, t, s.num_heads * s.head_dim)), (k, v)


class MLP(nnx.Module):
    def __init__(self, spec: LlamaSpec, rngs):
        d, f = spec.hidden_size, spec.intermediate_size
        self.gate_proj = Linear(d, f, ("embed", "mlp"), spec, rngs)
        self.up_proj = Linear(d, f, ("embed", "mlp"), spec, rngs)
        self.down_proj = Linear(f, d, ("mlp", "embed"), spec, rngs)

    def __call__(self, x, ghost: Ghost | None = None):
        return self.down_proj(jax.nn.silu(self.gate_proj(x, ghost)) * self.up_proj(x, ghost), ghost)


class Block(nnx.Module):
    def __init__(self, spec: LlamaSpec, rngs):
        self.input_norm = RMSNorm(spec.hidden_size, spec, rngs)
        self.attn = Attention(spec, rngs)
        self.post_attn_norm = RMSNorm(spec.hidden_size, spec, rngs)
        self.mlp = MLP(spec, rngs)

    def __call__(self, x, cos, sin, cache=None, index=None, mask=None, ghost: Ghost | None = None):
        if cache is None:
            x = x + self.attn(self.input_norm(x, ghost), cos, sin, mask=mask, ghost=ghost)
            return x + self.mlp(self.post_attn_norm(x, ghost), ghost)
        a, cache = self.attn(self.input_norm(x), cos, sin, cache, index, mask)
        x = x + a
        return x + self.mlp(self.post_attn_norm(x)), cache


def stack_blocks(blocks: list[Block]) -> Block:
    """One Block holding `blocks`' parameters stacked on a new leading axis named `layers`."""
    graphdef = nnx.graphdef(blocks[0])
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[nnx.state(b) for b in blocks])
    for var in jax.tree.leaves(stacked, is_leaf=lambda x: isinstance(x, nnx.Variable)):
        var.set_metadata(out_sharding=("layers", *var.get_metadata()["out_sharding"]))
    return nnx.merge(graphdef, stacked)


@struct.dataclass
class LayerOverride:
    """Blocks that take their parameters from elsewhere than the model's stack (scanned models).

    Layer `index[j]` runs with the j-th slice of `params` (a stacked Block state [n, ...]):
    the frozen stack is read for every other layer, so differentiating with respect to
    `params` yields gradients for those n blocks only, without a second copy of the stack.

    Attributes:
        index: int32 [n], distinct layer indices (traced: changing them never recompiles).
        params: The n blocks' parameters, stacked like the model's `layers` state.
    """

    index: jax.Array
    params: Any

    def pick(self, layer: jax.Array, frozen):
        """The parameters layer `layer` runs with: its override slice if it has one, else `frozen`."""
        hit = self.index == layer
        slot, any_hit = jnp.argmax(hit), jnp.any(hit)
        # By leaves: the two trees hold the same parameters, possibly in other containers.
        leaves, treedef = jax.tree.flatten(frozen)
        picked = [jnp.where(any_hit, t[slot].astype(f.dtype), f)
                  for f, t in zip(leaves, jax.tree.leaves(self.params), strict=True)]
        return jax.tree.unflatten(treedef, picked)


class LlamaLM(nnx.Module):
    """Causal LM: token ids [B, T] -> logits [B, T, V] in fp32."""

    def __init__(self, spec: LlamaSpec, rngs: nnx.Rngs):
        self.spec = spec
        pdt = DTYPES[spec.param_dtype]
        self.embed = _param(nnx.initializers.normal(0.02), rngs, (spec.padded_vocab, spec.hidden_size),
                            pdt, ("vocab_table", "embed_table"))
        blocks = [Block(spec, rngs) for _ in range(spec.num_layers)]
        self.layers = stack_blocks(blocks) if spec.scan_layers else nnx.List(blocks)
        self.norm = RMSNorm(spec.hidden_size, spec, rngs)
        self.lm_head = None if spec.tie_embeddings else Linear(
            spec.hidden_size, spec.padded_vocab, ("embed", "vocab"), spec, rngs)

    def hidden(self, tokens: jax.Array, positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None, override: LayerOverride | None = None) -> jax.Array:
        """Final-norm hidden states [B, T, D].

        Args:
            tokens: Token ids [B, T].
            positions: RoPE positions [B, T]; default 0..T-1 in every row.
            segment_ids: Packed rows [B, T] (0 = padding): attention stays causal and
                inside each segment. None: plain causal attention (unchanged numerics).
            override: Blocks run with other parameters (scanned models only).
        """
        return self._hidden(tokens, positions, segment_ids, override=override)[0]

    def _hidden(self, tokens, positions, segment_ids, ghost: Ghost | None = None,
                override: LayerOverride | None = None):
        """(final-norm hidden states, the ghost embedding's side output or None)."""
        spec = self.spec
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        mask = None
        if segment_ids is not None:
            # Padding (segment 0) sees only padding, so no query row is fully masked.
            t = tokens.shape[1]
            mask = (segment_ids[:, :, None] == segment_ids[:, None, :]) & jnp.tril(jnp.ones((t, t), bool))
        if ghost is None:
            x, aux = jnp.take(self.embed[...], tokens, axis=0), None
        else:
            x, aux = ghost_ops.embed(self.embed[...], tokens, ghost)
        x = x.astype(DTYPES[spec.dtype])
        cos, sin = rope_tables(positions, spec.head_dim, spec.rope_theta, spec.rope_scaling,
                               spec.rope_freq_factors)
        if spec.scan_layers:
            x = self._scan_blocks(x, cos, sin, mask, ghost, override)
        elif override is not None:
            raise ValueError("a LayerOverride needs stacked blocks (model.scan_layers=true)")
        else:
            for layer in self.layers:
                if spec.remat:
                    remat = nnx.remat(lambda blk, h, g: blk(h, cos, sin, mask=mask, ghost=g),
                                      policy=REMAT_POLICIES[spec.remat_policy])
                    x = remat(layer, x, ghost)
                else:
                    x = layer(x, cos, sin, mask=mask, ghost=ghost)
        return self.norm(x, ghost), aux

    def _scan_blocks(self, x, cos, sin, mask, ghost, override):
        """The stacked blocks over x by `jax.lax.scan` (rematerialised per block with `remat`)."""
        graphdef, stack = nnx.split(self.layers)

        def body(h, xs):
            i, params = xs
            if override is not None:
                params = override.pick(i, params)
            return nnx.merge(graphdef, params)(h, cos, sin, mask=mask, ghost=ghost), None

        # prevent_cse=False: inside scan the loop already keeps XLA from merging the recompute.
        if self.spec.remat:  # no policy saves the picked parameters (they are not matmul outputs)
            body = jax.checkpoint(body, policy=REMAT_POLICIES[self.spec.remat_policy], prevent_cse=False)
        elif override is not None:
            # Keep only matmul outputs for the backward, so that each layer's picked
            # parameters are picked again there: saved, they would be a second copy of the
            # whole stack (XLA:CPU scratch of a LISA gradient, 8 layers: 7.4 MB so, 3.1 MB
            # like this, 5.4 MB for the full model's gradient).
            body = jax.checkpoint(body, policy=jax.checkpoint_policies.dots_saveable, prevent_cse=False)
        return jax.lax.scan(body, x, (jnp.arange(self.spec.num_layers), stack))[0]

    def hidden_cached(self, tokens, positions, cache, index, mask):
        """Final-norm hidden states [B, T, D] of a forward that reads and writes a KV cache.

        Args:
            tokens: Token ids [B, T].
            positions: RoPE positions [B, T].
            cache: Per-layer (keys, values), each [B, S, kv_heads, head_dim]; with
                `scan_layers`, one (keys, values) pair stacked [L, B, S, kv_heads, head_dim].
            index: Cache slot of the first of `tokens` (scalar).
            mask: Bool [B, T, S]: which cache slots each token attends to.

        Returns:
            (hidden states, updated per-layer cache).
        """
        spec = self.spec
        x = jnp.take(self.embed[...], tokens, axis=0).astype(DTYPES[spec.dtype])
        cos, sin = rope_tables(positions, spec.head_dim, spec.rope_theta, spec.rope_scaling,
                               spec.rope_freq_factors)
        if spec.scan_layers:
            graphdef, stack = nnx.split(self.layers)

            def body(carry, xs):
                # The stacked cache rides in the carry and each layer's slice is written
                # back in place, so the loop never holds a second copy of the cache.
                h, keys, values = carry
                i, params = xs
                h, (k, v) = nnx.merge(graphdef, params)(h, cos, sin, (keys[i], values[i]), index, mask)
                return (h, keys.at[i].set(k), values.at[i].set(v)), None

            (x, keys, values), _ = jax.lax.scan(body, (x, *cache), (jnp.arange(spec.num_layers), stack))
            return self.norm(x), (keys, values)
        new_cache = []
        for layer, layer_cache in zip(self.layers, cache):
            x, layer_cache = layer(x, cos, sin, layer_cache, index, mask)
            new_cache.append(layer_cache)
        return self.norm(x), new_cache

    def unembed(self, h: jax.Array, ghost: Ghost | None = None, aux=None, tokens=None) -> jax.Array:
        """Hidden states [..., D] -> fp32 logits [..., V] (ghost: also the lookup's aux and tokens)."""
        if self.lm_head is not None:
            logits = self.lm_head(h, ghost)
        elif ghost is None:
            logits = h @ self.embed[...].astype(h.dtype).T
        else:
            logits = ghost_ops.tied_head(h, self.embed[...].astype(h.dtype), aux, tokens, ghost)
        logits = logits.astype(jnp.float32)
        if self.spec.padded_vocab > self.spec.vocab_size:  # padding rows are never predicted
            real = jnp.arange(self.spec.padded_vocab) < self.spec.vocab_size
            logits = jnp.where(real, logits, jnp.finfo(jnp.float32).min)
        return logits

    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None, ghost: Ghost | None = None,
                 override: LayerOverride | None = None) -> jax.Array:
        """Logits [B, T, V]. With `ghost`, differentiating also yields per-example gradient
        norms (`hbo_jax.models.ghost`); the logits and parameter gradients are unchanged.
        `override`: blocks run with other parameters (`LayerOverride`, scanned models)."""
        h, aux = self._hidden(tokens, positions, segment_ids, ghost, override)
        return self.unembed(h, ghost, aux, tokens)


def abstract_model(spec: LlamaSpec):
    """(graphdef, abstract params state) without allocating anything."""
    model = nnx.eval_shape(lambda: LlamaLM(spec, nnx.Rngs(0)))
    return nnx.split(model, nnx.Param)


def init_params(spec: LlamaSpec, mesh, seed: int):
    """(graphdef, params) with parameters created directly in their shardings."""
    graphdef, abstract = abstract_model(spec)
    shardings = tree_shardings(abstract, mesh)

    @jax.jit
    def make(key):
        return nnx.state(LlamaLM(spec, nnx.Rngs(params=key)), nnx.Param)

    params = jax.jit(make, out_shardings=shardings)(jax.random.key(seed))
    return graphdef, params
