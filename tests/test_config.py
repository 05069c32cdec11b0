import pytest

from hbo_jax.config import ConfigError, load_config
from hbo_jax.mixing.strategies import resolve


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
