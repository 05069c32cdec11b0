from pathlib import Path

import pytest

from hbo_jax.config import load_config

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


def test_demo_yaml_equals_the_defaults():
    assert load_config(Path(__file__).parents[1] / "configs" / "demo.yaml") == load_config()


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_loads(path):
    cfg = load_config(path)
    assert cfg.run_dir.startswith("runs/")
