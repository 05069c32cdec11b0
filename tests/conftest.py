"""Test setup: 8 fake CPU devices (set before JAX is imported) and shared tiny configs."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ["JAX_PLATFORMS"] = "cpu"
# One persistent compilation cache per test session (set before JAX is imported, so the
# xdist workers and every subprocess a test starts inherit it): the suite's many tiny runs
# compile the same programs again and again, and a cache hit loads the executable XLA built
# the first time, so only the first compile of each program is paid. A size limit turns on
# JAX's file lock, so concurrent readers never see a half-written entry.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="hbo_jax_test_xla_")
    os.environ["HBO_JAX_TEST_XLA_CACHE_OWNER"] = str(os.getpid())  # removed at the end of the session
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"
    os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"] = str(4 << 30)

import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

FIXTURE = Path(__file__).parent / "fixtures" / "mixture"


def tiny_overrides(run_dir: Path, cache: Path, *extra: str) -> list[str]:
    """Dotted overrides for a run on the committed fixture that takes seconds."""
    return [
        f"run_dir={run_dir}", f"data.source_dir={FIXTURE}", f"data.cache_dir={cache}",
        "data.vocab_size=384", "data.seq_len=32", "data.num_buckets=2", "data.max_eval_per_subset=4",
        "model.hidden_size=32", "model.num_layers=1", "model.num_heads=2", "model.num_kv_heads=1",
        "model.intermediate_size=64", "scorer.warmup_steps=2", "scorer.batch_size=8",
        "scorer.score_batch_size=16", "train.batch_size=8", "train.steps=2", "train.log_every=1",
        "train.warmup_steps=1", "mixing.global_every=1", "mixing.local_every=1",
        "mixing.global_probes_per_bucket=1", "mixing.local_probes_per_group=2", "mixing.inner_steps=5",
        *extra,
    ]


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory) -> Path:
    """One cache for the session, so the fixture mixture is prepared once."""
    return tmp_path_factory.mktemp("cache")


def pytest_unconfigure(config):
    """The process that made the session's compilation cache removes it."""
    if os.environ.get("HBO_JAX_TEST_XLA_CACHE_OWNER") == str(os.getpid()):
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
