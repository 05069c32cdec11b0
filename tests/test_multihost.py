"""A real two-process run on this CPU: `jax.distributed` over a localhost coordinator.

Two OS processes with 4 fake CPU devices each form one 8-device mesh (gloo collectives).
Compared with one process over 8 devices on the same config: every update leaves both
processes with the same mixer state, their batch slices are disjoint and together form
the single-process global batch, the losses match, and the checkpoint the pair writes
restores into one process on one device.
"""

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from hbo_jax.checkpoint import Checkpointer
from hbo_jax.config import MeshConfig, load_config
from hbo_jax.distributed import detect_cluster
from hbo_jax.parallel import make_mesh
from hbo_jax.train import main

from conftest import tiny_overrides
from test_resilience import _SELF_SIGNAL, assert_same_state, rows, saved

ROOT = Path(__file__).resolve().parents[1]
EXTRA = ("train.steps=4", "train.checkpoint_every=2", "mixing.global_every=1", "mixing.local_every=1",
         "eval.every=0", "eval.tasks=false", "tracking.tensorboard=false", "distributed.trace=true",
         "distributed.stop_check_every=2")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _trace(run_dir: Path, i: int, kind: str) -> list[dict]:
    lines = (run_dir / "trace" / f"process_{i}.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def launch_pair(run_dir: Path, cache: Path, sigterm_at: dict[int, int] | None = None,
                extra: tuple[str, ...] = ()) -> list[str]:
    """Runs two processes x 4 CPU devices to completion; returns their logs.

    `sigterm_at` {process: step}: that process sends itself SIGTERM at that actor update.
    """
    env = dict(os.environ)
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
    env.update(XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count=4".strip(), JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p))
    port = _free_port()
    procs, logs = [], [run_dir.parent / f"{run_dir.name}.process_{i}.log" for i in range(2)]
    for i in range(2):
        args = tiny_overrides(run_dir, cache, *EXTRA, *extra, f"distributed.coordinator_address=127.0.0.1:{port}",
                              "distributed.num_processes=2", f"distributed.process_id={i}",
                              "distributed.initialization_timeout=120")
        child_env = dict(env)
        if sigterm_at and i in sigterm_at:
            child_env["HBO_TEST_SIGTERM_AT"] = str(sigterm_at[i])
        with open(logs[i], "w") as f:
            procs.append(subprocess.Popen([sys.executable, "-c", _SELF_SIGNAL, *args], env=child_env,
                                          cwd=run_dir.parent, stdout=f, stderr=subprocess.STDOUT))
    try:
        codes = [p.wait(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    out = [p.read_text() for p in logs]
    assert codes == [0, 0], "\n".join(o[-3000:] for o in out)
    assert "process 1 of 2" in out[1]
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shared_cache):
    """(single-process 8-device run dir, two-process 2x4-device run dir)."""
    base = tmp_path_factory.mktemp("multihost")
    single, multi = base / "single", base / "multi"
    assert main(tiny_overrides(single, shared_cache, *EXTRA)) == 0  # also prepares the shared cache
    launch_pair(multi, shared_cache)
    return single, multi


def test_both_processes_hold_the_same_mixer_state_after_every_update(runs):
    _, multi = runs
    p0, p1 = _trace(multi, 0, "mixer"), _trace(multi, 1, "mixer")
    assert [r["step"] for r in p0] == [1, 2, 3]
    assert p0 == p1  # digests of each process's local copy, and the probabilities it samples with


def test_rewards_from_training_steps_leave_both_processes_with_the_same_mixer_state(tmp_path, shared_cache):
    """Zero-probe HBO: per-example norms and PPL ratios from sharded train steps."""
    run = tmp_path / "no_probes"
    launch_pair(run, shared_cache, extra=("mixing.global_source=train", "mixing.local_source=train"))
    p0, p1 = _trace(run, 0, "mixer"), _trace(run, 1, "mixer")
    assert [r["step"] for r in p0] == [1, 2, 3] and p0 == p1
    rewards = [json.loads(line)["reward_global"] for line in (run / "mixing.jsonl").read_text().splitlines()]
    assert all(r is not None and min(r) > 0 for r in rewards)


def test_scalebio_leaves_both_processes_with_the_same_lambda_after_every_step(tmp_path, shared_cache):
    """The data-weight logits are replicated outputs of a step on global arrays: every process
    holds the same lambda (traced at every log step) and writes the same weights."""
    run = tmp_path / "scalebio"
    # Two steps and no checkpoint before the end: lambda after a step that started from a trained one.
    launch_pair(run, shared_cache, extra=("algorithm=scalebio", "scalebio.validation_subsets=[arithmetic]",
                                          "train.steps=2", "train.checkpoint_every=100"))
    p0, p1 = _trace(run, 0, "mixer"), _trace(run, 1, "mixer")
    assert [r["step"] for r in p0] == [1, 2] and p0 == p1
    lams = [json.loads(line)["lambda"] for line in (run / "mixing.jsonl").read_text().splitlines()]
    assert len(lams) == 2 and any(v != 0 for v in lams[-1])


def test_data_slices_are_disjoint_and_form_the_global_batch(runs):
    single, multi = runs
    ref = _trace(single, 0, "batch")
    p0, p1 = _trace(multi, 0, "batch"), _trace(multi, 1, "batch")
    assert [r["step"] for r in p0] == [r["step"] for r in p1] == [r["step"] for r in ref] == [1, 2, 3, 4]
    for a, b, whole in zip(p0, p1, ref):
        assert a["rows"] == [0, 4] and b["rows"] == [4, 8] and whole["rows"] == [0, 8]
        assert a["digest"] + b["digest"] == whole["digest"]


def test_losses_and_probabilities_equal_the_single_process_run(runs):
    single, multi = runs
    for name, keys in (("metrics.jsonl", ("loss", "grad_norm")), ("mixing.jsonl", ("p_global", "p_local"))):
        a, b = rows(single, name), rows(multi, name)
        assert [r["step"] for r in a] == [r["step"] for r in b]
        for ra, rb in zip(a, b):
            for k in keys:
                np.testing.assert_allclose(rb[k], ra[k], rtol=1e-5, atol=1e-7, err_msg=f"{name} {k}")


def test_the_two_process_checkpoint_restores_into_one_process_on_one_device(runs):
    single, multi = runs
    got, want = saved(multi, 4), saved(single, 4)  # both read onto 1 device
    for item in ("train", "mixer"):
        for x, y in zip(jax.tree.leaves(got[item]), jax.tree.leaves(want[item])):
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)
    sa, sb = dict(got["sampler"]), dict(want["sampler"])
    ea, eb = sa.pop("schedule"), sb.pop("schedule")
    assert sa == sb  # the same cursors: the same examples were drawn
    assert [e["from_step"] for e in ea] == [e["from_step"] for e in eb]
    for a, b in zip(ea, eb):  # probabilities from a gloo all-reduce: equal to float rounding
        np.testing.assert_allclose(a["p_local"], b["p_local"], rtol=1e-5)
        np.testing.assert_allclose(a["p_global"], b["p_global"], rtol=1e-5)
    # The evaluation path: parameters by logical axis names onto a 1-device mesh.
    from hbo_jax.scorer import prepare
    from hbo_jax.models.llama import LlamaSpec, abstract_model

    cfg = load_config(None, tiny_overrides(multi, Path(json.loads(
        (multi / "summary.json").read_text())["prepared"]).parents[1], *EXTRA))
    mesh = make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    _, like = abstract_model(LlamaSpec.from_config(cfg.model, vocab_size=len(prepare(cfg, mesh).tokenizer)))
    ckpt = Checkpointer(multi / "checkpoints", 3)
    params = ckpt.restore_params(4, like, mesh)
    ckpt.close()
    for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(got["train"]["params"])):
        np.testing.assert_array_equal(np.asarray(x), y)


def test_sigterm_to_one_process_stops_both_at_the_same_step_and_resumes_exactly(runs, tmp_path, shared_cache):
    """Process 1 alone is signalled at step 1; both agree at the next check (step 2,
    stop_check_every=2), save step 2 and exit 0; the relaunch finishes with the
    uninterrupted two-process run's logs and state."""
    _, multi = runs
    cut = tmp_path / "cut"
    logs = launch_pair(cut, shared_cache, sigterm_at={1: 1})
    assert "stopped by SIGTERM at step 2 of 4" in logs[1]
    assert "stopped by a signal to another process at step 2 of 4" in logs[0]
    assert sorted(os.listdir(cut / "checkpoints")) == ["2"]
    launch_pair(cut, shared_cache)
    for name in ("metrics.jsonl", "mixing.jsonl"):
        assert rows(cut, name) == rows(multi, name), name
    assert_same_state(saved(cut, 4), saved(multi, 4))


@pytest.mark.parametrize("env,expected", [
    ({}, None),
    ({"SLURM_JOB_ID": "1", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "2"}, "slurm"),
    ({"SLURM_JOB_ID": "1", "SLURM_STEP_NODELIST": "n1", "SLURM_NTASKS": "1"}, None),  # one task: no init
    ({"OMPI_COMM_WORLD_SIZE": "4"}, "openmpi"),
    ({"TPU_WORKER_HOSTNAMES": "t0,t1"}, "tpu"),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, "JAX_COORDINATOR_ADDRESS"),
])
def test_cluster_detection(env, expected):
    assert detect_cluster(env) == expected


def test_explicit_flags_must_be_complete(tmp_path, capsys):
    code = main([f"run_dir={tmp_path}", "distributed.coordinator_address=127.0.0.1:1"])
    assert code == 2 and "distributed.num_processes" in capsys.readouterr().err


def test_two_processes_export_the_same_hugging_face_directory_as_one(runs, tmp_path):
    """`python -m hbo_jax.export` on every host: collective gathers, process 0 writes."""
    from hbo_jax.export import main as export_main

    single, multi = runs
    one = tmp_path / "one"
    assert export_main([str(multi), str(one)]) == 0  # this process: 8 devices, no cluster
    env = dict(os.environ)
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
    env.update(XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count=4".strip(), JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p))
    port, pair = _free_port(), tmp_path / "pair"
    procs = [subprocess.Popen(
        [sys.executable, "-m", "hbo_jax.export", str(multi), str(pair),
         f"distributed.coordinator_address=127.0.0.1:{port}", "distributed.num_processes=2",
         f"distributed.process_id={i}", "distributed.initialization_timeout=120"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outs)
    assert "exported" in outs[0] and "exported" not in outs[1]  # only process 0 writes and reports
    assert (pair / "model.safetensors").read_bytes() == (one / "model.safetensors").read_bytes()
    assert (pair / "config.json").read_text() == (one / "config.json").read_text()


def test_the_two_process_checkpoint_reads_by_name_as_export_writes_it(runs, tmp_path):
    """`readers.RunReader` on the pair's per-process OCDBT files, one tensor at a time on
    the host, gives the tensors `python -m hbo_jax.export` writes."""
    from safetensors.numpy import load_file

    from hbo_jax.export import main as export_main
    from hbo_jax.models.readers import RunReader

    _, multi = runs
    assert export_main([str(multi), str(tmp_path / "hf")]) == 0
    want = load_file(str(tmp_path / "hf" / "model.safetensors"))
    with RunReader(multi) as reader:
        assert sorted(reader.names()) == sorted(want)
        for name, arr in reader.items():
            assert arr.dtype == want[name].dtype, name
            np.testing.assert_array_equal(arr, want[name], err_msg=name)
