"""HBO actor updates: direction, invariance and the fixed point p = R / sum R."""

import jax.numpy as jnp
import numpy as np

from hbo_jax.mixing import actors, rewards

PRIOR = np.array([0.4, 0.3, 0.2, 0.1])


def _state(k=3):
    return actors.init_mixer(PRIOR, k, num_local_probes=2, lr=0.05)


def test_prior_initialises_global_logits_exactly():
    pg, pl = actors.probabilities(_state())
    np.testing.assert_allclose(pg, PRIOR, rtol=1e-6)
    np.testing.assert_allclose(pl, np.full((4, 3), 1 / 3), rtol=1e-6)


def test_global_update_moves_toward_higher_reward():
    r = jnp.array([1.0, 1.0, 3.0, 1.0])
    state, _ = actors.update_global(_state(), r, lr=0.05, inner_steps=5, ema=0.0)
    pg, _ = actors.probabilities(state)
    assert pg[2] > PRIOR[2]


def test_local_update_moves_toward_higher_reward():
    r = np.ones((4, 3), np.float32)
    r[1, 0] = 2.0
    state = actors.update_local(_state(), jnp.asarray(r), lr=0.05, inner_steps=5)
    _, pl = actors.probabilities(state)
    assert pl[1, 0] > 1 / 3 and np.allclose(pl[0], 1 / 3, atol=1e-6)


def test_equal_local_rewards_leave_uniform_unchanged():
    state = actors.update_local(_state(), jnp.ones((4, 3)), lr=0.05, inner_steps=50)
    np.testing.assert_allclose(actors.probabilities(state)[1], 1 / 3, atol=1e-6)


def test_rewards_proportional_to_prior_leave_global_unchanged():
    # The code's update has fixed point p = R / sum R, so R proportional to p is a no-op up to
    # float rounding, which Adam's normalisation turns into steps of at most lr (50 x 0.05 = 2.5
    # in logit space): a real reward difference moves p by O(0.1) here.
    state, _ = actors.update_global(_state(), jnp.asarray(PRIOR * 7.0, jnp.float32), lr=0.05,
                                    inner_steps=50, ema=0.0)
    np.testing.assert_allclose(actors.probabilities(state)[0], PRIOR, atol=1e-3)


def test_update_converges_to_reward_share():
    r = np.array([1.0, 2.0, 3.0, 4.0], np.float32)
    state, _ = actors.update_global(_state(), jnp.asarray(r), lr=0.05, inner_steps=2000, ema=0.0)
    np.testing.assert_allclose(actors.probabilities(state)[0], r / r.sum(), atol=2e-3)


def test_non_finite_reward_is_skipped_and_counted():
    s0 = _state()
    state, _ = actors.update_global(s0, jnp.array([1.0, jnp.nan, 1.0, 1.0]), lr=0.05, inner_steps=5, ema=0.0)
    np.testing.assert_array_equal(np.asarray(state.global_logits), np.asarray(s0.global_logits))
    assert int(state.num_skipped) == 1 and int(state.num_updates[0]) == 0


def test_ema_smooths_rewards():
    r = jnp.array([3.0, 1.0, 1.0, 1.0])
    _, used = actors.update_global(_state(), r, lr=0.05, inner_steps=1, ema=0.25)
    # rbar starts at 1: 0.25 * r + 0.75 * 1
    np.testing.assert_allclose(np.asarray(used), [1.5, 1.0, 1.0, 1.0], rtol=1e-6)


def test_relative_reward_is_normalised_by_bucket_mean():
    rel = rewards.relative(np.array([[1.0, 3.0], [2.0, 2.0]]))
    np.testing.assert_allclose(rel, [[0.5, 1.5], [1.0, 1.0]])


def test_ppl_ratio_is_mean_of_exp_nll_difference():
    now, ref = np.log([[[2.0, 4.0]]]), np.log([[[1.0, 1.0]]])
    np.testing.assert_allclose(rewards.ppl_ratio(now, ref), [[3.0]])


def test_train_ppl_ratio_fills_unsampled_buckets_neutrally():
    ratio_sum = np.array([[2.0, 0.0, 6.0], [0.0, 0.0, 0.0]])
    count = np.array([[2, 0, 3], [0, 0, 0]])
    r = rewards.train_ppl_ratio(ratio_sum, count)
    np.testing.assert_allclose(r, [[1.0, 1.5, 2.0], [1.0, 1.0, 1.0]])


def test_flat_actor_starts_at_prior_over_buckets():
    pg, pl = actors.probabilities(actors.init_mixer(PRIOR, 3, 2, 0.05, flat=True), flat=True)
    np.testing.assert_allclose(pg, PRIOR, rtol=1e-6)
    np.testing.assert_allclose(pl, 1 / 3, rtol=1e-6)


def test_flat_actor_converges_to_joint_reward_share():
    r = np.arange(1.0, 13.0, dtype=np.float32).reshape(4, 3)
    state = actors.update_local(actors.init_mixer(PRIOR, 3, 2, 0.05, flat=True), jnp.asarray(r),
                                lr=0.05, inner_steps=2000, flat=True)
    pg, pl = actors.probabilities(state, flat=True)
    np.testing.assert_allclose(pg[:, None] * pl, r / r.sum(), atol=2e-3)


def test_floor_keeps_every_probability_above_it_and_sums_at_one():
    from hbo_jax.mixing.strategies import apply_floor

    p = apply_floor(np.array([[0.97, 0.01, 0.01, 0.01], [0.25, 0.25, 0.25, 0.25]]), 0.05)
    assert p.min() >= 0.05 - 1e-12
    np.testing.assert_allclose(p.sum(-1), 1.0)
    np.testing.assert_allclose(p[1], 0.25)  # uniform stays uniform
