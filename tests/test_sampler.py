import numpy as np

from hbo_jax.data.sampler import HierarchicalSampler, ProbabilitySchedule, batch_iterator
from hbo_jax.data.store import TokenStore

# 3 datasets x 2 buckets with uneven leaf sizes (one leaf tiny, so it wraps many epochs).
LEAVES = [[np.arange(0, 50), np.arange(50, 53)], [np.arange(0, 20), np.arange(20, 40)],
          [np.arange(0, 7), np.arange(7, 100)]]
P_GLOBAL = np.array([0.5, 0.3, 0.2])
P_LOCAL = np.array([[0.9, 0.1], [0.5, 0.5], [0.25, 0.75]])


def _sampler(batch=64, seed=0):
    return HierarchicalSampler(LEAVES, batch, seed, ProbabilitySchedule(P_GLOBAL, P_LOCAL))


def test_group_frequencies_match_probabilities_chi_square():
    s = _sampler()
    counts = np.zeros(6)
    for _ in range(200):
        counts += np.bincount(s.next_plan()["group_id"], minlength=6)
    expected = (P_GLOBAL[:, None] * P_LOCAL).ravel() * counts.sum()
    chi2 = ((counts - expected) ** 2 / expected).sum()
    # 5 degrees of freedom: the 99.9% quantile is 20.5.
    assert chi2 < 20.5, (chi2, counts, expected)


def test_leaf_walk_is_without_replacement_within_an_epoch():
    s = _sampler()
    seen: dict[int, list[int]] = {g: [] for g in range(6)}
    for _ in range(40):
        plan = s.next_plan()
        for g, i in zip(plan["group_id"], plan["index"]):
            seen[int(g)].append(int(i))
    for g, idx in seen.items():
        leaf = LEAVES[g // 2][g % 2]
        n = len(leaf)
        for e in range(len(idx) // n):  # every complete epoch is a permutation of the leaf
            assert sorted(idx[e * n:(e + 1) * n]) == leaf.tolist()


def test_batch_is_pure_function_of_seed_and_step():
    a, b = _sampler(seed=3), _sampler(seed=3)
    for _ in range(5):
        a.next_plan()
    b.step = 5
    np.testing.assert_array_equal(a.draw_groups(5)[0], b.draw_groups(5)[0])


def test_schedule_change_takes_effect_at_recorded_step():
    s = _sampler()
    s.schedule.set(3, np.array([0.0, 0.0, 1.0]), P_LOCAL)
    plans = [s.next_plan() for _ in range(5)]
    assert set(plans[2]["dataset"]) != {2}
    assert set(plans[3]["dataset"]) == {2} and set(plans[4]["dataset"]) == {2}


def test_state_restore_continues_the_same_stream():
    a = _sampler()
    for _ in range(7):
        a.next_plan()
    a.schedule.set(7, np.array([0.2, 0.2, 0.6]), P_LOCAL[::-1])
    state = a.get_state()
    expected = [a.next_plan() for _ in range(10)]
    b = _sampler()
    b.set_state(state)
    for want in expected:
        got = b.next_plan()
        np.testing.assert_array_equal(got["group_id"], want["group_id"])
        np.testing.assert_array_equal(got["index"], want["index"])


def test_batches_carry_group_ids_and_masks(tmp_path):
    stores = []
    for d, row in enumerate(LEAVES):
        n = max(int(l.max()) for l in row) + 1
        exs = [(np.full(5, d * 1000 + i, np.int32), np.array([0, 0, 1, 1, 1], np.uint8)) for i in range(n)]
        stores.append(TokenStore.write(tmp_path / str(d), exs))
    s = _sampler(batch=8)
    batch = next(batch_iterator(s, stores, 8, 0, slice(0, 8)))
    plan = _sampler(batch=8).next_plan()
    np.testing.assert_array_equal(batch["group_id"], plan["group_id"])
    np.testing.assert_array_equal(batch["input_ids"][:, 0], plan["dataset"] * 1000 + plan["index"])
    assert batch["loss_mask"].sum() == 8 * 3


def test_two_hosts_slices_make_the_global_batch(tmp_path):
    """Each simulated host computes the same plan and loads only its rows; together they are the batch."""
    stores = []
    for d, row in enumerate(LEAVES):
        n = max(int(l.max()) for l in row) + 1
        exs = [(np.arange(d * 1000 + i, d * 1000 + i + 4, dtype=np.int32), np.array([0, 1, 1, 1], np.uint8))
               for i in range(n)]
        stores.append(TokenStore.write(tmp_path / str(d), exs))
    one = batch_iterator(_sampler(batch=8), stores, 6, 0, slice(0, 8))
    hosts = [batch_iterator(_sampler(batch=8), stores, 6, 0, slice(0, 4)),
             batch_iterator(_sampler(batch=8), stores, 6, 0, slice(4, 8))]
    for _ in range(5):
        whole, parts = next(one), [next(h) for h in hosts]
        for key in whole:
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key])
