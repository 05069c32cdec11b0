"""LISA layer sampling (hbo_jax.lisa): only the active blocks train, only they hold optimizer
state, the draws need no state, and resume across a switch is exact.

One tiny 6-layer model with stacked blocks on the (2,2,2) mesh; the runner fixture's
compiled step is shared by the tests that step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hbo_jax import lisa
from hbo_jax.config import MeshConfig, ModelConfig
from hbo_jax.models.llama import LlamaSpec, init_params
from hbo_jax.parallel import global_batch_from_host, make_mesh
from hbo_jax.step import masked_mean_loss, token_nll

L, GAMMA, B, T, V = 6, 2, 8, 12, 64
SPEC = LlamaSpec.from_config(ModelConfig(hidden_size=32, num_layers=L, num_heads=4, num_kv_heads=2,
                                         intermediate_size=64, tie_embeddings=False, scan_layers=True),
                             vocab_size=V)
SCHEDULE = lisa.LisaSchedule(L, GAMMA, interval=2, seed=3)


def _batch(seed: int):
    rng = np.random.default_rng(seed)
    return {"input_ids": rng.integers(0, V, (B, T)).astype(np.int32),
            "targets": rng.integers(0, V, (B, T)).astype(np.int32),
            "loss_mask": (rng.random((B, T)) < 0.8).astype(np.float32),
            "group_id": rng.integers(0, 3, B).astype(np.int32)}


@pytest.fixture(scope="module")
def mesh():
    return make_mesh(MeshConfig(2, 2, 2))


def _fresh(mesh):
    graphdef, params = init_params(SPEC, mesh, seed=0)
    tx = lisa.make_lisa_optimizer(1e-2, 20, 1, 0.1, 1.0, GAMMA)
    return graphdef, tx, lisa.init_lisa_state(params, tx, mesh, GAMMA)


def _runner(mesh, graphdef, tx, state, keep=False):
    return lisa.LisaRunner(graphdef, tx, mesh, 3, state, SCHEDULE, keep_moments=keep)


def _run(runner, state, steps, mesh, start=0):
    for done in range(start, start + steps):
        state, _ = runner.step(done, state, global_batch_from_host(_batch(done), mesh))
    return state


def _host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


def test_draws_are_distinct_deterministic_and_cover_every_layer():
    draws = [SCHEDULE.active(2 * k) for k in range(60)]
    assert all(len(set(d)) == GAMMA and d.dtype == np.int32 for d in draws)
    assert all(np.array_equal(SCHEDULE.active(2 * k + 1), d) for k, d in enumerate(draws))  # fixed within an interval
    np.testing.assert_array_equal(lisa.LisaSchedule(L, GAMMA, 2, seed=3).active(40), draws[20])
    counts = np.bincount(np.concatenate(draws), minlength=L)
    assert counts.min() >= 10, counts  # uniform: 20 expected per layer


def test_two_models_share_a_stream_or_draw_independently():
    u, w = lisa.LisaSchedule(L, GAMMA, 2, seed=3, stream=0), lisa.LisaSchedule(L, GAMMA, 2, seed=3, stream=1)
    shared = lisa.LisaSchedule(L, GAMMA, 2, seed=3, stream=0)
    assert all(np.array_equal(u.active(s), shared.active(s)) for s in range(0, 40, 2))
    assert any(not np.array_equal(u.active(s), w.active(s)) for s in range(0, 40, 2))


def test_lisa_refuses_unrolled_blocks(mesh):
    spec = LlamaSpec.from_config(ModelConfig(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                             intermediate_size=64), vocab_size=V)
    with pytest.raises(ValueError, match="model.scan_layers=true"):
        lisa.check_stacked(spec)


@pytest.fixture(scope="module")
def one_device():
    """(graphdef, params) on one device: gradients and the view without the mesh's compile cost."""
    return init_params(SPEC, make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1]), seed=1)


def test_view_gradients_equal_the_full_models_gradients(one_device):
    graphdef, params = one_device
    batch = _batch(0)
    active = jnp.asarray([4, 1], jnp.int32)  # not sorted: slot j is layer active[j]
    loss = lambda nll: masked_mean_loss(nll, batch["loss_mask"])  # noqa: E731

    @jax.jit
    def grads(params, active):
        full = jax.grad(lambda p: loss(token_nll(graphdef, p, batch["input_ids"], batch["targets"])))(params)
        part = jax.grad(lambda t: loss(lisa.lisa_token_nll(graphdef, params, t, active, batch["input_ids"],
                                                            batch["targets"])))(lisa.view(params, active))
        return part, lisa.view(full, active)  # the full gradient's entries at the view's parameters

    part, want = grads(params, active)
    # Two programs (the LISA body is checkpointed): equal up to float rounding.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), _host(part), _host(want))


def test_write_back_of_the_view_is_the_identity(one_device):
    _, params = one_device
    active = jnp.asarray([5, 0], jnp.int32)
    host = _host(params)
    back = jax.jit(lisa.write_back)(params, lisa.view(params, active), active)
    jax.tree.map(np.testing.assert_array_equal, _host(back), host)


@pytest.fixture(scope="module")
def stepped(mesh):
    """(host states before, after steps 0-1 and after step 2 (a switch), the device state after
    step 2, the runner): one compiled step for every test that steps."""
    graphdef, tx, state = _fresh(mesh)
    before = _host(state)
    runner = _runner(mesh, graphdef, tx, state)
    state = _run(runner, state, 2, mesh)
    mid = _host(state)
    state = _run(runner, state, 1, mesh, start=2)
    return before, mid, _host(state), state, runner


def test_only_the_active_blocks_and_the_outer_parameters_change(stepped):
    before, mid, _, _, _ = stepped
    moved = lambda a, b: np.abs(a - b).reshape(L, -1).max(axis=1) > 0  # noqa: E731
    for a, b in zip(jax.tree.leaves(mid.params["layers"]), jax.tree.leaves(before.params["layers"])):
        np.testing.assert_array_equal(np.flatnonzero(moved(a, b)), SCHEDULE.active(0))
    for key in ("embed", "norm", "lm_head"):
        assert all(np.any(a != b) for a, b in zip(jax.tree.leaves(mid.params[key]),
                                                  jax.tree.leaves(before.params[key]))), key


def test_optimizer_state_covers_the_view_only(stepped):
    _, _, after, _, _ = stepped
    params = after.params
    block_bytes = sum(x.nbytes for x in jax.tree.leaves(params["layers"])) // L
    outer_bytes = sum(x.nbytes for k in ("embed", "norm", "lm_head") for x in jax.tree.leaves(params[k]))
    floats = sum(x.nbytes for x in jax.tree.leaves(after.opt_state) if np.issubdtype(x.dtype, np.floating))
    assert floats == 2 * (GAMMA * block_bytes + outer_bytes)  # mu and nu: gamma blocks + embeddings, norm, head
    ints = sum(x.nbytes for x in jax.tree.leaves(after.opt_state) if not np.issubdtype(x.dtype, np.floating))
    assert ints < 64  # step counts (one per block slot) and the non-finite counters


def test_a_switch_resets_the_block_moments(stepped):
    _, mid, after, _, _ = stepped
    assert lisa.block_moments(mid.opt_state)["count"].tolist() == [2] * GAMMA
    assert lisa.block_moments(after.opt_state)["count"].tolist() == [1] * GAMMA  # restarted at the switch


def test_resume_across_a_switch_is_exact(stepped, mesh):
    """The state after steps 0-1, through host arrays (as a checkpoint) back onto the mesh,
    then step 2 (a switch): equal to the uninterrupted run's. The runner keeps no state."""
    _, mid, after, device_after, runner = stepped
    restored = jax.tree.map(lambda h, t: jax.device_put(h, t.sharding), mid, device_after)
    resumed = _host(_run(runner, restored, 1, mesh, start=2))
    jax.tree.map(np.testing.assert_array_equal, resumed, after)


def test_kept_moments_come_back_when_a_layer_is_drawn_again(stepped):
    _, _, after, device_after, _ = stepped
    host = lisa.HostMoments(device_after.opt_state, L)
    active = SCHEDULE.active(2)
    others = np.setdiff1d(np.arange(L), active)[:GAMMA].astype(np.int32)
    away = host.swap(device_after.opt_state, active, others)
    assert _host(lisa.block_moments(away)["count"]).tolist() == [0] * GAMMA  # never drawn before: fresh
    back = host.swap(away, others, active[::-1])  # drawn again, in other slots
    got, want = _host(lisa.block_moments(back)), lisa.block_moments(after.opt_state)
    jax.tree.map(lambda g, w: np.testing.assert_array_equal(g, w[::-1]), got, want)


def test_the_compiled_step_needs_less_memory_than_full_fine_tuning():
    """XLA's buffer assignment (hbo_jax.memory) for one device: arguments (the optimizer state
    covers two of eight blocks), outputs and scratch (gradients of the view only)."""
    from hbo_jax.memory import ProgramMemory
    from hbo_jax.models.llama import abstract_model
    from hbo_jax.parallel import replicated, tree_shardings
    from hbo_jax.step import abstract_train_state, make_optimizer, make_train_step, state_shardings

    spec = LlamaSpec.from_config(ModelConfig(hidden_size=32, num_layers=8, num_heads=4, num_kv_heads=2,
                                             intermediate_size=128, scan_layers=True), vocab_size=128)
    mesh = make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    graphdef, abstract = abstract_model(spec)
    params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract,
                          tree_shardings(abstract, mesh))
    batch = {k: jax.ShapeDtypeStruct((4, 16), jnp.int32, sharding=replicated(mesh)) for k in ("input_ids", "targets")}
    batch.update(loss_mask=jax.ShapeDtypeStruct((4, 16), jnp.float32, sharding=replicated(mesh)),
                 group_id=jax.ShapeDtypeStruct((4,), jnp.int32, sharding=replicated(mesh)))
    tx = make_optimizer(1e-3, 10, 1, 0.0, 1.0)
    state = abstract_train_state(params, tx, mesh)
    full = ProgramMemory.of("full", make_train_step(graphdef, tx, mesh, 1, state_shardings(state))
                            .lower(state, batch).compile())
    part = ProgramMemory.of("lisa", lisa.compile_lisa_step(graphdef, params, lisa.make_lisa_optimizer(
        1e-3, 10, 1, 0.0, 1.0, 2), mesh, 2, batch))
    block_bytes = sum(x.size * 4 for x in jax.tree.leaves(params["layers"])) // 8
    assert part.arguments < full.arguments - 2 * 5 * block_bytes, (part, full)  # moments of 6 blocks fewer
    assert part.peak < full.peak - 2 * 6 * block_bytes, (part, full)
