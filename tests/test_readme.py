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
