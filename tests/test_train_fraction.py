"""`data.train_fraction`: a fixed random sample of each subset's training rows (hbo_jax/data/prepare.py)."""

from hbo_jax.data.prepare import train_rows


def test_the_sample_keeps_the_fraction_in_the_original_order():
    kept = train_rows(1000, 0.25, "chat", 4)
    assert len(kept) == 250 and kept == sorted(kept)


def test_the_sample_depends_on_the_subset_name_only():
    assert train_rows(1000, 0.25, "chat", 4) == train_rows(1000, 0.25, "chat", 4)
    assert train_rows(1000, 0.25, "chat", 4) != train_rows(1000, 0.25, "finance", 4)


def test_a_small_subset_keeps_one_row_per_bucket():
    assert len(train_rows(10, 0.01, "tiny", 4)) == 4


def test_fraction_one_keeps_everything():
    assert train_rows(1000, 1.0, "chat", 4) == list(range(1000))


def test_prepared_data_keeps_the_fraction_and_counts_cuts_among_the_kept_rows(shared_cache, tmp_path):
    from conftest import tiny_overrides
    from hbo_jax.config import MeshConfig, load_config
    from hbo_jax.parallel import make_mesh
    from hbo_jax.scorer import prepare

    def manifest(*extra):
        cfg = load_config(None, tiny_overrides(tmp_path / "run", shared_cache, *extra))
        return {s["name"]: s for s in prepare(cfg, make_mesh(MeshConfig(-1, 1, 1))).manifest["subsets"]}

    whole, half = manifest(), manifest("data.train_fraction=0.5")
    for name, s in half.items():
        assert s["train"] == max(2, round(0.5 * whole[name]["train"]))
        assert s["truncated"]["train"] <= s["train"] and s["truncated"]["eval"] == whole[name]["truncated"]["eval"]
