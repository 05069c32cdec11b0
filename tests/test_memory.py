"""The memory planner compiles the run's programs from shapes that match the real ones."""

import jax
import numpy as np
import pytest

from hbo_jax.config import MeshConfig, load_config
from hbo_jax.memory import ProgramMemory, format_plan, main, model_spec, plan
from hbo_jax.models.llama import init_params
from hbo_jax.parallel import make_mesh
from hbo_jax.step import init_train_state, make_optimizer

from conftest import tiny_overrides


def _cfg(tmp_path, *extra):
    return load_config(overrides=tiny_overrides(tmp_path / "run", tmp_path / "cache", *extra))


def _device0_bytes(tree) -> int:
    """Bytes of a tree of arrays held on the first device (its shards)."""
    dev = jax.devices()[0]
    return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards if s.device == dev)


@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 8, 1), (2, 2, 2)])
def test_train_step_inputs_are_the_real_state_and_batch(tmp_path, shape):
    cfg = _cfg(tmp_path)
    mesh = make_mesh(MeshConfig(*shape), jax.devices()[: int(np.prod(shape))])
    _, programs = plan(cfg, mesh, num_datasets=3)
    tc = cfg.train
    _, params = init_params(model_spec(cfg), mesh, 0)
    tx = make_optimizer(tc.learning_rate, tc.steps, tc.warmup_steps, tc.weight_decay, tc.grad_clip)
    state_bytes = _device0_bytes(init_train_state(params, tx, mesh))
    rows = tc.batch_size // (shape[0] * shape[1])  # batch rows on one device
    # ids, targets, mask [rows, T] x 4 bytes, group ids [rows]; the step's inputs hold nothing else
    batch_bytes = rows * cfg.data.seq_len * 4 * 3 + rows * 4
    step = next(p for p in programs if p.name == "train step")
    assert step.arguments == state_bytes + batch_bytes


def test_norm_step_is_planned_for_a_train_sourced_global_reward(tmp_path):
    cfg = _cfg(tmp_path, "mixing.global_source=train")
    names = [p.name for p in plan(cfg, make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1]), num_datasets=3)[1]]
    assert names == ["train step", "train step + example grad norms", "scoring / evaluation forward"]


def test_per_example_probes_hold_more_scratch_than_the_batch_gradient(tmp_path):
    mesh = make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    scratch = {}
    for reward in ("gradnorm", "gradnorm_per_example"):
        progs = plan(_cfg(tmp_path, f"mixing.global_reward={reward}"), mesh, num_datasets=3)[1]
        scratch[reward] = next(p.scratch for p in progs if p.name.startswith("global probes"))
    # chunk=4 per-example gradients are live at once against one batch gradient
    assert scratch["gradnorm_per_example"] > 2 * scratch["gradnorm"]


def test_verdict_against_the_device_limit():
    cfg = load_config(overrides=["model.hidden_size=32", "model.num_layers=1", "model.num_heads=2",
                                 "model.num_kv_heads=1", "model.intermediate_size=64", "data.vocab_size=64"])
    mesh = make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    progs = [ProgramMemory("train step", 3 << 30, 3 << 30, 3 << 30, 2 << 30)]  # peak 5 GiB
    assert "does NOT fit" in format_plan(model_spec(cfg), progs, mesh, 4 << 30)
    assert ": fits" in format_plan(model_spec(cfg), progs, mesh, 6 << 30)


def test_cli_prints_every_program_of_the_run(tmp_path, capsys):
    assert main(tiny_overrides(tmp_path / "run", tmp_path / "cache", "mesh.data=-1")) == 0
    out = capsys.readouterr().out
    assert "train step" in out and "global probes (gradnorm)" in out and "evaluation forward" in out
    assert "over 8 cpu" in out.lower()
    assert not list((tmp_path / "cache").glob("prepared*"))  # nothing was tokenized


def test_the_embedded_mixture_is_counted_without_building_it(tmp_path):
    from hbo_jax.data import embedded
    from hbo_jax.memory import count_subsets

    cfg = load_config(overrides=[f"data.cache_dir={tmp_path / 'cache'}"])
    assert count_subsets(cfg) == len(embedded.RECIPE)
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("init", ["hf:{p}/qwen2", "gguf:{p}/qwen2_gguf/model.gguf"])
def test_pretrained_spec_is_the_one_the_loader_builds(init):
    from pathlib import Path

    from hbo_jax.models.pretrained import load_pretrained

    init = init.format(p=Path(__file__).parent / "fixtures" / "parity")
    cfg = load_config(overrides=[f"model.init={init}", "model.vocab_multiple=64", "model.loss_chunk=16",
                                 "model.remat=true", "model.dtype=bfloat16"])
    _, _, loaded = load_pretrained(init, make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1]), cfg.model)
    assert model_spec(cfg) == loaded
