"""`hbo_jax.cli.use_compile_cache`: where the entry points keep compiled programs."""

import jax
import pytest

from hbo_jax.cli import use_compile_cache
from hbo_jax.config import load_config


@pytest.fixture
def no_user_cache(monkeypatch):
    """The tests' own cache (conftest) out of the way; JAX's setting restored after."""
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    old = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", None)
    yield
    jax.config.update("jax_compilation_cache_dir", old)


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
