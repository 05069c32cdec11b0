"""Strategies are compositions of actors; the train step's extra outputs are their rewards' union."""

import pytest

from hbo_jax.config import load_config
from hbo_jax.mixing import global_rewards
from hbo_jax.mixing.strategy import REWARDS, resolve


def _strategy(*overrides):
    return resolve(load_config(None, list(overrides)).mixing)


@pytest.mark.parametrize("overrides, outputs", [
    (["mixing.strategy=hbo"], set()),
    (["mixing.strategy=hbo", "mixing.local_source=train"], {"ref_nll"}),
    (["mixing.strategy=hbo", "mixing.global_source=train"], {"example_gradnorm"}),
    (["mixing.strategy=hbo", "mixing.global_source=train", "mixing.local_source=train"],
     {"ref_nll", "example_gradnorm"}),
    (["mixing.strategy=mos", "mixing.local_source=train"], {"ref_nll"}),  # MoS's global ratio from training
    (["mixing.strategy=hbo_global", "mixing.local_source=train"], set()),  # no ratio reward: nothing to carry
    (["mixing.strategy=uniform"], set()),
])
def test_step_outputs_are_the_union_of_the_rewards_needs(overrides, outputs):
    assert _strategy(*overrides).step_outputs == outputs


def test_hbo_is_a_global_and_a_local_actor_on_their_own_schedules():
    s = _strategy("mixing.strategy=hbo", "mixing.global_every=7", "mixing.local_every=3")
    assert [(a.level, a.reward, a.every) for a in s.actors] == [("global", "gradnorm", 7), ("local", "ppl_ratio", 3)]


def test_mos_plus_is_one_flat_actor_on_the_local_reward():
    s = _strategy("mixing.strategy=mos_plus", "mixing.local_reward=loss_ratio")
    assert [(a.level, a.reward) for a in s.actors] == [("flat", "loss_ratio")] and s.flat and not s.global_actor


def test_global_source_train_turns_hbo_reward_into_the_per_example_norm():
    assert _strategy("mixing.global_source=train").actor("global").reward == "gradnorm_per_example"


def test_every_probe_global_reward_has_a_probe_program_and_every_choice_is_declared():
    from hbo_jax.config import _CHOICES

    choices = set(_CHOICES["mixing.global_reward"]) - {"auto"}
    assert choices | set(_CHOICES["mixing.local_reward"]) <= set(REWARDS)
    probe_global = {n for n, k in REWARDS.items() if "global" in k.levels and not k.progress_ratio}
    assert probe_global == set(global_rewards.MAKERS)


def test_hbo_reads_every_mixing_key_but_replay_and_train_norm_ones():
    # a key added to MixingConfig counts (is kept) until settings_that_matter classifies it
    from dataclasses import fields

    from hbo_jax.config import MixingConfig
    from hbo_jax.mixing.strategy import settings_that_matter

    read = set(settings_that_matter(MixingConfig()))
    assert read == {f.name for f in fields(MixingConfig)} - {"replay_from", "global_train_steps"}


def test_a_static_strategy_reads_only_its_prior_and_floor():
    from hbo_jax.mixing.strategy import settings_that_matter

    cfg = load_config(None, ["mixing.strategy=temperature", "mixing.ema=0.5", "mixing.actor_lr=1"]).mixing
    assert settings_that_matter(cfg) == {"strategy": "temperature", "temperature": 10.0, "min_prob": 0.0}
