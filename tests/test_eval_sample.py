"""The eval cap draws a fixed stratified random sample per subset, not the first rows of the file."""

import numpy as np

from hbo_jax.evaluate import eval_sample, merge_task_result


def test_the_sample_is_fixed_per_subset_and_differs_between_subsets():
    strata = np.zeros(200, np.int32)
    a = eval_sample(strata, 64, "tr_vi")
    assert np.array_equal(a, eval_sample(strata, 64, "tr_vi"))
    assert not np.array_equal(a, eval_sample(strata, 64, "other"))
    assert len(a) == 64 and len(set(a.tolist())) == 64 and np.all(np.diff(a) > 0)


def test_a_file_sorted_in_blocks_is_sampled_across_them():
    # 162 Turkish rows, then 38 Vietnamese: the first 64 rows would all be Turkish.
    rows = eval_sample(np.zeros(200, np.int32), 64, "tr_vi")
    assert 5 <= int((rows >= 162).sum()) <= 21  # about 64 * 38/200 = 12 Vietnamese rows


def test_each_stratum_keeps_its_share_within_one_row():
    strata = np.repeat([0, 1, 2, 3], [100, 60, 30, 10])
    for cap in (4, 16, 64, 150):
        counts = np.bincount(strata[eval_sample(strata, cap, "s")], minlength=4)
        assert np.all(np.abs(counts - cap * np.array([100, 60, 30, 10]) / 200) <= 1), (cap, counts)


def test_a_smaller_cap_takes_rows_of_the_larger_one():
    strata = np.repeat([0, 1], [70, 30])
    assert set(eval_sample(strata, 16, "s").tolist()) <= set(eval_sample(strata, 64, "s").tolist())


def test_under_the_cap_every_row_is_used():
    assert eval_sample(np.zeros(5, np.int32), 64, "s").tolist() == [0, 1, 2, 3, 4]


def test_a_task_metric_never_overwrites_the_loss_count():
    entry = {"loss": 2.0, "examples": 64, "eval_rows": 200}
    merge_task_result(entry, {"metric": "mc", "examples": 0, "unavailable": "no options"})
    assert entry["examples"] == 64 and entry["task_examples"] == 0 and entry["unavailable"] == "no options"


def test_the_starting_models_evaluation_is_shared_by_seeds_and_strategies(tmp_path):
    from types import SimpleNamespace

    from hbo_jax.config import MeshConfig, load_config
    from hbo_jax.evaluate import starting_evaluation
    from hbo_jax.parallel import make_mesh

    mesh, data = make_mesh(MeshConfig()), SimpleNamespace(root=tmp_path)
    calls = []

    def run(*overrides):
        return starting_evaluation(load_config(None, list(overrides)), data, mesh,
                                   lambda: calls.append(1) or {"a": {"loss": 1.5 + len(calls)}})

    first, found = run("train.data_seed=0")
    assert found is None and first == {"a": {"loss": 2.5}}
    again, found = run("train.data_seed=1", "mixing.strategy=uniform")
    assert again == first and found is not None and len(calls) == 1
    assert run("data.max_eval_per_subset=8")[1] is None and len(calls) == 2  # other settings evaluate afresh
