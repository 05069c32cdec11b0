"""The checkpoints a merge reads, and the checks that they fit together.

An `Input` is a tensor reader by Hugging Face name (`hbo_jax.models.tensor_io`) with the
model's shape (`LlamaSpec`), its config.json dict and its tokenizer: a run directory (a
chosen or the latest checkpoint; config and tokenizer as `python -m hbo_jax.export`
writes them), a Hugging Face directory (sharded or not) or a GGUF file. The base of a
run (`run_base`) is what its `model.init` names; a tiny model trained from scratch
(`scorer`, `random`) is rebuilt in memory.

`check_inputs` raises a named `CheckpointMismatch` subclass, before anything is written,
when the inputs do not describe one model: the architecture, the vocabulary size, the
tokenizer, the set of tensors, a shape or (among the merged models) a dtype.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np

from hbo_jax.errors import CheckpointMismatch, ConfigError
from hbo_jax.models.llama import LlamaSpec
from hbo_jax.models.tensor_io import TensorInfo, TensorReader

TIED_HEAD = "lm_head.weight"


class ArchitectureMismatch(CheckpointMismatch):
    """Two inputs are different model architectures (layers, widths, heads, RoPE, tying)."""


class VocabMismatch(CheckpointMismatch):
    """Two inputs have different vocabulary sizes."""


class TokenizerMismatch(CheckpointMismatch):
    """A model's tokenizer differs from the base's (or the first model's)."""


class MissingTensor(CheckpointMismatch):
    """A model lacks a tensor the base has."""


class ExtraTensor(CheckpointMismatch):
    """A model has a tensor the base lacks."""


class ShapeMismatch(CheckpointMismatch):
    """A tensor's shape differs from the base's."""


class DtypeMismatch(CheckpointMismatch):
    """A tensor's stored dtype differs between the merged models."""


class ArrayReader(TensorReader):
    """Tensors held in memory (a model rebuilt on the host, or a test's arrays)."""

    def __init__(self, arrays: dict[str, np.ndarray], where: str = "<memory>"):
        self.where, self._arrays = where, arrays
        self._infos = {k: TensorInfo(k, v.shape, v.dtype) for k, v in arrays.items()}

    def _read(self, name: str, rows: slice | None) -> np.ndarray:
        arr = self._arrays[name]
        return np.array(arr if rows is None else arr[rows])


@dataclasses.dataclass
class Input:
    """One checkpoint of a merge.

    Attributes:
        source: As the user named it.
        reader: Its tensors by Hugging Face name.
        spec: Its model shape.
        config: The config.json dict an output made from it declares.
        tokenizer: Its tokenizer, or None (a bare weights directory).
        step: The checkpoint step of a run directory, else None.
    """

    source: str
    reader: TensorReader
    spec: LlamaSpec
    config: dict
    tokenizer: object = None
    step: int | None = None

    def names(self) -> list[str]:
        """Tensor names; a tied model's redundant `lm_head.weight` copy (some checkpoints store one) left out."""
        return [n for n in self.reader.names() if not (self.spec.tie_embeddings and n == TIED_HEAD)]


def _dtype_name(reader: TensorReader) -> str:
    """The stored dtype's config.json name (`float32`, `bfloat16`, ...)."""
    return str(reader.infos()[0].dtype) if reader.infos() else "float32"


def _run_data(cfg):
    from hbo_jax.parallel import make_mesh
    from hbo_jax.scorer import prepare

    return prepare(cfg, make_mesh(cfg.mesh))  # cached: the run's tokenizer (and scorer) are reused


def _run_config(run_dir: Path):
    from hbo_jax.config import load_config
    from hbo_jax.distributed import FRESH_LAUNCH

    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{run_dir}: not a run directory (no config.yaml)")
    return load_config(run_dir / "config.yaml", list(FRESH_LAUNCH))


def open_input(source: str | Path, step: int | None = None) -> Input:
    """The checkpoint `source` names: a run directory, `hf:DIR` / a directory, `gguf:FILE` / a `.gguf`, `smollm2`.

    A run directory's tokenizer comes from its prepared data, as `python -m
    hbo_jax.export` gets it: from the data cache, or prepared again where it is missing.

    Raises:
        ConfigError: A run directory without such a checkpoint, or an unknown source.
        CheckpointMismatch: The weights do not fit their own config.
        FileNotFoundError: A directory without weights.
    """
    from hbo_jax.models.gguf import GgufReader
    from hbo_jax.models.hf import hf_config_from_spec, spec_from_hf_config, tokenizer_ids
    from hbo_jax.models.readers import RunReader, open_reader

    text = str(source)
    path = Path(text).expanduser()
    if (path / "config.yaml").is_file():
        cfg = _run_config(path)
        tok = _run_data(cfg).tokenizer
        reader = RunReader(path, step, vocab_size=len(tok))
        config = hf_config_from_spec(reader.spec, max(cfg.data.seq_len, 2048), _dtype_name(reader),
                                     tokenizer_ids(tok))
        return Input(text, reader, reader.spec, config, tok, reader.step)
    if not text.startswith(("hf:", "gguf:")) and text != "smollm2" and not path.exists():
        raise ConfigError(f"{text}: no such run directory, Hugging Face directory or GGUF file")
    reader = open_reader(text)
    if isinstance(reader, GgufReader):
        from hbo_jax.models.gguf import gguf_tokenizer

        tok = gguf_tokenizer(reader.reader) if "tokenizer.ggml.model" in reader.reader.fields else None
        return Input(text, reader, reader.spec, hf_config_from_spec(reader.spec, None, "float32",
                                                                    tokenizer_ids(tok)), tok)
    if reader.config is None:
        raise ConfigError(f"{reader.dir}: no config.json beside the weights")
    config = dict(reader.config)
    return Input(text, reader, spec_from_hf_config(config), config, _hf_tokenizer(reader.dir))


def _hf_tokenizer(model_dir: Path):
    if not any((model_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        return None
    from hbo_jax.models.hf import load_hf_tokenizer

    return load_hf_tokenizer(model_dir)


def run_base(run_dir: str | Path) -> Input:
    """The model a run started from (its `model.init`): read from its file, or rebuilt in memory.

    A pretrained base (hf:, gguf:, smollm2) is read as any input; the tiny model of a
    run trained from scratch (`scorer`: the warmed-up scoring model, `random`) is
    rebuilt on the host (small by construction).
    """
    from hbo_jax.model_init import is_pretrained

    run_dir = Path(run_dir)
    cfg = _run_config(run_dir)
    if is_pretrained(cfg.model.init):
        return open_input(cfg.model.init)
    from hbo_jax.models.base import base_model
    from hbo_jax.models.hf import hf_arrays, hf_config_from_spec, tokenizer_ids
    from hbo_jax.parallel import make_mesh

    mesh = make_mesh(cfg.mesh)
    data = _run_data(cfg)
    _, params, spec = base_model(cfg, mesh, data)
    reader = ArrayReader(hf_arrays(params, spec), f"{run_dir} (model.init={cfg.model.init})")
    config = hf_config_from_spec(spec, max(cfg.data.seq_len, 2048), _dtype_name(reader),
                                 tokenizer_ids(data.tokenizer))
    return Input(f"base of {run_dir} (model.init={cfg.model.init})", reader, spec, config, data.tokenizer)


# ----------------------------------------------------------------------------- checks

_ARCH_FIELDS = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "intermediate_size",
                "rope_theta", "rms_norm_eps", "tie_embeddings", "qkv_bias", "rope_scaling")


def _same(a, b) -> bool:
    """Equal, floats up to float32 rounding (GGUF stores rms_norm_eps and rope_theta as float32)."""
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-6)
    if dataclasses.is_dataclass(a) and dataclasses.is_dataclass(b):
        return type(a) is type(b) and all(_same(getattr(a, f.name), getattr(b, f.name))
                                          for f in dataclasses.fields(a))
    return a == b


def tokenizer_fingerprint(tok) -> dict | None:
    """What decides how text becomes ids and how chats are rendered: the tokenizer JSON and chat template."""
    if tok is None:
        return None
    backend = getattr(tok, "backend_tokenizer", tok)
    state = json.loads(backend.to_str())
    for k in ("padding", "truncation"):  # runtime settings, not the tokenizer
        state.pop(k, None)
    state["chat_template"] = getattr(tok, "chat_template", None)
    return state


def _compare_tokenizers(ref: Input, other: Input) -> None:
    a, b = tokenizer_fingerprint(ref.tokenizer), tokenizer_fingerprint(other.tokenizer)
    if a is None or b is None or a == b:
        return
    part = next(k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))
    what = {"model": "vocabulary or merges", "added_tokens": "special (added) tokens"}.get(part, part)
    raise TokenizerMismatch(f"{other.source}: tokenizer differs from that of {ref.source} ({what})")


def check_inputs(base: Input | None, models: list[Input]) -> tuple[list[TensorInfo], bool]:
    """Checks that the inputs describe one model; returns (the merged tensors, in a canonical order;
    whether the base's dtype differs from the models' and is cast to it for comparisons).

    The order sorts names with their numbers as numbers (layer 2 before layer 10),
    independent of any input's file layout, so the output is too.

    Raises:
        ArchitectureMismatch, VocabMismatch, TokenizerMismatch, MissingTensor,
        ExtraTensor, ShapeMismatch, DtypeMismatch: The first mismatch; named.
    """
    ref = base or models[0]
    for m in models if base is not None else models[1:]:
        for f in _ARCH_FIELDS:
            if not _same(getattr(m.spec, f), getattr(ref.spec, f)):
                raise ArchitectureMismatch(f"{m.source}: {f} is {getattr(m.spec, f)!r}, {ref.source} has "
                                           f"{getattr(ref.spec, f)!r}")
        if m.spec.vocab_size != ref.spec.vocab_size:
            raise VocabMismatch(f"{m.source}: vocabulary size {m.spec.vocab_size}, {ref.source} has "
                                f"{ref.spec.vocab_size}")
    toks = [i for i in [base, *models] if i is not None and i.tokenizer is not None]
    for m in toks[1:]:
        _compare_tokenizers(toks[0], m)
    names = ref.names()
    want = set(names)
    for m in models:
        have = set(m.names())
        if want - have:
            raise MissingTensor(f"{m.source}: tensor {sorted(want - have)[0]!r} is missing "
                                f"({len(want - have)} missing in all)")
        if have - want:
            raise ExtraTensor(f"{m.source}: tensor {sorted(have - want)[0]!r} is not in {ref.source} "
                              f"({len(have - want)} extra in all)")
    out, cast = [], False
    for name in sorted(names, key=natural_key):
        r, first = ref.reader.info(name), models[0].reader.info(name)
        for m in models:
            info = m.reader.info(name)
            if info.shape != r.shape:
                raise ShapeMismatch(f"{m.source}: tensor {name!r} has shape {info.shape}, {ref.source} has {r.shape}")
            if info.dtype != first.dtype:
                raise DtypeMismatch(f"{m.source}: tensor {name!r} is stored as {info.dtype}, {models[0].source} "
                                    f"as {first.dtype}")
        cast |= r.dtype != first.dtype
        out.append(TensorInfo(name, first.shape, first.dtype))
    return out, cast


def natural_key(name: str) -> list:
    """Sort key: the dotted parts, numbers compared as numbers."""
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split(".")]
