"""The base model of a run: the weights `model.init` names, decided in one place.

Training starts from it, `python -m hbo_jax.evaluate --model base` evaluates it, a
checkpoint is restored into its shapes (evaluate, export), and the memory planner
compiles against its shapes:

  scorer        the warmed-up scoring model of data preparation (`data.scorer_model`
                when this process just prepared the data, else `data.scorer_params`)
  random        `init_params` with `train.seed`
  hf:, gguf:,   the pretrained model (`hbo_jax.models.pretrained`); when this process
  smollm2       just prepared the data, the copy that scored it (`data.scorer_model`)
"""

from __future__ import annotations

import logging

from flax import nnx

from hbo_jax.config import Config
from hbo_jax.model_init import is_pretrained
from hbo_jax.models.hf import load_hf_tokenizer
from hbo_jax.models.llama import LlamaSpec, abstract_model, init_params
from hbo_jax.models.loading import load_params
from hbo_jax.models.pretrained import load_pretrained, pretrained_spec

log = logging.getLogger(__name__)


def base_spec(cfg: Config, vocab_size: int | None = None) -> LlamaSpec:
    """The base model's shape, from config.json or GGUF metadata only (no weights read).

    Args:
        cfg: The run's config.
        vocab_size: The data tokenizer's length (`len(data.tokenizer)`), for a model
            trained from scratch (`scorer`, `random`); ignored for a pretrained model,
            whose shape is its own. None: `data.vocab_size` for a tokenizer trained on
            the data (an upper bound: a trained BPE has at most that many tokens), the
            length of `data.tokenizer` otherwise; what the memory planner needs.

    Returns:
        The LlamaSpec `base_model` builds.
    """
    m = cfg.model
    if is_pretrained(m.init):
        return pretrained_spec(m.init, m)
    if vocab_size is None:
        vocab_size = cfg.data.vocab_size
        if cfg.data.tokenizer != "train":
            vocab_size = len(load_hf_tokenizer(cfg.data.tokenizer))
    return LlamaSpec.from_config(m, vocab_size=vocab_size)


_WARNED: set = set()


def warn_context(spec, seq_len: int, init: str) -> None:
    """Warns (once per model and length) when data.seq_len exceeds the context the model was trained for.

    Positions are not limited, so such a run works, but RoPE positions the base model never
    saw make its start worse than its published quality, and nothing else would say so.
    """
    context = spec.max_position_embeddings
    if context and seq_len > context and (init, seq_len) not in _WARNED:
        _WARNED.add((init, seq_len))
        log.warning("data.seq_len=%d is longer than the %d-token context model.init=%s was trained with: positions "
                    "beyond it are new to the model (lower data.seq_len, or expect a worse start)", seq_len, context,
                    init)


def base_model(cfg: Config, mesh, data=None, abstract: bool = False):
    """The weights a run starts from, sharded over `mesh`.

    Args:
        cfg: The run's config (`model.init` decides).
        mesh: The device mesh; parameters land in the shardings of `hbo_jax.parallel`.
        data: The run's PreparedData (its tokenizer and scoring model); may be None for
            a pretrained model.
        abstract: Return ShapeDtypeStructs instead of weights (nothing is read or
            initialised), e.g. as the target a checkpoint is restored into.

    Returns:
        (graphdef, params, spec): `nnx.merge(graphdef, params)` is the model. When the
        params are `data.scorer_model`'s, this takes them (`data.scorer_model` becomes
        None): the train step donates their buffers.

    Raises:
        ValueError: A model trained from scratch but no `data`.
    """
    init = cfg.model.init
    if abstract:
        spec = base_spec(cfg, None if data is None else len(data.tokenizer))
        graphdef, params = abstract_model(spec)
        return graphdef, params, spec
    if init != "random" and data is not None and data.scorer_model is not None:
        (graphdef, params), data.scorer_model = data.scorer_model, None
        spec = nnx.merge(graphdef, params).spec
        warn_context(spec, cfg.data.seq_len, init)
        return graphdef, params, spec
    if is_pretrained(init):
        graphdef, params, spec = load_pretrained(init, mesh, cfg.model)
        warn_context(spec, cfg.data.seq_len, init)
        return graphdef, params, spec
    if data is None:
        raise ValueError(f"model.init={init}: the base model needs the run's prepared data")
    spec = base_spec(cfg, len(data.tokenizer))
    if init == "scorer":
        graphdef, params = abstract_model(spec)
        return graphdef, load_params(data.scorer_params, params, mesh), spec
    graphdef, params = init_params(spec, mesh, cfg.train.seed)
    return graphdef, params, spec
