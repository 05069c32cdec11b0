"""What the command-line entry points share: logging set-up and the errors that are the user's."""

from __future__ import annotations

import logging

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


def setup_logging() -> None:
    """INFO lines with a timestamp; the libraries' chatter at WARNING."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        force=True)  # absl installs a root handler first
    for noisy in ("absl", "orbax", "jax._src"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
