"""Never lose a run: signals, damaged checkpoints, config changes on resume, resharding."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from hbo_jax.checkpoint import MANIFEST, Checkpointer, check_resume_config
from hbo_jax.config import ConfigError, MeshConfig, load_config
from hbo_jax.parallel import make_mesh
from hbo_jax.train import main

from conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[1]
# Quick runs: no periodic or task evaluation; HBO updates every 3 steps.
FAST = ("eval.every=0", "eval.tasks=false", "mixing.global_every=3", "mixing.local_every=3",
        "tracking.tensorboard=false")
TIMING = ("seconds", "share", "per_s")


def rows(run_dir: Path, name: str) -> list[dict]:
    """A JSONL log without its wall-clock fields."""
    return [{k: v for k, v in json.loads(l).items() if not any(t in k for t in TIMING)}
            for l in (run_dir / name).read_text().splitlines()]


def saved(run_dir: Path, step: int, items: tuple[str, ...] = ("train", "mixer")) -> dict:
    """A checkpoint's arrays of `items` (as numpy) and sampler state, restored replicated."""
    mesh = make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    out = {}
    for item in items:
        path = run_dir / "checkpoints" / str(step) / item
        meta = ocp.StandardCheckpointer().metadata(path).item_metadata
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=NamedSharding(mesh, P())),
                              meta)
        out[item] = jax.tree.map(np.asarray, ocp.StandardCheckpointer().restore(path, target))
    out["sampler"] = json.loads((run_dir / "checkpoints" / str(step) / "sampler" / "metadata").read_text())
    return out


def assert_same_state(a: dict, b: dict) -> None:
    for item in ("train", "mixer"):
        la, lb = jax.tree.leaves(a[item]), jax.tree.leaves(b[item])
        assert len(la) == len(lb)
        for x, y in zip(la, lb):
            np.testing.assert_array_equal(x, y)  # bitwise on CPU
    assert a["sampler"] == b["sampler"]


def child_env() -> dict:
    env = dict(os.environ)  # conftest set 8 CPU devices
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


@pytest.fixture(scope="module")
def reference(tmp_path_factory, shared_cache):
    """An uninterrupted 4-step run with checkpoints at steps 2 and 4."""
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    over = tiny_overrides(run_dir, shared_cache, "train.steps=4", "train.checkpoint_every=2",
                          "train.keep_checkpoints=3", *FAST)
    assert main(over) == 0
    return run_dir, over


# --- SIGTERM / SIGINT -------------------------------------------------------------------

_SELF_SIGNAL = """
import os, signal, sys
from hbo_jax import records, train
at, orig = int(os.environ.get("HBO_TEST_SIGTERM_AT", "-1")), records.JsonlWriter.write
def write(self, record):  # the signal arrives while the actor update of step `at` is logged
    # (on every process: only process 0 writes, but all of them call this)
    orig(self, record)
    if self.path.name == "mixing.jsonl" and record["step"] == at:
        os.kill(os.getpid(), signal.SIGTERM)
records.JsonlWriter.write = write
sys.exit(train.main(sys.argv[1:]))
"""


def test_sigterm_saves_exits_0_and_the_relaunch_equals_the_uninterrupted_run(tmp_path, shared_cache):
    """SIGTERM after step 3 (an HBO update, between two log lines): save, exit 0, resume exactly."""
    extra = ("train.steps=8", "train.checkpoint_every=100", "train.log_every=2", *FAST)
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main(tiny_overrides(full, shared_cache, *extra)) == 0
    proc = subprocess.run([sys.executable, "-c", _SELF_SIGNAL, *tiny_overrides(cut, shared_cache, *extra)],
                          env={**child_env(), "HBO_TEST_SIGTERM_AT": "3"}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "stopped by SIGTERM at step 3 of 8" in proc.stderr
    assert sorted(os.listdir(cut / "checkpoints")) == ["3"]
    assert not (cut / "summary.json").exists()  # stopped, not finished
    assert main(tiny_overrides(cut, shared_cache, *extra)) == 0  # the relaunch
    for name in ("metrics.jsonl", "mixing.jsonl"):
        assert rows(cut, name) == rows(full, name), name
    assert [r["step"] for r in rows(cut, "mixing.jsonl")] == [3, 6]  # updates in both halves
    assert_same_state(saved(cut, 8), saved(full, 8))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_from_outside_stops_at_the_next_step(tmp_path, shared_cache, sig):
    """A long run signalled mid-training saves and exits 0; prints the signal-to-exit time."""
    run_dir = tmp_path / "run"
    args = tiny_overrides(run_dir, shared_cache, "train.steps=100000", "train.checkpoint_every=100000", *FAST)
    log_path = tmp_path / "log.txt"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "hbo_jax.train", *args], env=child_env(), stdout=log,
                                stderr=subprocess.STDOUT)
        metrics = run_dir / "metrics.jsonl"
        deadline = time.time() + 240
        while not (metrics.is_file() and metrics.read_text().count("\n") >= 8):  # past the compiles
            assert proc.poll() is None and time.time() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.05)
        t0 = time.perf_counter()
        proc.send_signal(sig)
        code = proc.wait(timeout=120)
        seconds = time.perf_counter() - t0
    out = log_path.read_text()
    assert code == 0, out[-3000:]
    step = int(out.split(f"stopped by {sig.name} at step ")[1].split()[0])
    assert (run_dir / "checkpoints" / str(step) / MANIFEST).is_file()
    print(f"\n{sig.name}: stopped at step {step}, signal to exit {seconds:.2f}s")
    assert seconds < 60


# --- damaged checkpoints ----------------------------------------------------------------

def _truncate(step_dir: Path) -> None:
    big = max((p for p in (step_dir / "train").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    with open(big, "r+b") as f:
        f.truncate(big.stat().st_size // 2)


DAMAGE = {
    "truncated": _truncate,
    "missing_file": lambda d: (d / "sampler" / "metadata").unlink(),
    "missing_manifest": lambda d: (d / MANIFEST).unlink(),  # the save died before it was sealed
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_checkpoint_falls_back_to_the_previous_one(reference, tmp_path, capsys, damage):
    ref_dir, ref_over = reference
    run_dir = tmp_path / "run"
    shutil.copytree(ref_dir, run_dir)
    DAMAGE[damage](run_dir / "checkpoints" / "4")
    over = [o if not o.startswith("run_dir=") else f"run_dir={run_dir}" for o in ref_over]
    capsys.readouterr()
    assert main(over) == 0
    err = capsys.readouterr().err
    assert "checkpoint step 4" in err and "falling back to step 2" in err, err[-3000:]
    assert "resumed from step 2" in err
    moved = list((run_dir / "checkpoints.corrupt").iterdir())
    assert any(p.name.startswith("4-") and p.is_dir() for p in moved)
    # Steps 3-4 were trained again from step 2: the same logs, and a sound checkpoint 4.
    assert rows(run_dir, "metrics.jsonl") == rows(ref_dir, "metrics.jsonl")
    assert Checkpointer(run_dir / "checkpoints", 3).verify(4) is None
    assert_same_state(saved(run_dir, 4), saved(ref_dir, 4))


def test_a_torn_last_log_line_is_dropped_on_resume(reference, tmp_path, capsys):
    """A crash in the middle of an append: the resumed run's logs equal the uninterrupted run's."""
    ref_dir, ref_over = reference
    run_dir = tmp_path / "run"
    shutil.copytree(ref_dir, run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "4")  # the crash came before the step-4 save
    for name in ("metrics.jsonl", "mixing.jsonl"):
        with open(run_dir / name, "a") as f:
            f.write('{"step": 5, "loss": 1.2')
    over = [o if not o.startswith("run_dir=") else f"run_dir={run_dir}" for o in ref_over]
    capsys.readouterr()
    assert main(over) == 0
    assert "dropping the torn last line" in capsys.readouterr().err
    for name in ("metrics.jsonl", "mixing.jsonl"):
        assert rows(run_dir, name) == rows(ref_dir, name), name  # parses; steps once each, in order


def test_a_half_written_save_is_ignored(reference, tmp_path):
    """An uncommitted save (Orbax's temporary directory) never replaces the last good one."""
    ref_dir, _ = reference
    ckpt_dir = tmp_path / "checkpoints"
    shutil.copytree(ref_dir / "checkpoints", ckpt_dir)
    junk = ckpt_dir / "6.orbax-checkpoint-tmp-1234567"
    (junk / "train").mkdir(parents=True)
    (junk / "train" / "partial").write_bytes(b"\0" * 100)
    ckpt = Checkpointer(ckpt_dir, 3)
    step, meta = ckpt.find_resumable()
    assert step == 4 and meta["config"]["train"]["steps"] == 4
    assert not junk.exists()
    ckpt.close()


def test_no_complete_checkpoint_means_a_fresh_start(reference, tmp_path):
    ref_dir, _ = reference
    ckpt_dir = tmp_path / "checkpoints"
    shutil.copytree(ref_dir / "checkpoints", ckpt_dir)
    (ckpt_dir / "4" / MANIFEST).unlink()
    _truncate(ckpt_dir / "2")
    ckpt = Checkpointer(ckpt_dir, 3)
    assert ckpt.find_resumable() is None and ckpt.all_steps() == []
    ckpt.close()


def test_checkpoints_from_before_manifests_are_trusted(reference, tmp_path):
    ref_dir, _ = reference
    ckpt_dir = tmp_path / "checkpoints"
    shutil.copytree(ref_dir / "checkpoints", ckpt_dir)
    for step in ("2", "4"):
        (ckpt_dir / step / MANIFEST).unlink()
    ckpt = Checkpointer(ckpt_dir, 3)
    assert ckpt.find_resumable()[0] == 4
    ckpt.close()


# --- configuration changes on resume ----------------------------------------------------

NEVER = ("train.seed=3", "train.data_seed=3", "data.num_buckets=3", "model.hidden_size=64")  # refused even when allowed


@pytest.mark.parametrize("change", ["data.seq_len=64", "train.batch_size=16", "train.seed=3", "train.data_seed=3",
                                    "mixing.strategy=uniform", "data.num_buckets=3", "model.hidden_size=64"])
def test_resume_refuses_a_config_change_that_breaks_exactness(reference, tmp_path, capsys, change):
    ref_dir, ref_over = reference
    run_dir = tmp_path / "run"
    shutil.copytree(ref_dir, run_dir)
    before = (run_dir / "config.yaml").read_text()
    over = [o if not o.startswith("run_dir=") else f"run_dir={run_dir}" for o in ref_over]
    extra = [change, "train.allow_config_change=true"] if change in NEVER else [change]
    assert main([*over, *extra]) == 2
    err = capsys.readouterr().err
    key = change.split("=")[0]
    assert f"{key} changed from" in err and "Use a new run_dir" in err, err[-2000:]
    assert (run_dir / "config.yaml").read_text() == before  # the run directory is untouched


def test_resume_accepts_harmless_changes_and_explicitly_allowed_ones(reference, tmp_path, capsys):
    ref_dir, ref_over = reference
    run_dir = tmp_path / "run"
    shutil.copytree(ref_dir, run_dir)
    over = [o if not o.startswith("run_dir=") else f"run_dir={run_dir}" for o in ref_over]
    assert main([*over, "train.learning_rate=0.002"]) == 2  # refused without the flag
    assert "train.allow_config_change=true" in capsys.readouterr().err
    assert main([*over, "train.steps=5", "train.learning_rate=0.002", "train.allow_config_change=true",
                 "train.log_every=2", "eval.periodic_max_per_subset=2"]) == 0
    err = capsys.readouterr().err
    assert "train.learning_rate changed from 0.001 to 0.002" in err and "allowed by train.allow_config_change" in err
    assert "train.steps changed from 4 to 5" in err and "learning-rate schedule" in err
    assert [r["step"] for r in rows(run_dir, "metrics.jsonl")] == [1, 2, 3, 4, 5]


def test_layout_knobs_are_accepted_on_resume_with_a_note():
    from hbo_jax.config import to_dict

    a = load_config(None, [])
    b = load_config(None, ["data.packing=true", "model.remat=true", "model.remat_policy=dots"])
    notes = check_resume_config(to_dict(a), to_dict(b), allow=False, where="here")
    assert len(notes) == 3 and all("up to float rounding" in n for n in notes)


def test_check_resume_config_names_nested_keys():
    a = load_config(None, ["data.source_dir=/x"])
    b = load_config(None, ["data.source_dir=/y", "run_dir=elsewhere", "mesh.data=2", "tracking.tensorboard=false"])
    from hbo_jax.config import to_dict

    with pytest.raises(ConfigError, match="data.source_dir changed from '/x' to '/y'"):
        check_resume_config(to_dict(a), to_dict(b), allow=False, where="here")
    c = load_config(None, ["data.source_dir=/x", "run_dir=elsewhere", "mesh.data=2", "eval.every=5"])
    assert check_resume_config(to_dict(a), to_dict(c), allow=False, where="here") == []


def test_a_moved_input_folder_is_accepted_when_its_contents_are_the_same():
    from hbo_jax.config import to_dict

    a, b = (to_dict(load_config(None, [f"data.source_dir={d}"])) for d in ("/x", "/y"))
    notes = check_resume_config(a, b, allow=False, where="here", same_inputs=lambda: True)
    assert len(notes) == 1 and "data.source_dir changed from '/x' to '/y'" in notes[0] and "contents" in notes[0]


def test_a_moved_input_folder_with_other_contents_is_refused_even_when_allowed():
    from hbo_jax.config import to_dict

    a, b = (to_dict(load_config(None, [f"data.source_dir={d}"])) for d in ("/x", "/y"))
    with pytest.raises(ConfigError, match="not the ones the checkpoint was trained on.*new run_dir"):
        check_resume_config(a, b, allow=True, where="here", same_inputs=lambda: False)


def test_the_contents_are_looked_up_once_and_only_for_input_paths():
    from hbo_jax.config import to_dict

    calls = []
    a = to_dict(load_config(None, ["data.source_dir=/x", "data.subsets={s: {train: [/x/s.jsonl]}}"]))
    b = to_dict(load_config(None, ["data.source_dir=/y", "data.subsets={s: {train: [/y/s.jsonl]}}"]))
    assert len(check_resume_config(a, b, allow=False, where="here",
                                   same_inputs=lambda: calls.append(1) or True)) == 2
    assert calls == [1]
    c = to_dict(load_config(None, ["data.source_dir=/x", "data.subsets={s: {train: [/x/s.jsonl]}}",
                                   "data.seq_len=64"]))
    with pytest.raises(ConfigError, match="data.seq_len changed"):  # not an input path: contents do not matter
        check_resume_config(a, c, allow=False, where="here", same_inputs=lambda: True)


def test_resume_continues_from_a_moved_copy_of_the_data_and_refuses_an_edited_one(reference, tmp_path, capsys):
    from conftest import FIXTURE

    ref_dir, ref_over = reference
    moved = tmp_path / "moved_data"
    shutil.copytree(FIXTURE, moved)
    run_dir = tmp_path / "run"
    shutil.copytree(ref_dir, run_dir)
    over = [f"run_dir={run_dir}" if o.startswith("run_dir=") else f"data.source_dir={moved}"
            if o.startswith("data.source_dir=") else o for o in ref_over]
    edited = next(p for p in sorted(moved.rglob("*")) if p.is_file() and p.suffix in (".jsonl", ".json"))
    original = edited.read_bytes()
    edited.write_bytes(original + b"\n")  # one more byte: another file by content
    assert main([*over, "train.steps=5", "train.allow_config_change=true"]) == 2
    err = capsys.readouterr().err
    assert "data.source_dir changed from" in err and "not the ones the checkpoint was trained on" in err, err[-2000:]
    edited.write_bytes(original)
    assert main([*over, "train.steps=5"]) == 0
    err = capsys.readouterr().err
    assert "the checkpointed run's contents" in err and "resumed from step 4" in err, err[-2000:]
    assert [r["step"] for r in rows(run_dir, "metrics.jsonl")] == [1, 2, 3, 4, 5]


def test_a_resume_with_another_algorithm_is_refused_even_when_allowed():
    from hbo_jax.config import to_dict

    scalebio = load_config(None, ["algorithm=scalebio", "scalebio.validation_subsets=[a]"])
    with pytest.raises(ConfigError, match="algorithm changed from 'sampling' to 'scalebio'.*Use a new run_dir"):
        check_resume_config(to_dict(load_config(None, [])), to_dict(scalebio), allow=True, where="here")


def test_resume_compares_the_resolved_data_seed():
    from hbo_jax.config import to_dict

    unset = to_dict(load_config(None, ["train.seed=2"]))
    before_the_key = to_dict(load_config(None, ["train.seed=2"]))
    del before_the_key["train"]["data_seed"]  # a checkpoint from before train.data_seed: train.seed drew
    spelled_out = to_dict(load_config(None, ["train.seed=2", "train.data_seed=2"]))
    for saved in (unset, before_the_key):
        assert check_resume_config(saved, spelled_out, allow=False, where="here") == []
        with pytest.raises(ConfigError, match=r"train.data_seed changed from 2 to 0 .*Use a new run_dir"):
            check_resume_config(saved, to_dict(load_config(None, ["train.seed=2", "train.data_seed=0"])),
                                allow=True, where="here")


def test_a_changed_train_seed_is_named_even_when_it_moves_the_data_seed():
    from hbo_jax.config import to_dict

    with pytest.raises(ConfigError, match="train.seed changed from 0 to 3"):
        check_resume_config(to_dict(load_config(None, [])), to_dict(load_config(None, ["train.seed=3"])),
                            allow=True, where="here")


# --- resharding -------------------------------------------------------------------------

def test_a_checkpoint_from_8_devices_restores_onto_other_meshes(reference, tmp_path, shared_cache):
    """Saved on Mesh(8,1,1): restored on 1 device and on (2,2,2), and training resumes on (2,2,2)."""
    ref_dir, ref_over = reference
    ref = saved(ref_dir, 4)  # read onto 1 device
    ckpt = Checkpointer(ref_dir / "checkpoints", 3)
    for shape in ((1, 1, 1), (2, 2, 2)):
        mesh = make_mesh(MeshConfig(*shape), jax.devices()[:int(np.prod(shape))])
        from hbo_jax.scorer import prepare
        from hbo_jax.models.llama import LlamaSpec, abstract_model

        cfg = load_config(None, ref_over)
        data = prepare(cfg, mesh)
        _, params_like = abstract_model(LlamaSpec.from_config(cfg.model, vocab_size=len(data.tokenizer)))
        params = ckpt.restore_params(4, params_like, mesh)  # placed by logical axis names on `mesh`
        for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(ref["train"]["params"])):
            assert got.sharding.mesh.shape == mesh.shape
            np.testing.assert_array_equal(np.asarray(got), want)
    ckpt.close()
    run_dir = tmp_path / "run"
    shutil.copytree(ref_dir, run_dir)
    over = [o if not o.startswith("run_dir=") else f"run_dir={run_dir}" for o in ref_over]
    assert main([*over, "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "train.steps=6"]) == 0
    losses = [r["loss"] for r in rows(run_dir, "metrics.jsonl")]
    assert len(losses) == 6 and np.all(np.isfinite(losses))


# --- asynchronous saves -----------------------------------------------------------------

def test_async_checkpoints_equal_synchronous_ones(tmp_path, shared_cache):
    """A checkpoint every step, written while the next (donating) steps run: same bytes."""
    extra = ("train.steps=4", "train.checkpoint_every=1", "train.keep_checkpoints=4", *FAST)
    sync, asyn = tmp_path / "sync", tmp_path / "async"
    assert main(tiny_overrides(sync, shared_cache, *extra)) == 0
    assert main(tiny_overrides(asyn, shared_cache, *extra, "train.async_checkpoint=true")) == 0
    ckpt = Checkpointer(asyn / "checkpoints", 4)
    assert ckpt.all_steps() == [1, 2, 3, 4] and all(ckpt.verify(s) is None for s in range(1, 5))
    ckpt.close()
    for step in range(1, 5):
        assert_same_state(saved(asyn, step), saved(sync, step))


def test_a_checkpoint_from_before_the_non_finite_counters_restores(tmp_path):
    """Its optimizer state (the bare AdamW chain) goes into inner_state; the counters start at 0."""
    import jax.numpy as jnp
    import optax

    from hbo_jax.parallel import replicated
    from hbo_jax.step import TrainState, init_train_state, make_optimizer

    mesh = make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    params = jax.device_put({"w": jnp.arange(4.0)}, replicated(mesh))
    tx = make_optimizer(1e-3, 10, 1, 0.0, 1.0)
    old_opt = tx.inner.update({"w": jnp.ones(4)}, tx.inner.init(params), params)[1]  # mu != 0
    old = TrainState(jax.device_put(jnp.int32(1), replicated(mesh)), params,
                     jax.device_put(old_opt, replicated(mesh)))
    ckpt = Checkpointer(tmp_path, 2)
    ckpt.save(1, {"train": old, "mixer": {"x": params["w"]}}, {}, {})
    got = ckpt.restore(1, {"train": init_train_state(params, tx, mesh), "mixer": {"x": params["w"]}})["trees"]["train"]
    ckpt.close()
    assert isinstance(got.opt_state, optax.ApplyIfFiniteState) and int(got.opt_state.total_notfinite) == 0
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(got.opt_state.inner_state), jax.device_get(old_opt))
