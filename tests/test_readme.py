import re
from pathlib import Path

ROOT = Path(__file__).parents[1]


def _commands() -> list[str]:
    block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    return [l for l in block.splitlines() if l.strip() and not l.startswith("#")]


def test_ci_runs_readme_test_command_verbatim():
    assert _commands()[1] in (ROOT / ".ci" / "run").read_text()


def test_readme_first_command_runs_the_default_entry_point():
    assert _commands()[0].endswith("-m hbo_jax.train")


def _worked_example() -> list[str]:
    """The four commands of the README's worked example, `for s in 0 1` loops unrolled."""
    text = (ROOT / "README.md").read_text().split("### Worked example", 1)[1]
    block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    commands = [l for l in block.splitlines() if l.strip()]
    assert len(commands) == 4
    out = []
    for c in commands:
        loop = re.fullmatch(r"for s in 0 1; do (.*); done", c)
        out += [loop.group(1).replace("$s", s) for s in "01"] if loop else [c]
    return out


def test_the_worked_example_composes_a_users_mixture_with_a_shipped_strategy(tmp_path, monkeypatch):
    import argparse
    import shlex
    import shutil
    import subprocess

    from hbo_jax.cli import add_config_arguments
    from hbo_jax.config import load_config, to_dict
    from hbo_jax.config_keys import GROUP_IGNORE, flatten, matches
    from hbo_jax.data.prepare import mixture

    from conftest import FIXTURE

    for train in FIXTURE.glob("*.train.jsonl"):  # the committed fixture, one folder per subset
        name = train.name.split(".")[0]
        (tmp_path / "my_mixture" / name).mkdir(parents=True)
        shutil.copy(train, tmp_path / "my_mixture" / name / "train.jsonl")
        shutil.copy(FIXTURE / f"{name}.eval.jsonl", tmp_path / "my_mixture" / name / "eval.jsonl")
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    monkeypatch.chdir(tmp_path)
    write, *trains, report = _worked_example()
    subprocess.run(write, shell=True, check=True)
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    configs = []
    for command in trains:
        args = parser.parse_args(shlex.split(command.split("-m hbo_jax.train", 1)[1]))
        configs.append(load_config(args.config, [*args.overrides, f"data.cache_dir={tmp_path / 'cache'}"]))
    assert [(c.mixing.strategy, c.run_dir, c.train.data_seed) for c in configs] == [
        ("hbo", "runs/hbo_s0", 0), ("hbo", "runs/hbo_s1", 1),
        ("temperature", "runs/temp_s0", 0), ("temperature", "runs/temp_s1", 1)]
    subsets = mixture(configs[-1])  # the user's mixture, not the embedded one, after the strategy file
    assert sorted(s.name for s in subsets) == sorted(p.name for p in (tmp_path / "my_mixture").iterdir())
    assert all(s.train[0].path == tmp_path / "my_mixture" / s.name / "train.jsonl" and s.eval for s in subsets)
    assert report.split()[3:7] == [c.run_dir for c in configs]
    differ = {k for k, v in flatten(to_dict(configs[0])).items()
              if v != flatten(to_dict(configs[3]))[k] and not matches(k, GROUP_IGNORE)}
    assert differ == {"mixing.strategy", "mixing.temperature"}  # two groups of two seeds in the report
