"""`hbo_jax.cli.use_compile_cache`: where the entry points keep compiled programs."""

import jax
import pytest

from hbo_jax.cli import use_compile_cache
from hbo_jax.config import load_config


@pytest.fixture
def no_user_cache(monkeypatch):
    """The tests' own cache (conftest) out of the way; JAX's setting restored after."""
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    keys = ("jax_compilation_cache_dir", "jax_compilation_cache_max_size", "jax_persistent_cache_min_compile_time_secs")
    old = {k: getattr(jax.config, k) for k in keys}
    jax.config.update("jax_compilation_cache_dir", None)
    yield
    for k, v in old.items():
        jax.config.update(k, v)


def test_programs_are_kept_under_the_cache_root(no_user_cache, tmp_path):
    cfg = load_config(None, [f"data.cache_dir={tmp_path}"])
    assert use_compile_cache(cfg) == tmp_path / "xla"
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "xla")


def test_the_users_cache_folder_wins(no_user_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "mine"))
    assert use_compile_cache(load_config(None, [f"data.cache_dir={tmp_path}"])) is None
    assert jax.config.jax_compilation_cache_dir is None


def test_compile_cache_false_keeps_none(no_user_cache, tmp_path):
    assert use_compile_cache(load_config(None, [f"data.cache_dir={tmp_path}", "train.compile_cache=false"])) is None
    assert jax.config.jax_compilation_cache_dir is None


def test_the_folder_is_bounded_by_compile_cache_gb(no_user_cache, tmp_path):
    use_compile_cache(load_config(None, [f"data.cache_dir={tmp_path}", "train.compile_cache_gb=0.5"]))
    assert jax.config.jax_compilation_cache_max_size == 500_000_000


def test_compile_cache_gb_zero_is_no_limit(no_user_cache, tmp_path):
    use_compile_cache(load_config(None, [f"data.cache_dir={tmp_path}", "train.compile_cache_gb=0"]))
    assert jax.config.jax_compilation_cache_max_size == -1  # JAX's 0 would turn the cache off


def test_a_folder_kept_without_bound_is_bounded_later(no_user_cache, tmp_path):
    """Programs cached with no limit (an earlier version, or compile_cache_gb=0), then a bound with room
    for about one: the next program is kept and the older one evicted (through JAX's cache)."""
    import jax.numpy as jnp
    import numpy as np
    from jax._src import compilation_cache

    def cache_with(gb):
        jax.config.update("jax_compilation_cache_dir", None)
        use_compile_cache(load_config(None, [f"data.cache_dir={tmp_path}", f"train.compile_cache_gb={gb}"]),
                          min_compile_seconds=0)
        compilation_cache.reset_cache()

    def entries():
        return {p.name: p.stat().st_size for p in (tmp_path / "xla").glob("*-cache")}

    try:
        cache_with(0)
        jax.jit(lambda x: jnp.sin(x) * 2).lower(np.ones(7, np.float32)).compile()
        first = entries()
        assert len(first) == 1
        cache_with(sum(first.values()) * 1.5 / 1e9)
        jax.jit(lambda x: jnp.cos(x) + 3).lower(np.ones(9, np.float32)).compile()
        left = entries()
    finally:
        compilation_cache.reset_cache()
    assert len(left) == 1 and left.keys() != first.keys()
