"""ScaleBiO's step: the closed-form lambda gradient, per-source statistics over the mesh,
and a synthetic mixture whose validation-matching source gains weight."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hbo_jax.config import MeshConfig, ModelConfig, ScaleBiOConfig
from hbo_jax.mixing.scalebio import ScaleBiOLisa
from hbo_jax.mixing.scalebio_step import (init_lambda, lambda_grad, make_optimizers, make_scalebio_step,
                                          reference_schedule, source_means)
from hbo_jax.models.llama import LlamaSpec, init_params
from hbo_jax.parallel import global_batch_from_host, make_mesh, replicated
from hbo_jax.step import init_train_state, state_shardings

SPEC = LlamaSpec.from_config(ModelConfig(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                                         intermediate_size=64), vocab_size=64)


def test_closed_form_lambda_gradient_equals_autodiff_through_the_weighted_loss():
    rng = np.random.default_rng(0)
    s, b, alpha = 5, 24, 100.0
    source = jnp.asarray(rng.integers(0, s - 1, b))  # the last source is absent from the batch
    loss_w, loss_u = (jnp.asarray(rng.random(b) * 3, jnp.float32) for _ in range(2))
    counts = jax.ops.segment_sum(jnp.ones(b), source, num_segments=s)
    lam = jnp.asarray(rng.normal(size=s), jnp.float32)

    def penalty(lam):  # alpha * (L2(w) - L2(u)), L2 = sum_j p_{s_j} / c_{s_j} * loss_j (the reference's form)
        p = jax.nn.softmax(lam)
        weights = p[source] / counts[source]
        return alpha * (jnp.sum(weights * loss_w) - jnp.sum(weights * loss_u))

    m_w, _ = source_means(loss_w, source, s)
    m_u, _ = source_means(loss_u, source, s)
    closed = lambda_grad(jax.nn.softmax(lam), m_w, m_u, alpha)
    np.testing.assert_allclose(closed, jax.grad(penalty)(lam), rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(closed).max()) > 1.0  # not vacuous


def test_schedule_is_the_reference_cosine_with_warmup():
    lr = reference_schedule(1e-2, steps=100, warmup_ratio=0.03)  # int(100 * 0.03) = 3 warm-up steps
    got = [float(lr(t)) for t in (0, 1, 3, 50, 100)]
    want = [0.0, 1e-2 / 3, 1e-2, 1e-2 * 0.5 * (1 + np.cos(np.pi * 47 / 97)), 0.0]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-12)


D, K, B, T = 3, 2, 16, 12
SC = ScaleBiOConfig(alpha=1.0, lr_u=3e-3, lr_w=3e-3, lr_lambda=0.1, warmup_ratio=0.0)
STEPS = 15


@functools.cache
def _runner(shape: tuple, uniform: bool):
    """(mesh, jitted step, fresh-states factory) for a mesh shape; the compiled step is shared by the tests."""
    mesh = make_mesh(MeshConfig(*shape), jax.devices()[: int(np.prod(shape))])
    graphdef, params = init_params(SPEC, mesh, seed=0)
    host, shardings = jax.device_get(params), jax.tree.map(lambda x: x.sharding, params)
    txs = make_optimizers(SC, STEPS)

    def fresh():
        w = init_train_state(jax.device_put(host, shardings), txs.w, mesh)
        u = init_train_state(jax.device_put(host, shardings), txs.u, mesh)
        return u, w, init_lambda(D, txs.lam, mesh)

    u, w, lam = fresh()
    state_sh = (state_shardings(u), state_shardings(w), jax.tree.map(lambda _: replicated(mesh), lam))
    return mesh, make_scalebio_step(graphdef, txs, mesh, D, K, SC, STEPS, state_sh, uniform), fresh


def _random_batches(seed=0):
    rng = np.random.default_rng(seed)
    mask = (rng.random((B, T)) < 0.7).astype(np.float32)
    mask[:, 0] = 1.0
    batch = {"input_ids": rng.integers(0, 64, (B, T)).astype(np.int32),
             "targets": rng.integers(0, 64, (B, T)).astype(np.int32), "loss_mask": mask,
             "group_id": rng.integers(0, (D - 1) * K, B).astype(np.int32)}  # dataset 2 absent
    val = {k: np.roll(batch[k], 3, axis=1) for k in ("input_ids", "targets", "loss_mask")}
    return batch, val


def _two_steps(shape):
    mesh, step, fresh = _runner(shape, True)
    u, w, lam = fresh()
    batch, val = (global_batch_from_host(b, mesh) for b in _random_batches())
    u, w, lam, metrics = step(u, w, lam, batch, val)
    # A second step: lambda and the sources' losses at (u_1, w_1) differ from the first's.
    u, w, lam, metrics2 = step(u, w, lam, batch, val)
    return jax.device_get((metrics, metrics2, lam.logits))


def test_per_source_statistics_equal_on_one_device_and_a_2x2x2_mesh():
    (m1, n1, lam1), (m8, n8, lam8) = _two_steps((1, 1, 1)), _two_steps((2, 2, 2))
    for key in ("L1", "L2_w", "L2_u", "gap", "loss", "group_example_nll", "group_examples", "group_tokens"):
        np.testing.assert_allclose(m8[key], m1[key], rtol=2e-5, atol=1e-6, err_msg=key)
        np.testing.assert_allclose(n8[key], n1[key], rtol=2e-5, atol=1e-6, err_msg=key)
    assert abs(float(n1["gap"])) > 0  # u and w differ after one step: the second step's statistics are not trivial
    np.testing.assert_allclose(lam8, lam1, rtol=1e-4, atol=1e-7)


def _source_rows(rng, sources):
    """Rows whose tokens come from source s's own range [20 s, 20 s + 20): distinct distributions."""
    ids = np.stack([rng.integers(20 * s, 20 * s + 20, T + 1) for s in sources]).astype(np.int32)
    return {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": np.ones((len(ids), T), np.float32),
            "group_id": np.asarray(sources, np.int32) * K}


@pytest.mark.parametrize("uniform", [True, False])
def test_the_source_that_matches_the_validation_set_gains_the_most_weight(uniform):
    """Validation rows come from source 0's distribution: w, pulled towards it, ends up better
    than u on source 0 and worse on the others, so p_0 rises above every other weight."""
    mesh, step, fresh = _runner((1, 1, 1), uniform)
    u, w, lam = fresh()
    rng = np.random.default_rng(0)
    for _ in range(STEPS):
        batch = _source_rows(rng, [0, 1, 2, 1, 2] * 3 + [0])  # source 0 is no more frequent than the others
        val = {k: v for k, v in _source_rows(rng, [0] * B).items() if k != "group_id"}
        u, w, lam, _ = step(u, w, lam, global_batch_from_host(batch, mesh), global_batch_from_host(val, mesh))
    p = np.asarray(jax.nn.softmax(jax.device_get(lam.logits)))
    assert p[0] > p[1:].max() + 0.05, p


def test_no_scalebio_program_holds_more_than_one_pass_of_activations():
    """At a shape whose activations (the logits) dwarf the parameters, every ScaleBiO program's
    temporaries stay within a plain train step's on the same batch: u's pass, w's train pass
    and w's validation pass run one at a time (in one program they were live together)."""
    from hbo_jax.memory import ProgramMemory
    from hbo_jax.models.llama import abstract_model
    from hbo_jax.parallel import batch_sharding, tree_shardings
    from hbo_jax.step import abstract_train_state, make_optimizer, make_train_step

    spec = dataclasses.replace(SPEC, vocab_size=4096)
    mesh = make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    graphdef, abstract = abstract_model(spec)
    params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract,
                          tree_shardings(abstract, mesh))
    rows = batch_sharding(mesh)
    batch = {k: jax.ShapeDtypeStruct((16, 128), jnp.int32, sharding=rows) for k in ("input_ids", "targets")}
    batch.update(loss_mask=jax.ShapeDtypeStruct((16, 128), jnp.float32, sharding=rows),
                 group_id=jax.ShapeDtypeStruct((16,), jnp.int32, sharding=batch_sharding(mesh, 1)))
    val = {k: batch[k] for k in ("input_ids", "targets", "loss_mask")}
    tx = make_optimizer(1e-3, STEPS, 0, 0.0, 1.0)
    state = abstract_train_state(params, tx, mesh)
    plain = ProgramMemory.of("plain", make_train_step(graphdef, tx, mesh, D * K, state_shardings(state))
                             .lower(state, batch).compile())
    txs = make_optimizers(SC, STEPS)
    u, w = (abstract_train_state(params, t, mesh) for t in (txs.u, txs.w))
    lam = jax.eval_shape(lambda: init_lambda(D, txs.lam, mesh))
    lam = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated(mesh)), lam)
    step = make_scalebio_step(graphdef, txs, mesh, D, K, SC, STEPS,
                              (state_shardings(u), state_shardings(w), jax.tree.map(lambda _: replicated(mesh), lam)),
                              True)
    scratch = {name: ProgramMemory.of(name, c, held).scratch for name, c, held in step.compile(u, w, lam, batch, val)}
    assert plain.scratch > 8 * 2 ** 20, plain  # the logits, 16 x 128 x 4096 fp32 and their gradient, dominate
    assert max(scratch.values()) <= 1.1 * plain.scratch, (scratch, plain)


# ----------------------------------------------------------------------------- LISA

LISA_SC = dataclasses.replace(SC, lisa_layers=1)


@pytest.mark.parametrize("shared", [False, True])
def test_u_and_w_draw_their_blocks_independently_unless_shared(shared):
    sc = dataclasses.replace(LISA_SC, lisa_layers=2, lisa_interval=3, lisa_shared_choice=shared)
    mesh = make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    draws = ScaleBiOLisa(sc, 6, 0, mesh, {"u": None, "w": None}, {}).schedules
    same = [np.array_equal(draws["u"].active(s), draws["w"].active(s)) for s in range(0, 60, 3)]
    assert all(same) if shared else not all(same)
