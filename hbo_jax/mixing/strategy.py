"""Sampling strategies as composition: which actors exist, what each learns from, how often.

A strategy is a prior temperature plus zero or more actors:
  hbo           global actor (grad-norm reward) + local actors (relative PPL-ratio reward)
  hbo_global    global actor only (ablation)    hbo_local   local actors only (ablation)
  mos           one actor over datasets, PPL-ratio reward (MoS "Diff", EMA optional)
  mos_plus      one flat actor over all D x K (dataset, bucket) groups, PPL-ratio reward
  multidds      one actor over datasets, reward = cosine of the dataset's gradient to the
                dev-set gradient (the eval splits' examples)
  proportional  static, T=1                     temperature static, T=10 by default
  uniform       static, T=inf                   replay      a recorded schedule, no actors
Each actor's reward comes from probes (fixed or drawn probe batches, scored at every
update) or from the training batches themselves; a train-sourced reward names the extra
outputs the train step must return, and the step returns their union. `REWARDS` is the
one place a reward is declared.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from hbo_jax.config import ConfigError, MixingConfig


@dataclass(frozen=True)
class RewardKind:
    """What a reward is and what it needs.

    Attributes:
        levels: The actors that may learn from it ("global", "local", "flat").
        from_train: The extra train-step outputs it needs when taken from training
            batches (`ref_nll`: each row's NLL under the starting model;
            `example_gradnorm`: each example's gradient norm); None = probes only.
        progress_ratio: It is a ratio of the model now to the starting model (it needs
            the starting model's statistics of its examples).
    """

    levels: frozenset[str]
    from_train: frozenset[str] | None = None
    progress_ratio: bool = False


_G, _L = frozenset({"global"}), frozenset({"local", "flat"})
REWARDS: dict[str, RewardKind] = {
    # Global (per dataset). gradnorm: the norm of the probe batch's gradient (paper Eq. 7);
    # gradnorm_per_example: the mean per-example norm (reference code), also from the train
    # step's own backward; cossim: MoS transferability; dev_cosine: MultiDDS.
    "gradnorm": RewardKind(_G),
    "gradnorm_per_example": RewardKind(_G, from_train=frozenset({"example_gradnorm"})),
    "cossim": RewardKind(_G),
    "dev_cosine": RewardKind(_G),
    # Progress ratios to the starting model: the local rewards, and MoS's global one. Only
    # the PPL ratio can be taken from training batches (their reference NLLs).
    "ppl_ratio": RewardKind(_G | _L, from_train=frozenset({"ref_nll"}), progress_ratio=True),
    "loss_ratio": RewardKind(_L, progress_ratio=True),
    "ifd_ratio": RewardKind(_L, progress_ratio=True),
}


@dataclass(frozen=True)
class Actor:
    """One learned distribution: over datasets (global), over each dataset's buckets
    (local), or over all dataset x bucket groups at once (flat, MoS+)."""

    level: str
    reward: str
    source: str = "probes"  # "probes" | "train"
    every: int = 50  # steps between updates

    @property
    def step_outputs(self) -> frozenset[str]:
        return REWARDS[self.reward].from_train if self.source == "train" else frozenset()


@dataclass(frozen=True)
class Strategy:
    name: str
    temperature: float
    actors: tuple[Actor, ...] = ()

    def actor(self, *levels: str) -> Actor | None:
        return next((a for a in self.actors if a.level in levels), None)

    @property
    def dynamic(self) -> bool:
        return bool(self.actors)

    @property
    def global_actor(self) -> bool:
        return self.actor("global") is not None

    @property
    def local_actor(self) -> bool:
        return self.actor("local", "flat") is not None

    @property
    def flat(self) -> bool:
        """The local logits are one joint actor over all groups (MoS+)."""
        return self.actor("flat") is not None

    @property
    def global_reward(self) -> str | None:
        a = self.actor("global")
        return a.reward if a else None

    @property
    def step_outputs(self) -> frozenset[str]:
        """What the train step returns beyond its usual metrics: the union of the rewards' needs."""
        return frozenset().union(*(a.step_outputs for a in self.actors))

    @property
    def progress_ratio(self) -> bool:
        """A reward needs each example's progress ratio to theta0 (local actor, or MoS's global)."""
        return any(REWARDS[a.reward].progress_ratio for a in self.actors)

    @property
    def ratio_from_train(self) -> bool:
        """The progress ratio comes from training batches (their reference NLLs), not probes."""
        return "ref_nll" in self.step_outputs

    @property
    def ref_nll(self) -> bool:
        """The train step carries reference NLLs."""
        return "ref_nll" in self.step_outputs

    @property
    def train_gradnorm(self) -> bool:
        """The global reward is the per-example gradient norms of the train steps."""
        return "example_gradnorm" in self.step_outputs

    @property
    def global_probes(self) -> bool:
        """The global reward is a jitted probe pass (not a progress ratio, not from training)."""
        a = self.actor("global")
        return a is not None and a.source == "probes" and not REWARDS[a.reward].progress_ratio


# name: (default temperature, ((level, default reward), ...))
_STRATEGIES: dict[str, tuple[float, tuple[tuple[str, str], ...]]] = {
    "hbo": (1.0, (("global", "gradnorm"), ("local", "ppl_ratio"))),
    "hbo_global": (1.0, (("global", "gradnorm"),)),
    "hbo_local": (1.0, (("local", "ppl_ratio"),)),
    "mos": (1.0, (("global", "ppl_ratio"),)),
    "mos_plus": (1.0, (("flat", "ppl_ratio"),)),
    "multidds": (1.0, (("global", "dev_cosine"),)),
    "proportional": (1.0, ()),
    "temperature": (10.0, ()),
    "uniform": (math.inf, ()),
    "replay": (1.0, ()),  # the schedule comes from a recorded run
}


def _global_actor(cfg: MixingConfig, default_reward: str) -> Actor:
    reward = default_reward if cfg.global_reward == "auto" else cfg.global_reward
    source = "probes"
    if cfg.global_source == "train":
        # The train step yields per-example norms: the reference code's reward, not Eq. 7's
        # batch-gradient norm (which needs one backward per dataset batch, i.e. probes).
        if reward == "gradnorm" and cfg.global_reward == "auto":  # HBO's own reward, in the code's form
            reward = "gradnorm_per_example"
        if REWARDS[reward].from_train != frozenset({"example_gradnorm"}):
            raise ConfigError(
                f"mixing.global_source=train gives the per-example gradient-norm reward (gradnorm_per_example); "
                f"mixing.strategy={cfg.strategy} with mixing.global_reward={cfg.global_reward} needs probes")
        source = "train"
    elif REWARDS[reward].progress_ratio:  # MoS: the ratio comes from where the local ratios come from
        source = cfg.local_source
    return Actor("global", reward, source, cfg.global_every)


def resolve(cfg: MixingConfig) -> Strategy:
    """The strategy `mixing.strategy` names, with the reward variants and sources of `mixing.*`."""
    default_t, declared = _STRATEGIES[cfg.strategy]
    t = cfg.temperature or default_t
    if cfg.strategy in ("proportional", "uniform") and cfg.temperature and cfg.temperature != default_t:
        raise ConfigError(f"mixing.temperature={cfg.temperature} contradicts mixing.strategy="
                          f"{cfg.strategy} (T={default_t}); use strategy=temperature")
    levels = dict(declared)
    if "global" not in levels:
        if cfg.global_reward != "auto":
            raise ConfigError(f"mixing.global_reward={cfg.global_reward} needs a strategy with a global actor "
                              f"(mixing.strategy={cfg.strategy} has none)")
        if cfg.global_source == "train":
            raise ConfigError(f"mixing.global_source=train gives the per-example gradient-norm reward; "
                              f"mixing.strategy={cfg.strategy} has no global actor")
    actors = []
    for level, reward in declared:
        if level == "global":
            actors.append(_global_actor(cfg, reward))
        else:  # HBO's local actors and MoS+'s flat one learn from mixing.local_reward
            reward = cfg.local_reward if reward == "ppl_ratio" else reward
            actors.append(Actor(level, reward, cfg.local_source, cfg.local_every))
    return Strategy(cfg.strategy, t, tuple(actors))


def prior(sizes: Sequence[int], temperature: float) -> np.ndarray:
    """p_i proportional to |D_i|^(1/T); T=inf gives uniform."""
    n = np.asarray(sizes, np.float64)
    p = np.ones_like(n) if math.isinf(temperature) else n ** (1.0 / temperature)
    return p / p.sum()


# The `mixing.*` keys each kind of actor reads.
_ACTOR_KEYS = frozenset({"actor_lr", "inner_steps", "kl_to_prior"})
_GLOBAL_KEYS = frozenset({"global_reward", "global_source", "global_every", "ema", "global_train_steps"})
_LOCAL_KEYS = frozenset({"local_reward", "local_source", "local_every"})
# What HBO's local actors read inside a ScaleBiO run (`scalebio.local_actors`): rewarded from
# the training batches, so `local_source` is not read; `min_prob` floors p_local.
SCALEBIO_LOCAL_KEYS = tuple(sorted(_ACTOR_KEYS | (_LOCAL_KEYS - {"local_source"}) | {"min_prob"}))


def settings_that_matter(cfg: MixingConfig) -> dict:
    """The `mixing.*` settings this strategy reads, resolved (e.g. temperature 0 -> its default).

    Two runs whose settings here are equal sample the same way, whatever their other
    `mixing.*` keys say: the report groups and labels runs by these. A key is dropped
    only where it is known to be unread, so a new key counts until it is classified here.
    """
    if cfg.strategy == "replay":  # the recorded schedule, step for step
        return {"strategy": cfg.strategy, "replay_from": cfg.replay_from}
    s = resolve(cfg)
    out = dataclasses.asdict(cfg) | {"temperature": s.temperature}
    unread = {"replay_from"}
    if cfg.strategy in ("uniform", "proportional"):  # their name fixes the prior
        unread.add("temperature")
    if not s.dynamic:
        unread |= _ACTOR_KEYS
    g, local = s.actor("global"), s.actor("local", "flat")
    if g is None:
        unread |= _GLOBAL_KEYS
    else:  # resolved: "auto" rewards, MoS's ratio from where the local ratios come from
        out.update(global_reward=g.reward, global_source=g.source, global_every=g.every)
        if not s.train_gradnorm:
            unread.add("global_train_steps")
    if local is None:
        unread |= _LOCAL_KEYS
    else:
        out.update(local_reward=local.reward, local_source=local.source, local_every=local.every)
    global_probes, local_probes = s.global_probes, s.progress_ratio and not s.ratio_from_train  # as the Mixer
    unread |= {k for k, used in (("global_probes_per_bucket", global_probes), ("local_probes_per_group", local_probes),
                                 ("probe_budget", global_probes or local_probes)) if not used}
    return {k: v for k, v in out.items() if k not in unread}
