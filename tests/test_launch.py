"""The launchers: shell scripts parse, and the Colab notebook runs top to bottom on the CPU."""

import os
import shlex
import shutil
import subprocess
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
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 2
    assert (tmp_path / "runs" / "colab_demo" / "summary.json").is_file()
    shutil.rmtree(tmp_path / "runs", ignore_errors=True)
