"""The allowed values of every numeric configuration key (checked by `config_checks.validate`).

One table, key -> `Rule`, instead of one `if` per key: a field added to a config
dataclass without a rule here fails tests/test_config.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Rule:
    """The values a numeric key takes: a range, plus special values outside it.

    Floats must also be finite (NaN and +-inf are refused) unless listed in `special`.
    """

    lo: float = -math.inf
    hi: float = math.inf
    lo_open: bool = False
    hi_open: bool = False
    special: tuple = ()  # allowed outside the range: mesh -1 (fill), temperature inf (uniform)
    note: str = ""  # what a special or boundary value means, for the message

    def allows(self, v: float) -> bool:
        """Whether `v` is a valid value of the key."""
        if v in self.special:
            return True
        if not math.isfinite(v):
            return False
        return (v > self.lo if self.lo_open else v >= self.lo) and (v < self.hi if self.hi_open else v <= self.hi)

    def describe(self, value: float) -> str:
        """What `value`'s key must be, e.g. `a finite number >= 0 (0 = off)`."""
        kind = ""
        if isinstance(value, float):
            kind = "a number " if any(math.isinf(v) for v in self.special) else "a finite number "
        if self.hi < math.inf:
            rng = f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"
        else:
            rng = f"{'>' if self.lo_open else '>='} {self.lo:g}"
        rng += "".join(f" or {v:g}" for v in self.special)
        return kind + rng + (f" ({self.note})" if self.note else "")


_POS = Rule(0, lo_open=True)
_NONNEG = Rule(0)
_MESH = Rule(1, special=(-1,), note="-1 = fill with the remaining devices")
# Every int and float field of the config has a rule here (tests/test_config.py checks).
RULES: dict[str, Rule] = {
    "model.vocab_size": Rule(0, note="0 = from the tokenizer"),
    **{f"model.{k}": _POS for k in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
                                   "rope_theta", "rms_norm_eps", "vocab_multiple")},
    "model.head_dim": Rule(0, note="0 = hidden_size // num_heads"),
    "model.loss_chunk": Rule(0, note="0 = the whole sequence at once"),
    **{f"data.{k}": _POS for k in ("vocab_size", "seq_len", "num_buckets", "max_eval_per_subset")},
    "data.pack_rows": Rule(0, note="0 = sized from the mean example length"),
    "data.train_fraction": Rule(0, 1, lo_open=True, note="1 = every training row"),
    "scorer.warmup_steps": _NONNEG,
    **{f"scorer.{k}": _POS for k in ("batch_size", "learning_rate", "score_batch_size")},
    "mixing.temperature": Rule(0, special=(math.inf,), note="0 = the strategy default, inf = uniform"),
    **{f"mixing.{k}": _POS for k in ("global_every", "local_every", "actor_lr", "inner_steps",
                                     "global_probes_per_bucket", "local_probes_per_group")},
    "mixing.ema": Rule(0, 1, note="0 = off"),
    "mixing.global_train_steps": Rule(0, note="0 = every step of the interval"),
    "mixing.min_prob": Rule(0, 1, hi_open=True, note="0 = off"),
    "mixing.kl_to_prior": Rule(0, note="0 = off"),
    "mixing.probe_budget": Rule(0, note="0 = no cap"),
    **{f"scalebio.{k}": _POS for k in ("alpha", "outer_iters")},
    **{f"scalebio.{k}": _NONNEG for k in ("lr_u", "lr_w", "lr_lambda", "wd_uw", "wd_lambda")},
    "scalebio.warmup_ratio": Rule(0, 1, hi_open=True),
    "scalebio.clip": Rule(0, note="0 = no clipping"),
    "scalebio.tau": Rule(1, note="1 = constant alpha"),
    "scalebio.val_batch_size": Rule(0, note="0 = train.batch_size"),
    "scalebio.lisa_layers": Rule(0, note="0 = LISA off; at most model.num_layers"),
    "scalebio.lisa_interval": _POS,
    **{f"train.{k}": _POS for k in ("steps", "batch_size", "learning_rate", "log_every", "checkpoint_every",
                                    "keep_checkpoints", "max_nonfinite_steps")},
    **{f"train.{k}": _NONNEG for k in ("warmup_steps", "weight_decay", "seed")},
    "train.grad_clip": Rule(0, note="0 = no clipping"),
    "train.data_seed": Rule(0, special=(-1,), note="-1 = train.seed"),
    "train.compile_cache_gb": Rule(0, note="0 = no limit"),
    "eval.every": Rule(0, note="0 = no periodic evaluation"),
    **{f"eval.{k}": _POS for k in ("periodic_max_per_subset", "max_new_tokens")},
    "eval.exact_match_max_chars": _NONNEG,
    **{f"mesh.{k}": _MESH for k in ("data", "fsdp", "tensor")},
    "distributed.num_processes": Rule(0, note="0 = detect"),
    "distributed.process_id": Rule(-1, note="-1 = detect"),
    **{f"distributed.{k}": _POS for k in ("initialization_timeout", "stop_check_every")},
}
