"""Loads what `model.init` names (`hbo_jax.model_init`): a pretrained model's spec, weights
and tokenizer.
"""

from __future__ import annotations

import dataclasses
import json

from hbo_jax.config import ModelConfig
from hbo_jax.errors import ConfigError
from hbo_jax.model_init import parse_init
from hbo_jax.models.gguf import gguf_tokenizer, load_gguf, spec_from_gguf
from hbo_jax.models.hf import load_hf, load_hf_tokenizer, spec_from_hf_config
from hbo_jax.models.llama import abstract_model


def fingerprint(init: str) -> str:
    """Identifies the weights for cache keys: path, size and modification time."""
    kind, path = parse_init(init)
    if path is None:
        return kind
    files = sorted(path.glob("*")) if path.is_dir() else [path]
    return f"{kind}:{path.resolve()}:" + ",".join(f"{f.name}:{f.stat().st_size}:{int(f.stat().st_mtime)}"
                                                   for f in files if f.is_file())


def _spec_options(model_cfg: ModelConfig) -> tuple[dict, dict]:
    """(what the loaders take, the compute options set on the spec afterwards) from the config."""
    load = dict(dtype=model_cfg.dtype, param_dtype=model_cfg.param_dtype, remat=model_cfg.remat)
    compute = dict(vocab_multiple=model_cfg.vocab_multiple, remat_policy=model_cfg.remat_policy,
                   attention=model_cfg.attention, loss_chunk=model_cfg.loss_chunk,
                   scan_layers=model_cfg.scan_layers)
    return load, compute


def pretrained_spec(init: str, model_cfg: ModelConfig):
    """The LlamaSpec `load_pretrained` would build, from config.json or GGUF metadata only."""
    kind, path = parse_init(init)
    load, compute = _spec_options(model_cfg)
    if kind == "hf":
        spec = spec_from_hf_config(json.loads((path / "config.json").read_text()), **load)
    elif kind == "gguf":
        from gguf import GGUFReader  # the gguf package only when a GGUF file is read, as in models.gguf

        spec = spec_from_gguf(GGUFReader(str(path)), **load)
    else:
        raise ValueError(f"model.init={init!r} is not a pretrained model")
    return dataclasses.replace(spec, **compute)


def load_pretrained(init: str, mesh, model_cfg: ModelConfig):
    """(graphdef, params, spec) of a pretrained model, sharded over `mesh`."""
    kind, path = parse_init(init)
    load_kw, compute = _spec_options(model_cfg)
    if kind == "hf":
        load = load_hf
    elif kind == "gguf":
        load = load_gguf
    else:
        raise ValueError(f"model.init={init!r} is not a pretrained model")
    # The parameters' layout (padded rows, stacked blocks) is decided while loading.
    graphdef, params, spec = load(path, mesh, vocab_multiple=compute.pop("vocab_multiple"),
                                  scan_layers=compute.pop("scan_layers"), **load_kw)
    if any(getattr(spec, k) != v for k, v in compute.items()):
        # Compute options live in the (static) spec: rebuild the graphdef around the same weights.
        spec = dataclasses.replace(spec, **compute)
        graphdef = abstract_model(spec)[0]
    return graphdef, params, spec


def pretrained_tokenizer(init: str):
    """The pretrained model's tokenizer, with a pad token (its EOS when it has none)."""
    kind, path = parse_init(init)
    if kind == "hf":
        tok = load_hf_tokenizer(path)
    else:
        tok = gguf_tokenizer(path)
    if not tok.chat_template:
        raise ConfigError(f"model.init={init}: the tokenizer has no chat template")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok
