"""The jitted step on 8 fake devices against single-device and plain-NumPy references."""

import jax
import numpy as np
import pytest

from hbo_jax.config import MeshConfig, ModelConfig
from hbo_jax.models.llama import LlamaSpec, init_params
from hbo_jax.parallel import global_batch_from_host, make_mesh
from hbo_jax.step import init_train_state, make_optimizer, make_train_step, state_shardings, token_nll

SPEC = LlamaSpec.from_config(ModelConfig(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                         intermediate_size=64), vocab_size=64)
D, K, B, T = 3, 2, 16, 12


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    mask = (rng.random((B, T)) < 0.6).astype(np.float32)
    mask[:, 0] = 1.0  # every example has loss tokens
    return {"input_ids": rng.integers(0, 64, (B, T)).astype(np.int32),
            "targets": rng.integers(0, 64, (B, T)).astype(np.int32), "loss_mask": mask,
            "group_id": rng.integers(0, D * K, B).astype(np.int32)}


def _run_step(mesh_cfg: MeshConfig, batch):
    mesh = make_mesh(mesh_cfg, jax.devices()[: abs(mesh_cfg.data * mesh_cfg.fsdp * mesh_cfg.tensor)])
    graphdef, params = init_params(SPEC, mesh, seed=0)
    tx = make_optimizer(1e-3, 10, 1, 0.0, 1.0)
    host_params = jax.device_get(params)  # the step donates the state's buffers
    state = init_train_state(params, tx, mesh)
    step = make_train_step(graphdef, tx, mesh, D * K, state_shardings(state))
    _, metrics = step(state, global_batch_from_host(batch, mesh))
    return jax.device_get(metrics), graphdef, host_params


@pytest.fixture(scope="module")
def single():
    return _run_step(MeshConfig(1, 1, 1), _batch())


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 2, 2), (1, 2, 4)])
def test_sharded_group_stats_equal_single_device(single, shape):
    sharded, _, _ = _run_step(MeshConfig(*shape), _batch())
    for key in ("loss", "grad_norm", "group_example_nll", "group_token_nll", "group_tokens", "group_examples"):
        np.testing.assert_allclose(sharded[key], single[0][key], rtol=2e-5, atol=1e-5, err_msg=key)


def test_group_stats_equal_plain_numpy(single):
    metrics, graphdef, params = single
    batch = _batch()
    nll = np.asarray(token_nll(graphdef, params, batch["input_ids"], batch["targets"]))
    m = batch["loss_mask"]
    ex = (nll * m).sum(1) / m.sum(1)
    want_ex = np.zeros(D * K)
    want_n = np.zeros(D * K)
    for g, e in zip(batch["group_id"], ex):
        want_ex[g] += e
        want_n[g] += 1
    np.testing.assert_allclose(metrics["group_example_nll"], want_ex, rtol=1e-5)
    np.testing.assert_array_equal(metrics["group_examples"], want_n)
    np.testing.assert_allclose(metrics["loss"], (nll * m).sum() / m.sum(), rtol=1e-5)


def test_sharded_forward_equals_single_device():
    tokens = np.random.default_rng(1).integers(0, 64, (8, T)).astype(np.int32)
    outs = []
    for shape in [(1, 1, 1), (2, 2, 2)]:
        mc = MeshConfig(*shape)
        mesh = make_mesh(mc, jax.devices()[: shape[0] * shape[1] * shape[2]])
        graphdef, params = init_params(SPEC, mesh, seed=0)
        outs.append(np.asarray(jax.jit(lambda p, t: token_nll(graphdef, p, t, t))(params, tokens)))
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-5, atol=1e-5)


def test_group_ppl_ratio_is_one_against_own_nll():
    """With ref_nll = the model's own per-example NLL, every example's ratio is exactly ~1."""
    mesh = make_mesh(MeshConfig(2, 2, 2))
    graphdef, params = init_params(SPEC, mesh, seed=0)
    batch = _batch()
    nll = np.asarray(token_nll(graphdef, jax.device_get(params), batch["input_ids"], batch["targets"]))
    m = batch["loss_mask"]
    batch["ref_nll"] = ((nll * m).sum(1) / m.sum(1)).astype(np.float32)
    tx = make_optimizer(1e-3, 10, 1, 0.0, 1.0)
    state = init_train_state(params, tx, mesh)
    step = make_train_step(graphdef, tx, mesh, D * K, state_shardings(state), ref_nll=True)
    _, metrics = step(state, global_batch_from_host(batch, mesh))
    np.testing.assert_allclose(metrics["group_ppl_ratio"], metrics["group_examples"], rtol=1e-5)


@pytest.mark.parametrize("norm_scale", [0.5, 3.0])  # below and above the clip
def test_clip_equals_optax_clip(norm_scale):
    import optax

    from hbo_jax.step import clip_by_global_norm

    rng = np.random.default_rng(1)
    tree = {"a": rng.normal(size=(5, 3)), "b": rng.normal(size=7)}
    norm = np.sqrt(sum((x**2).sum() for x in tree.values()))
    tree = jax.tree.map(lambda x: (x * norm_scale / norm).astype(np.float32), tree)
    ours, _ = clip_by_global_norm(1.0).update(tree, optax.EmptyState())
    want, _ = optax.clip_by_global_norm(1.0).update(tree, optax.EmptyState())
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6), ours, want)


def test_clip_zero_means_no_clipping():
    import optax

    grads = {"w": np.full(4, 100.0, np.float32)}
    params = {"w": np.zeros(4, np.float32)}
    ours = make_optimizer(1e-3, 10, 0, 0.0, 0.0)
    plain = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 1e-3, 1, 10, 1e-4), b1=0.9, b2=0.95, weight_decay=0.0)
    _, ours_state = ours.update(grads, ours.init(params), params)
    _, plain_state = plain.update(grads, plain.init(params), params)
    # Adam's update is nearly scale-free, so compare its first moment, which is not
    np.testing.assert_allclose(optax.tree.get(ours_state, "mu")["w"], optax.tree.get(plain_state, "mu")["w"])


def _step_scratch(loss_chunk: int, seq: int) -> tuple[int, int]:
    """(XLA scratch bytes of the compiled train step on one device, fp32 parameter bytes)."""
    import dataclasses

    import jax.numpy as jnp

    from hbo_jax.models.llama import abstract_model
    from hbo_jax.parallel import replicated
    from hbo_jax.step import TrainState

    spec = LlamaSpec.from_config(ModelConfig(hidden_size=256, num_layers=2, num_heads=4, num_kv_heads=2,
                                             intermediate_size=1024), vocab_size=4096)
    mesh = make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    graphdef, abstract = abstract_model(dataclasses.replace(spec, loss_chunk=loss_chunk))
    params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), abstract)
    tx = make_optimizer(1e-3, 10, 1, 0.0, 1.0)
    state = TrainState(jax.ShapeDtypeStruct((), jnp.int32), params, jax.eval_shape(tx.init, params))
    batch = {k: jax.ShapeDtypeStruct((8, seq), jnp.int32) for k in ("input_ids", "targets")}
    batch.update(loss_mask=jax.ShapeDtypeStruct((8, seq), jnp.float32), group_id=jax.ShapeDtypeStruct((8,), jnp.int32))
    step = make_train_step(graphdef, tx, mesh, 1, jax.tree.map(lambda _: replicated(mesh), state))
    memory = step.lower(state, batch).compile().memory_analysis()
    return memory.temp_size_in_bytes, sum(x.size * 4 for x in jax.tree.leaves(params))


def test_step_scratch_memory_is_one_gradient_copy():
    """The clip fuses into the update: the step's scratch is ~one fp32 gradient, not two (one device)."""
    scratch, param_bytes = _step_scratch(0, 8)
    assert scratch < 1.5 * param_bytes, scratch / param_bytes


def test_chunked_loss_never_holds_the_whole_logits():
    seq = 256
    logits_bytes = 8 * seq * 4096 * 4
    whole, _ = _step_scratch(0, seq)
    chunked, _ = _step_scratch(32, seq)
    assert whole - chunked > logits_bytes, (whole, chunked, logits_bytes)


# --- non-finite gradients: the update is skipped and counted ------------------------------

def _nan_step_setup():
    mesh = make_mesh(MeshConfig(2, 2, 2))
    graphdef, params = init_params(SPEC, mesh, seed=0)
    tx = make_optimizer(1e-3, 10, 1, 0.1, 1.0)
    state = init_train_state(params, tx, mesh)
    step = make_train_step(graphdef, tx, mesh, D * K, state_shardings(state))
    poisoned = _batch(1)
    poisoned["loss_mask"][3, 0] = np.nan  # one NaN token weight: NaN loss and gradients
    return mesh, state, step, poisoned


def test_every_optimizer_state_leaf_is_sharded_over_the_mesh():
    from jax.sharding import NamedSharding

    _, state, _, _ = _nan_step_setup()
    assert all(isinstance(x.sharding, NamedSharding) for x in jax.tree.leaves(state))


def test_a_non_finite_step_leaves_parameters_and_adam_state_untouched_and_is_counted():
    import optax

    mesh, state, step, poisoned = _nan_step_setup()
    state, _ = step(state, global_batch_from_host(_batch(0), mesh))
    before = jax.device_get((state.params, state.opt_state.inner_state))
    state, metrics = step(state, global_batch_from_host(poisoned, mesh))
    after = jax.device_get((state.params, state.opt_state.inner_state))
    jax.tree.map(np.testing.assert_array_equal, after, before)
    assert np.isnan(metrics["loss"]) and int(metrics["nonfinite"]) == 1 and int(metrics["nonfinite_streak"]) == 1
    assert isinstance(state.opt_state, optax.ApplyIfFiniteState) and int(state.opt_state.total_notfinite) == 1


def test_a_finite_step_after_a_skipped_one_ends_the_streak():
    mesh, state, step, poisoned = _nan_step_setup()
    for batch in (poisoned, poisoned, _batch(2)):
        state, metrics = step(state, global_batch_from_host(batch, mesh))
    assert (int(metrics["nonfinite"]), int(metrics["nonfinite_streak"])) == (0, 0)
    assert int(state.opt_state.total_notfinite) == 2 and int(state.step) == 3


@pytest.mark.parametrize("bad", [False, True])
def test_the_fused_skip_matches_optax_apply_if_finite(bad):
    """step.apply_update (used by the train step) against optax.apply_if_finite's own update."""
    import optax

    from hbo_jax.step import apply_update

    rng = np.random.default_rng(3)
    params = {"a": rng.normal(size=(5, 3)).astype(np.float32), "b": rng.normal(size=7).astype(np.float32)}
    grads = jax.tree.map(lambda x: (x * 3).astype(np.float32), params)
    tx = make_optimizer(1e-2, 10, 1, 0.1, 1.0)
    state = tx.update(grads, tx.init(params), params)[1]  # past the first step: non-zero moments
    if bad:
        grads["b"][2] = np.inf
    updates, want_state = tx.update(grads, state, params)
    want = optax.apply_updates(params, updates)
    got, got_state = jax.jit(apply_update, static_argnums=0)(tx, grads, state, params)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7), (got, got_state),
                 (want, want_state))
