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


# A 4-step run with two stacked blocks (model.scan_layers), checkpoints at steps 2 and 4.
SCANNED_RUN = ("model.scan_layers=true", "model.num_layers=2", "train.steps=4", "train.checkpoint_every=2",
               "mixing.global_every=3", "mixing.local_every=3", "mixing.local_source=train", "eval.every=0",
               "eval.tasks=false", "tracking.tensorboard=false")


@pytest.fixture(scope="session")
def scanned_run(tmp_path_factory, shared_cache) -> Path:
    """The run directory of SCANNED_RUN (shared by the resume and checkpoint-reader tests)."""
    from hbo_jax.train import main

    run = tmp_path_factory.mktemp("scanned") / "run"
    assert main(tiny_overrides(run, shared_cache, *SCANNED_RUN)) == 0
    return run


@pytest.fixture(scope="session")
def bf16_run(tmp_path_factory, shared_cache) -> Path:
    """A finished tiny run with an untied head, a vocabulary padded to 100s and bf16 weights
    (shared by the tensor I/O and merging tests)."""
    from hbo_jax.train import main as train_main

    out = tmp_path_factory.mktemp("tensorrun") / "run"
    assert train_main(tiny_overrides(out, shared_cache, "train.steps=1", "eval.every=0", "eval.tasks=false",
                                     "tracking.tensorboard=false", "model.tie_embeddings=false",
                                     "model.vocab_multiple=100", "model.param_dtype=bfloat16")) == 0
    return out


@pytest.fixture(scope="session")
def bf16_export(bf16_run, tmp_path_factory) -> Path:
    """`python -m hbo_jax.export` of `bf16_run`."""
    from hbo_jax.export import main as export_main

    out = tmp_path_factory.mktemp("tensorexport") / "hf"
    assert export_main([str(bf16_run), str(out)]) == 0
    return out


def pytest_unconfigure(config):
    """The process that made the session's compilation cache removes it."""
    if os.environ.get("HBO_JAX_TEST_XLA_CACHE_OWNER") == str(os.getpid()):
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
