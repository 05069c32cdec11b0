import pytest

from hbo_jax.config import ConfigError, load_config
from hbo_jax.data.prepare import check_min_prob
from hbo_jax.mixing.strategy import resolve


def test_defaults_are_valid_and_run_hbo():
    cfg = load_config()
    assert cfg.mixing.strategy == "hbo"


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match="train.stepz"):
        load_config(overrides=["train.stepz=3"])


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match="train.steps"):
        load_config(overrides=["train.steps=many"])


def test_bad_choice_is_named():
    with pytest.raises(ConfigError, match="mixing.strategy"):
        load_config(overrides=["mixing.strategy=greedy"])


def test_non_positive_is_named():
    with pytest.raises(ConfigError, match="data.num_buckets"):
        load_config(overrides=["data.num_buckets=0"])


def test_negative_grad_clip_is_named():
    with pytest.raises(ConfigError, match="train.grad_clip"):
        load_config(overrides=["train.grad_clip=-1"])


def test_override_without_equals_is_rejected():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(overrides=["train.steps"])


def test_yaml_file_is_merged(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  steps: 7\nmixing:\n  strategy: uniform\n")
    cfg = load_config(path, ["train.batch_size=8"])
    assert (cfg.train.steps, cfg.mixing.strategy, cfg.train.batch_size) == (7, "uniform", 8)


def test_temperature_strategy_defaults_to_ten():
    assert resolve(load_config(overrides=["mixing.strategy=temperature"]).mixing).temperature == 10.0


def test_temperature_contradicting_strategy_is_rejected():
    with pytest.raises(ConfigError, match="mixing.temperature"):
        resolve(load_config(overrides=["mixing.strategy=proportional", "mixing.temperature=5"]).mixing)


def test_train_local_source_needs_the_scorer_as_start():
    with pytest.raises(ConfigError, match="mixing.local_source"):
        load_config(overrides=["mixing.local_source=train", "model.init=random"])


@pytest.mark.parametrize("init", ["hf:/nonexistent/model", "gguf:/nonexistent.gguf", "bert"])
def test_bad_model_init_is_named(init):
    with pytest.raises(ConfigError, match="model.init"):
        load_config(overrides=[f"model.init={init}"])


@pytest.mark.parametrize("extra", [["mixing.strategy=mos"], ["mixing.global_reward=gradnorm"],
                                   ["mixing.strategy=hbo_local"]])
def test_global_source_train_only_for_the_per_example_gradnorm_reward(extra):
    cfg = load_config(overrides=["mixing.global_source=train", *extra])
    with pytest.raises(ConfigError, match="mixing.global_source=train"):
        resolve(cfg.mixing)


# --- every numeric key is range-checked at config time ----------------------------------

def _numeric_keys(cls=None, prefix="") -> dict[str, type]:
    """Every int / float field of the config dataclasses (recursively), dotted key -> type."""
    import dataclasses
    import typing

    from hbo_jax.config import Config

    cls = cls or Config
    hints, out = typing.get_type_hints(cls), {}
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        if dataclasses.is_dataclass(t):
            out.update(_numeric_keys(t, f"{prefix}{f.name}."))
        elif t in (int, float):  # bool is its own type here
            out[f"{prefix}{f.name}"] = t
    return out


NUMERIC = _numeric_keys()
FLOATS = [k for k, t in NUMERIC.items() if t is float]


def _refused(override: str, key: str):
    import re

    with pytest.raises(ConfigError, match=re.escape(f"{key}=")):
        load_config(overrides=[override])


def test_every_numeric_key_has_a_range_rule():
    from hbo_jax.config_rules import RULES

    assert set(NUMERIC) == set(RULES)


@pytest.mark.parametrize("key", sorted(NUMERIC))
def test_a_negative_value_is_refused_naming_the_key(key):
    _refused(f"{key}=-2", key)  # -2: below every range (mesh and process_id allow -1)


@pytest.mark.parametrize("key", FLOATS)
def test_nan_is_refused_naming_the_key(key):
    _refused(f"{key}=nan", key)


@pytest.mark.parametrize("key", [k for k in FLOATS if k != "mixing.temperature"])
def test_infinity_is_refused_naming_the_key(key):
    _refused(f"{key}=inf", key)


@pytest.mark.parametrize("override", ["mixing.ema=1.5", "mixing.min_prob=1.0", "train.learning_rate=0",
                                      "scorer.learning_rate=0", "mixing.actor_lr=0", "model.rms_norm_eps=0",
                                      "model.rope_theta=0", "mesh.fsdp=0"])
def test_a_value_at_or_past_the_other_end_of_its_range_is_refused(override):
    _refused(override, override.split("=")[0])


@pytest.mark.parametrize("override", ["mixing.temperature=inf", "mesh.tensor=-1", "train.grad_clip=0",
                                      "train.warmup_steps=0", "distributed.process_id=-1"])
def test_the_documented_special_values_are_accepted(override):
    load_config(overrides=[override])


# --- mixing.min_prob against the number of subsets and buckets, before any data work ------
# The buckets are checked by load_config; the subsets by check_min_prob, which a run calls first.

def test_min_prob_is_checked_against_the_embedded_mixtures_nine_subsets():
    check_min_prob(load_config(overrides=["mixing.min_prob=0.11"]))  # 0.99
    with pytest.raises(ConfigError, match="mixing.min_prob=0.12 times the 9 subsets"):
        check_min_prob(load_config(overrides=["mixing.min_prob=0.12"]))


def test_min_prob_is_checked_against_the_subset_files_of_a_source_dir():
    from conftest import FIXTURE

    n = len(list(FIXTURE.glob("*.train.jsonl*")))
    with pytest.raises(ConfigError, match=f"times the {n} subsets"):
        check_min_prob(load_config(overrides=[f"data.source_dir={FIXTURE}", f"mixing.min_prob={1 / n}",
                                              "data.num_buckets=2"]))


def test_min_prob_is_checked_against_the_declared_subsets(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  subsets:\n" + "".join(f"    s{i}:\n      train: [x{i}.jsonl]\n" for i in range(3)))
    check_min_prob(load_config(path, ["mixing.min_prob=0.3", "data.num_buckets=2"]))
    with pytest.raises(ConfigError, match="times the 3 subsets"):
        check_min_prob(load_config(path, ["mixing.min_prob=0.34", "data.num_buckets=2"]))


def test_a_run_checks_min_prob_against_the_subsets_before_anything_else(tmp_path, monkeypatch, capsys):
    from hbo_jax import train

    monkeypatch.setattr(train, "prepare", lambda *a: pytest.fail("the data was prepared"))
    run_dir = tmp_path / "run"
    assert train.main([f"run_dir={run_dir}", "mixing.min_prob=0.12"]) == 2
    assert "mixing.min_prob=0.12 times the 9 subsets" in capsys.readouterr().err
    assert not run_dir.exists()


def test_min_prob_is_checked_against_the_buckets():
    with pytest.raises(ConfigError, match="data.num_buckets=4"):
        load_config(overrides=["mixing.min_prob=0.25", "data.num_buckets=4"])
