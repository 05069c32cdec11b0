"""Test setup: 8 fake CPU devices (set before JAX is imported) and shared tiny configs."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ["JAX_PLATFORMS"] = "cpu"

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


# Two stacked blocks (model.scan_layers): the tests of scanned runs share these settings,
# so they share one data preparation (its key holds the model settings).
SCANNED = ("model.scan_layers=true", "model.num_layers=2")


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory) -> Path:
    """One cache for the session, so the fixture mixture is prepared once."""
    return tmp_path_factory.mktemp("cache")
