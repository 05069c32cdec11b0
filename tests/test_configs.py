from pathlib import Path

import pytest

from hbo_jax.config import ConfigError, load_config

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


def test_demo_yaml_equals_the_defaults():
    assert load_config(Path(__file__).parents[1] / "configs" / "demo.yaml") == load_config()


# Example configs for models whose weights users bring (model.init=hf:/models/...).
NEEDS_WEIGHTS = {"qwen2.5_7b_hbo_ml.yaml", "llama3.1_8b_hbo_ml.yaml"}


@pytest.mark.parametrize("path", [p for p in CONFIGS if p.name not in NEEDS_WEIGHTS], ids=lambda p: p.name)
def test_every_config_loads(path):
    cfg = load_config(path)
    assert cfg.run_dir.startswith("runs/")


@pytest.mark.parametrize("name", sorted(NEEDS_WEIGHTS))
def test_configs_for_local_weights_name_the_missing_model(name):
    path = CONFIGS[0].parent / name
    with pytest.raises(ConfigError, match="model.init=hf:/models/"):
        load_config(path)
    cfg = load_config(path, ["model.init=scorer"])  # everything else in the file is valid
    assert cfg.train.batch_size == 64 and len(cfg.data.subsets) == 8
