"""The launchers: shell scripts parse, and the Colab notebook runs top to bottom on the CPU."""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("single_host.sh", "multi_gpu.sh", "slurm.sbatch", "tpu_pod.sh")


@pytest.mark.parametrize("name", SCRIPTS)
def test_launcher_is_valid_bash_and_documented(name):
    subprocess.run(["bash", "-n", str(ROOT / "launch" / name)], check=True)
    assert name in (ROOT / "launch" / "README.md").read_text()


def test_colab_notebook_runs_top_to_bottom(tmp_path, shared_cache):
    """Executed in a fresh kernel with a tiny config; the plot is displayed inline."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(ROOT / "launch" / "colab_demo.ipynb", as_version=4)
    over = [o for o in tiny_overrides(tmp_path / "unused", shared_cache, "eval.tasks=false", "eval.every=0")
            if not o.startswith("run_dir=")]
    env = {"HBO_JAX_DEMO_OVERRIDES": shlex.join(over), "PYTHONPATH": str(ROOT)}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel inherits this process's environment
    try:
        nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                resources={"metadata": {"path": str(tmp_path)}}).execute()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    install = "".join(o.get("text", "") for o in next(c for c in nb.cells if c.cell_type == "code").outputs)
    assert f"from {ROOT / 'hbo_jax'}" in install  # the kernel ran this checkout's code
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 2
    assert (tmp_path / "runs" / "colab_demo" / "summary.json").is_file()
    shutil.rmtree(tmp_path / "runs", ignore_errors=True)


def _install_cell() -> str:
    nb = json.loads((ROOT / "launch" / "colab_demo.ipynb").read_text())
    return "".join(next(c for c in nb["cells"] if c["cell_type"] == "code")["source"])


def test_colab_install_cell_has_no_placeholder_source():
    """The package comes from REPO (empty by default), never from a made-up URL."""
    cell = _install_cell()
    assert re.search(r'^REPO = ""$', cell, re.M)
    assert not re.search(r"https?://\w", cell), "a hard-coded URL"
    assert not re.search(r"<[^<>\n]+>|YOUR|example\.(com|org)|OWNER", cell), "a placeholder"


# A stand-in for `python -m pip` on the cell's PYTHONPATH: it records its arguments and,
# for a non-editable install, puts a stub hbo_jax package where the cell will import it.
_FAKE_PIP = """import json, sys
from pathlib import Path
here = Path(__file__).resolve().parents[1]
with open(here / "pip_calls.jsonl", "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
if "-e" not in sys.argv:
    (here / "hbo_jax").mkdir(exist_ok=True)
    (here / "hbo_jax" / "__init__.py").write_text("__version__ = 'stub'\\n")
"""


@pytest.mark.parametrize("where,repo,want_pip,want_from", [
    ("clone", "", ["-e", "ROOT"], "ROOT/hbo_jax"),
    ("outside", "", None, None),
    ("outside", "ROOT/launch", ["-e", "ROOT"], "ROOT/hbo_jax"),
    ("outside", "https://github.com/someone/hbo_jax", ["git+https://github.com/someone/hbo_jax"], "FAKE/hbo_jax"),
    ("outside", "git+https://github.com/someone/hbo_jax@v1", ["git+https://github.com/someone/hbo_jax@v1"],
     "FAKE/hbo_jax"),
], ids=["own-clone", "nothing", "clone-path", "page-url", "pip-url"])
def test_colab_install_cell_picks_its_source(tmp_path, where, repo, want_pip, want_from):
    """The first cell alone, in an interpreter without site-packages (`-S`, so an installed
    hbo_jax is invisible) and with a fake pip, started in launch/ of this clone or elsewhere."""
    fake = tmp_path / "fake"
    (fake / "pip").mkdir(parents=True)
    (fake / "pip" / "__init__.py").write_text("")
    (fake / "pip" / "__main__.py").write_text(_FAKE_PIP)
    cwd = ROOT / "launch" if where == "clone" else tmp_path
    sub = lambda s: s.replace("ROOT", str(ROOT)).replace("FAKE", str(fake))  # noqa: E731
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HBO_JAX_REPO")}
    env.update(PYTHONPATH=str(fake), HBO_JAX_REPO=sub(repo))
    proc = subprocess.run([sys.executable, "-S", "-c", _install_cell()], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=60)
    calls = fake / "pip_calls.jsonl"
    if want_pip is None:
        assert proc.returncode != 0 and "set REPO" in proc.stderr
        assert not calls.exists()
        return
    assert proc.returncode == 0, proc.stderr
    assert [json.loads(l) for l in calls.read_text().splitlines()] == [["install", "-q", *map(sub, want_pip)]]
    assert proc.stdout.strip().endswith(f"from {sub(want_from)}")
