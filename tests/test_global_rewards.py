"""Global reward variants and local ratio variants against straightforward computations."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hbo_jax.config import MeshConfig
from hbo_jax.mixing import actors, global_rewards, rewards
from hbo_jax.models.llama import LlamaSpec, init_params
from hbo_jax.parallel import make_mesh
from hbo_jax.step import masked_mean_loss, token_nll

D, P, T, V = 2, 4, 12, 40  # datasets, probe rows per dataset, tokens, vocab


@pytest.fixture(scope="module")
def setup():
    mesh = make_mesh(MeshConfig())
    spec = LlamaSpec(vocab_size=V, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8,
                     intermediate_size=32, rope_theta=1e4, rms_norm_eps=1e-5, tie_embeddings=True,
                     qkv_bias=False, dtype="float32", param_dtype="float32", remat=False)
    graphdef, params = init_params(spec, mesh, seed=3)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, V, (D * P, T)).astype(np.int32)
    tg = np.roll(ids, -1, 1)
    mask = (rng.random((D * P, T)) < 0.7).astype(np.float32)
    mask[P - 1] = 0.0  # a padding row (empty loss mask) in dataset 0
    host_params = jax.device_get(params)
    return mesh, graphdef, params, host_params, (ids, tg, mask)


def _dev(batch, mesh):
    return rewards.to_device(dict(zip(("input_ids", "targets", "loss_mask"), batch)), mesh)


@functools.partial(jax.jit, static_argnums=0)  # eager, op by op, it dominated this file's time
def _grad(graphdef, params, ids, tg, m):
    return jax.grad(lambda p: masked_mean_loss(token_nll(graphdef, p, ids, tg), m))(params)


def _flat(tree):
    return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


def test_gradnorm_is_the_probe_batch_gradient_norm(setup):
    mesh, graphdef, params, host, (ids, tg, m) = setup
    got = np.asarray(global_rewards.make_gradnorm_fn(graphdef, mesh, D)(params, *_dev((ids, tg, m), mesh)))
    want = [np.linalg.norm(_flat(_grad(graphdef, host, ids[s], tg[s], m[s])))
            for s in (slice(0, P), slice(P, 2 * P))]
    np.testing.assert_allclose(got, want, rtol=1e-4)


def test_per_example_gradnorm_is_the_mean_of_example_norms_without_padding_rows(setup):
    mesh, graphdef, params, host, (ids, tg, m) = setup
    got = np.asarray(global_rewards.make_per_example_gradnorm_fn(graphdef, mesh, D)(params, *_dev((ids, tg, m), mesh)))
    norms = [np.linalg.norm(_flat(_grad(graphdef, host, ids[r:r + 1], tg[r:r + 1], m[r:r + 1])))
             for r in range(D * P)]
    want = [np.mean(norms[: P - 1]), np.mean(norms[P:])]  # row P-1 has no loss tokens
    np.testing.assert_allclose(got, want, rtol=1e-4)


def test_cossim_is_the_mean_cosine_of_mean_hidden_states(setup):
    mesh, graphdef, params, host, (ids, tg, m) = setup
    got = np.asarray(global_rewards.make_cossim_fn(graphdef, mesh, D)(params, *_dev((ids, tg, m), mesh)))
    h = np.asarray(nnx.merge(graphdef, host).hidden(jnp.asarray(ids)), np.float64)
    means = [(h[s] * m[s][..., None]).sum((0, 1)) / m[s].sum() for s in (slice(0, P), slice(P, 2 * P))]
    cos = means[0] @ means[1] / (np.linalg.norm(means[0]) * np.linalg.norm(means[1]))
    np.testing.assert_allclose(got, [cos, cos], rtol=1e-4)


def test_cosine_to_others_excludes_self():
    h = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    c = 1 / np.sqrt(2)
    np.testing.assert_allclose(global_rewards.cosine_to_others(h), [c / 2, c / 2, c], rtol=1e-6)


def test_dev_cosine_is_the_gradient_cosine_to_the_dev_set(setup):
    mesh, graphdef, params, host, (ids, tg, m) = setup
    dev = (ids[:8][::-1].copy(), tg[:8][::-1].copy(), np.ones_like(m[:8]))
    fn = global_rewards.make_dev_cosine_fn(graphdef, mesh, D)
    got = np.asarray(fn(params, *_dev((ids, tg, m), mesh), *_dev(dev, mesh)))
    g_dev = _flat(_grad(graphdef, host, *dev))
    want = []
    for s in (slice(0, P), slice(P, 2 * P)):
        g = _flat(_grad(graphdef, host, ids[s], tg[s], m[s]))
        want.append(g @ g_dev / (np.linalg.norm(g) * np.linalg.norm(g_dev)))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_local_ratio_variants_match_their_formulas():
    now, ref = np.array([[[2.0, 1.0]]]), np.array([[[1.0, 2.0]]])
    np.testing.assert_allclose(rewards.local_ratio("loss_ratio", now, ref), [[(2.0 + 0.5) / 2]])
    np.testing.assert_allclose(rewards.local_ratio("ppl_ratio", now, ref), [[(np.e + np.exp(-1)) / 2]])
    ifd = rewards.probe_statistic("ifd_ratio", np.array([2.0, 3.0]), np.array([4.0, 1.0]))
    np.testing.assert_allclose(ifd, [0.5, 3.0])


def test_kl_to_prior_alone_pulls_the_policy_to_the_prior():
    prior = np.log(np.array([0.7, 0.2, 0.1], np.float32))
    w = jnp.zeros(3)
    st = actors.actor_optimizer(0.05).init(w)
    w, _, ok = actors.reinforce(w, st, jnp.zeros(3), 0.05, 2000, kl=1.0, prior_logp=jnp.asarray(prior))
    assert bool(ok)
    np.testing.assert_allclose(jax.nn.softmax(w), np.exp(prior), atol=2e-3)


def test_kl_to_prior_keeps_the_policy_closer_to_the_prior():
    prior = jnp.log(jnp.full(3, 1 / 3))
    r = jnp.array([1.0, 0.2, 0.2])
    st = actors.actor_optimizer(0.05).init(jnp.zeros(3))
    free = jax.nn.softmax(actors.reinforce(jnp.zeros(3), st, r, 0.05, 500)[0])
    held = jax.nn.softmax(actors.reinforce(jnp.zeros(3), st, r, 0.05, 500, kl=2.0, prior_logp=prior)[0])
    assert 1 / 3 < float(held[0]) < float(free[0])


@pytest.mark.parametrize("extra", [
    ("mixing.strategy=multidds",),
    ("mixing.global_reward=cossim", "mixing.local_reward=ifd_ratio", "mixing.kl_to_prior=0.5"),
    ("mixing.global_reward=gradnorm_per_example", "mixing.local_reward=loss_ratio", "mixing.probe_budget=0.5"),
])
def test_reward_variants_run_end_to_end(tmp_path, shared_cache, extra):
    import json

    from conftest import tiny_overrides
    from hbo_jax.train import main

    run_dir = tmp_path / "run"
    assert main(tiny_overrides(run_dir, shared_cache, "eval.tasks=false", *extra)) == 0
    rows = [json.loads(l) for l in (run_dir / "mixing.jsonl").read_text().splitlines()]
    assert rows and all(np.all(np.isfinite(r["reward_global"])) for r in rows)
    assert all(abs(sum(r["p_global"]) - 1) < 1e-5 for r in rows)
    if "mixing.strategy=multidds" not in extra:
        assert all(np.all(np.asarray(r["reward_local"]) > 0) for r in rows)


def test_a_global_reward_for_a_strategy_without_a_global_actor_is_refused():
    from hbo_jax.config import ConfigError, load_config
    from hbo_jax.mixing.strategy import resolve

    with pytest.raises(ConfigError, match="mixing.global_reward"):
        resolve(load_config(None, ["mixing.strategy=hbo_local", "mixing.global_reward=cossim"]).mixing)


def test_local_reward_variants_need_probes():
    from hbo_jax.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="mixing.local_reward"):
        load_config(None, ["mixing.local_source=train", "mixing.local_reward=ifd_ratio"])


def test_probe_budget_cuts_probe_counts_until_the_estimate_fits():
    from hbo_jax.config import MixingConfig
    from hbo_jax.mixing.strategies import probe_cost_share, probe_counts

    cfg = MixingConfig(global_probes_per_bucket=8, local_probes_per_group=16, probe_budget=0.05)
    g, loc, share = probe_counts(cfg, 8, 4, 64, True, True)
    assert share <= 0.05 and (g, loc) != (8, 16) and g >= 1 and loc >= 1
    assert share == pytest.approx(probe_cost_share(8 * 4 * g, 8 * 4 * loc, cfg, 64))
    # One more probe anywhere would break the budget (the cut stops as soon as it fits).
    assert probe_cost_share(8 * 4 * (g + 1), 8 * 4 * loc, cfg, 64) > 0.05 or \
        probe_cost_share(8 * 4 * g, 8 * 4 * (loc + 1), cfg, 64) > 0.05


def test_no_probe_budget_keeps_the_configured_counts():
    from hbo_jax.config import MixingConfig
    from hbo_jax.mixing.strategies import probe_counts

    cfg = MixingConfig(global_probes_per_bucket=8, local_probes_per_group=16)
    assert probe_counts(cfg, 8, 4, 64, True, True)[:2] == (8, 16)


def test_norm_steps_bill_their_excess_over_plain_steps_to_mixing(monkeypatch):
    """global_source=train, M=2, interval 6: steps 3-4 (plain) are timed against 5-6 (norms)."""
    from types import SimpleNamespace

    from hbo_jax.config import MixingConfig
    from hbo_jax.mixing import strategies

    clock = iter([10.0, 13.0, 17.5])  # before step 3, before step 5, after step 6
    monkeypatch.setattr(strategies.time, "perf_counter", lambda: next(clock))
    mixer = SimpleNamespace(train_gradnorm=True, cfg=MixingConfig(global_every=6, global_train_steps=2),
                            _clock={}, seconds=1.0)
    for done in range(1, 7):
        strategies.Mixer.time_norm_steps(mixer, done, jnp.zeros(()), after=False)
        if done in (5, 6):
            strategies.Mixer.time_norm_steps(mixer, done, jnp.zeros(()), after=True)
    assert mixer.seconds == pytest.approx(1.0 + (17.5 - 13.0) - (13.0 - 10.0))
    assert mixer._clock == {}
