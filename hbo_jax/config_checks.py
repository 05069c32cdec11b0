"""The checks of a run configuration that OmegaConf's types cannot express: choices, value
ranges (`hbo_jax.config_rules`), and the rules that tie keys together; each error names
the key. `hbo_jax.config.resolve_config` runs `validate` on every config it builds.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from hbo_jax import algorithm
from hbo_jax.config_rules import RULES
from hbo_jax.errors import ConfigError
from hbo_jax.model_init import parse_init

Config = Any  # a `hbo_jax.config.Config` (that module imports this one)

log = logging.getLogger("hbo_jax.config")

STRATEGIES = ("hbo", "hbo_global", "hbo_local", "mos", "mos_plus", "multidds", "proportional", "temperature",
              "uniform", "replay")
_CHOICES = {
    "model.dtype": ("float32", "bfloat16"),
    "model.param_dtype": ("float32", "bfloat16"),
    "model.remat_policy": ("full", "dots", "dots_no_batch"),
    "model.attention": ("auto", "xla", "cudnn"),
    "data.mixture": ("embedded",),
    "data.difficulty": ("ppl", "loss", "ifd", "length"),
    "data.bad_input": ("skip", "error"),
    "data.too_long": ("truncate", "drop"),
    "mixing.strategy": STRATEGIES,
    "mixing.local_source": ("probes", "train"),
    "mixing.global_source": ("probes", "train"),
    "mixing.global_reward": ("auto", "gradnorm", "gradnorm_per_example", "cossim", "dev_cosine", "ppl_ratio"),
    "mixing.local_reward": ("ppl_ratio", "loss_ratio", "ifd_ratio"),
    "scalebio.sampling": ("uniform", "weights"),
    "scalebio.lisa_moments": ("reset", "host"),
    "tracking.wandb_mode": ("online", "offline", "disabled"),
    "distributed.mode": ("auto", "on", "off"),
}
TASK_METRICS = ("auto", "mc", "exact_match", "none")


def _get(cfg: Config, dotted: str) -> Any:
    obj: Any = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _validate_min_prob(cfg: Config) -> None:
    """min_prob * K < 1 for the K buckets, so the floor leaves room for the actors.

    The same bound for the datasets needs the mixture's size: `hbo_jax.data.prepare.check_min_prob`.
    """
    floor = cfg.mixing.min_prob
    k = cfg.data.num_buckets
    if floor > 0 and floor * k >= 1:
        raise ConfigError(f"mixing.min_prob={floor} times data.num_buckets={k} is {floor * k:g}: must be < 1 "
                          f"(min_prob < 1/{k}, the uniform probability of a bucket)")


def validate(cfg: Config) -> Config:
    """Checks value ranges and choices; raises ConfigError naming the key."""
    for key, choices in _CHOICES.items():
        if _get(cfg, key) not in choices:
            raise ConfigError(f"{key}={_get(cfg, key)!r} is not one of {list(choices)}")
    if cfg.algorithm not in algorithm.names():
        raise ConfigError(f"algorithm={cfg.algorithm!r} is not one of {algorithm.names()}")
    for key, rule in RULES.items():
        value = _get(cfg, key)
        if not rule.allows(value):
            raise ConfigError(f"{key}={value} must be {rule.describe(value)}")
    m = cfg.model
    if m.num_heads % m.num_kv_heads:
        raise ConfigError(
            f"model.num_heads={m.num_heads} must be a multiple of model.num_kv_heads={m.num_kv_heads}")
    if (cfg.mixing.strategy == "replay") != bool(cfg.mixing.replay_from):
        raise ConfigError("mixing.replay_from must be set exactly when mixing.strategy=replay "
                          f"(strategy={cfg.mixing.strategy!r}, replay_from={cfg.mixing.replay_from!r})")
    parse_init(cfg.model.init)
    if cfg.mixing.local_source == "train" and cfg.model.init == "random":
        raise ConfigError("mixing.local_source=train needs the scoring model to be the starting "
                          "model (model.init=scorer or a pretrained model), not model.init=random")
    if cfg.mixing.local_source == "train" and cfg.mixing.local_reward != "ppl_ratio":
        raise ConfigError(f"mixing.local_reward={cfg.mixing.local_reward} needs probes (mixing.local_source=probes); "
                          "training batches carry only the PPL ratio")
    if cfg.data.pack_rows > cfg.train.batch_size:
        raise ConfigError(f"data.pack_rows={cfg.data.pack_rows} must be in [0, train.batch_size="
                          f"{cfg.train.batch_size}] (0 = sized from the mean example length)")
    _validate_subsets(cfg.data.subsets)
    for subset, metric in cfg.eval.metrics.items():
        if metric not in TASK_METRICS:
            raise ConfigError(f"eval.metrics.{subset}={metric!r} is not one of {list(TASK_METRICS)}")
    if cfg.train.warmup_steps > cfg.train.steps:  # legal (a short trial run), but rarely what is meant
        log.warning("train.warmup_steps=%d > train.steps=%d: the learning rate never reaches "
                    "train.learning_rate", cfg.train.warmup_steps, cfg.train.steps)
    _validate_min_prob(cfg)
    if cfg.algorithm == "scalebio":
        _validate_scalebio(cfg)
    return cfg


def _validate_scalebio(cfg: Config) -> None:
    sc = cfg.scalebio
    if bool(sc.validation_subsets) == bool(sc.validation_files):
        raise ConfigError("algorithm=scalebio needs a validation set: set exactly one of scalebio.validation_subsets "
                          "(eval files of named subsets) and scalebio.validation_files "
                          f"(got {list(sc.validation_subsets)} and {list(sc.validation_files)})")
    if sc.validation_format not in DATA_FORMATS:
        raise ConfigError(f"scalebio.validation_format={sc.validation_format!r} is not one of {list(DATA_FORMATS)}")
    if cfg.data.packing:
        raise ConfigError("algorithm=scalebio does not pack batches yet: set data.packing=false")
    if sc.local_actors:
        _validate_scalebio_local(cfg)
    if sc.lisa_layers and not cfg.model.scan_layers:
        raise ConfigError(f"scalebio.lisa_layers={sc.lisa_layers} (LISA) picks blocks by index from stacked "
                          "transformer blocks: set model.scan_layers=true, or scalebio.lisa_layers=0")
    if sc.lisa_layers > cfg.model.num_layers:
        raise ConfigError(f"scalebio.lisa_layers={sc.lisa_layers} must be at most model.num_layers="
                          f"{cfg.model.num_layers} (0 = LISA off)")


def _validate_scalebio_local(cfg: Config) -> None:
    """scalebio.local_actors: batches drawn by the sampler, rewards from the training batches."""
    if cfg.scalebio.sampling != "weights":
        raise ConfigError(f"scalebio.local_actors=true needs scalebio.sampling=weights (got "
                          f"{cfg.scalebio.sampling!r}): with uniform batches no sampler draws the buckets")
    if cfg.mixing.local_reward != "ppl_ratio":
        raise ConfigError(f"scalebio.local_actors=true rewards the local actors from the training batches, which "
                          f"carry only the PPL ratio: set mixing.local_reward=ppl_ratio (got "
                          f"{cfg.mixing.local_reward!r})")
    if cfg.model.init == "random":
        raise ConfigError("scalebio.local_actors=true measures progress against the scoring model's NLLs, so it "
                          "needs the scoring model to be the starting model (model.init=scorer or a pretrained "
                          "model), not model.init=random")


_SUBSET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
DATA_FORMATS = ("auto", "messages", "sharegpt", "alpaca", "prompt_response")


def _validate_subsets(subsets: dict) -> None:
    """Names usable as directory names, unique up to case, a train list and a known format."""
    seen: dict[str, str] = {}
    for name, sc in subsets.items():
        key = f"data.subsets.{name}"
        if not _SUBSET_NAME.match(name):
            raise ConfigError(f"{key}: subset names use letters, digits, '_', '.', '-' only")
        if name.lower() in seen:  # they become directories, which may be case-insensitive
            raise ConfigError(f"{key}: duplicate subset name (also data.subsets.{seen[name.lower()]})")
        seen[name.lower()] = name
        if not sc.train:
            raise ConfigError(f"{key}.train: list at least one training file or glob")
        if sc.format not in DATA_FORMATS:
            raise ConfigError(f"{key}.format={sc.format!r} is not one of {list(DATA_FORMATS)}")
