"""What the command-line entry points share: logging set-up, the compilation cache and the
errors that are the user's."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from hbo_jax.errors import CheckpointMismatch, ConfigError, DataError, NonFiniteError

# Bad input (config, data, weights) or a run that diverged: printed as `error: ...` with
# exit status 2, no traceback.
USER_ERRORS = (ConfigError, DataError, CheckpointMismatch, NonFiniteError)


def add_config_arguments(parser) -> None:
    """`--config FILE` and `key=value` overrides, as every config-driven entry point takes them."""
    parser.add_argument("--config", action="append",
                        help="YAML file (configs/*.yaml); repeat to compose several, later files win key by key "
                             "(relative input paths in a file are read from its folder); defaults = the demo run")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=50 mixing.strategy=uniform")


def use_compile_cache(cfg=None, min_compile_seconds: float | None = None) -> Path | None:
    """Keeps compiled programs in `<cache root>/xla` (the cache root of `data.cache_dir`;
    `train.compile_cache=false`: off), so a rerun, a resume, another seed or an evaluation of
    the same shapes loads them instead of compiling. Above `train.compile_cache_gb` the least
    recently used programs are deleted (JAX's LRU cache; cfg None: the default's bound). A
    JAX_COMPILATION_CACHE_DIR of the user's wins (with JAX's own settings). Programs that compiled
    in under `min_compile_seconds` are not kept (default: JAX's 1 s, below which reading one back
    saves little). Returns the folder used, None when off or the user's. For an entry point's
    process (the setting is JAX's, global); before the first compile.
    """
    import jax

    from hbo_jax.config import TrainConfig, cache_root

    if (cfg is not None and not cfg.train.compile_cache) or os.environ.get("JAX_COMPILATION_CACHE_DIR") \
            or jax.config.jax_compilation_cache_dir:
        return None
    path = cache_root(cfg) / "xla"
    gb = (cfg.train if cfg is not None else TrainConfig()).compile_cache_gb
    if gb > 0:
        _date_unbounded_entries(path)
    # JAX: -1 = no limit (0 would turn caching off); its eviction runs at each write, under a file lock
    jax.config.update("jax_compilation_cache_max_size", int(gb * 1e9) if gb > 0 else -1)
    jax.config.update("jax_compilation_cache_dir", str(path))
    if min_compile_seconds is not None:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_seconds)
    return path


def _date_unbounded_entries(path: Path) -> None:
    """Gives each program JAX cached without a size bound (`<key>-cache` alone: an earlier hbo_jax, or
    compile_cache_gb=0) the last-access record JAX's bounded cache keeps beside it (`<key>-atime`, 8
    bytes little-endian nanoseconds; here the file's modification time). Without it JAX's eviction
    fails at every write, and no new program is kept (a warning each time)."""
    try:
        for entry in path.glob("*-cache"):
            atime = entry.with_name(entry.name.removesuffix("-cache") + "-atime")
            if not atime.exists():
                atime.write_bytes(entry.stat().st_mtime_ns.to_bytes(8, "little"))
    except OSError:  # a folder we cannot write: JAX says so when it writes
        pass


def setup_logging() -> None:
    """INFO lines with a timestamp; the libraries' chatter at WARNING."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        force=True)  # absl installs a root handler first
    for noisy in ("absl", "orbax", "jax._src"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
