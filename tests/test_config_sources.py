"""Several --config files compose in order; relative input paths in a file are read from its folder."""

import argparse
from pathlib import Path

import pytest

from hbo_jax.cli import add_config_arguments
from hbo_jax.config import ConfigError, load_config, resolve_config, to_yaml

ROOT = Path(__file__).resolve().parents[1]


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_later_files_win_and_overrides_come_last(tmp_path):
    a = _write(tmp_path / "a.yaml", "train: {steps: 7, batch_size: 8}\nmixing: {strategy: hbo}\n")
    b = _write(tmp_path / "b.yaml", "train: {steps: 9}\nmixing: {strategy: uniform}\n")
    cfg = load_config([a, b], ["train.batch_size=4"])
    assert (cfg.train.steps, cfg.train.batch_size, cfg.mixing.strategy) == (9, 4, "uniform")


def test_the_cli_keeps_every_config_file():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    assert parser.parse_args(["--config", "a.yaml", "--config", "b.yaml", "x=1"]).config == ["a.yaml", "b.yaml"]


def test_a_users_mixture_file_and_a_shipped_strategy_file_compose(tmp_path):
    mine = _write(tmp_path / "mine.yaml", "data: {source_dir: mixture}\ntrain: {steps: 5}\n")
    cfg = load_config([mine, ROOT / "configs" / "temperature.yaml"])
    assert cfg.mixing.strategy == "temperature" and cfg.train.steps == 5
    assert cfg.data.source_dir == str(tmp_path / "mixture")  # not the embedded mixture


def test_relative_input_paths_are_read_from_the_files_folder(tmp_path):
    _write(tmp_path / "models" / "base" / "config.json", "{}")
    mine = _write(tmp_path / "conf" / "mine.yaml", """
run_dir: runs/mine
data:
  subsets:
    code: {train: [code/*.jsonl, /abs/x.jsonl, "~/y.jsonl"], eval: ["tfds:qa#test"]}
  tokenizer: tok
model: {init: "hf:../models/base"}
mixing: {strategy: replay, replay_from: runs/hbo}
""")
    cfg = load_config(mine)
    conf = tmp_path / "conf"
    assert cfg.data.subsets["code"].train == [f"{conf}/code/*.jsonl", "/abs/x.jsonl", "~/y.jsonl"]
    assert cfg.data.subsets["code"].eval == ["tfds:qa#test"]
    assert cfg.data.tokenizer == f"{conf}/tok" and cfg.model.init == f"hf:{tmp_path}/models/base"
    # Where runs live stays relative to the current directory, like run directories on the command line.
    assert cfg.run_dir == "runs/mine" and cfg.mixing.replay_from == "runs/hbo"


def test_a_runs_own_config_keeps_its_paths(tmp_path):
    run_cfg = _write(tmp_path / "run" / "config.yaml", "data: {source_dir: mixture}\n")
    assert load_config(run_cfg, paths_from_file=False).data.source_dir == "mixture"


def test_the_resolved_yaml_says_which_file_set_what(tmp_path):
    a = _write(tmp_path / "a.yaml", "run_dir: runs/a\ntrain: {steps: 7}\n")
    b = _write(tmp_path / "b.yaml", "run_dir: runs/b\n")
    cfg, sources = resolve_config([a, b], ["train.seed=3"])
    text = to_yaml(cfg, sources)
    header = [line for line in text.splitlines() if line.startswith("#")]
    assert header[1] == f"# merged in this order, later wins: defaults (hbo_jax/config.py), {a}, {b}, " \
                        "command line: train.seed=3"
    assert f"# from {a}: train.steps" in header and f"# from {b}: run_dir" in header
    assert f"# run_dir: {b} replaced the value from {a}" in header
    assert load_config(_write(tmp_path / "again.yaml", text)) == cfg  # the comments change nothing


def test_an_error_in_a_file_names_the_file(tmp_path):
    bad = _write(tmp_path / "bad.yaml", "train: {stepz: 3}\n")
    with pytest.raises(ConfigError, match=f"{bad}: train.stepz"):
        load_config([_write(tmp_path / "ok.yaml", "train: {steps: 3}\n"), bad])
