"""Which configuration keys make a difference, for the code that compares two configs.

A resume compares the checkpoint's configuration with the new run's
(`hbo_jax.checkpoint.check_resume_config`); the report groups runs whose configurations
are equal up to the seed (`hbo_jax.compare.group_runs`). Both compare flat dotted keys
(`flatten`), and a key added to a config dataclass is classified here. A pattern ending
in "." stands for its whole section.
"""

from __future__ import annotations

from typing import Any, Iterable

# Where and how often things are logged, evaluated, checkpointed and cached: none of them
# changes what is trained.
BOOKKEEPING = ("run_dir", "eval.", "tracking.", "distributed.", "data.cache_dir", "data.embedded_archives",
               "train.log_every", "train.checkpoint_every", "train.keep_checkpoints", "train.async_checkpoint",
               "train.allow_config_change", "train.max_nonfinite_steps",
               "train.compile_cache", "train.compile_cache_gb")

# The report: runs that differ only in these are seeds (or data-order replicas) of one experiment.
GROUP_IGNORE = (*BOOKKEEPING, "train.seed", "train.data_seed")

# A resume: a change to a key in these sections breaks the exact continuation, except for
# the keys of RESUME_FREE (bookkeeping and the final evaluation's cap).
RESUME_SECTIONS = ("model.", "data.", "scorer.", "mixing.", "scalebio.", "train.")
RESUME_FREE = (*BOOKKEEPING, "data.max_eval_per_subset")
# Refused even with train.allow_config_change: the checkpoint cannot be read into the new
# shapes, or the sampler's stream is keyed by the value (train.data_seed by its resolved
# value: -1 means train.seed).
# `algorithm`: the checkpoint holds another algorithm's state (ScaleBiO's u, lambda and
# three optimizers are not a sampling run's actors).
RESUME_NEVER = {"algorithm", "train.seed", "train.data_seed", "data.num_buckets", *(f"model.{k}" for k in (
    "vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "intermediate_size",
    "tie_embeddings", "qkv_bias", "param_dtype", "vocab_multiple", "scan_layers"))}
# Allowed with a warning (key -> why the continuation differs): extending a run is the
# common reason to change train.steps. Memory and layout knobs (e.g. remat after an
# out-of-memory) give the same examples and the same loss and gradients up to float
# rounding (tested), so they are accepted with a note.
_LAYOUT = "the same examples and the same loss up to float rounding"
RESUME_WARN = {"train.steps": "the learning-rate schedule spans train.steps, so the continuation differs "
                              "from a run started with the new value",
               **{k: _LAYOUT for k in ("data.packing", "data.pack_rows", "model.remat", "model.remat_policy",
                                       "model.attention", "model.loss_chunk")}}


# Where a run's training files are read from. A resume that finds one of these changed (the data
# moved: another mount on a new VM, a renamed checkout) continues when the files' contents are
# the checkpoint's, which the prepared data's key decides (it hashes each file's bytes and name,
# not its folder); without that key, or with other contents, the change is refused like any other.
# (A tokenizer's or a model's path enters the key as text: moving those is a change.)
_SUBSET_FILES = ("train", "eval")  # data.subsets.<name>.train / .eval


def is_input_path(key: str) -> bool:
    """Whether a dotted key names where training files are read from (`data.source_dir`, a subset's files)."""
    return key == "data.source_dir" or (key.startswith("data.subsets.") and key.rsplit(".", 1)[1] in _SUBSET_FILES)


def matches(key: str, patterns: Iterable[str]) -> bool:
    """Whether a dotted key is one of `patterns` or in a section ("name.") among them."""
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in patterns)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """`{"train": {"seed": 0}}` -> `{"train.seed": 0}`; an empty dict is a value."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
