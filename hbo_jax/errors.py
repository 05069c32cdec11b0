"""The errors that are the user's: bad input (config, data, weights) or a run that cannot go on.

The command-line entry points print them as `error: ...` with exit status 2 and no
traceback (`hbo_jax.cli.USER_ERRORS`). Standard library only: `hbo_jax.data.fetch` raises
`FetchError` in bare virtual environments (scripts/check_fetch_pips.sh).
"""


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message names the key."""


class RunLocked(ConfigError):
    """Another run holds the run directory; the message names it."""


class DataError(ValueError):
    """Bad input data; the message names the file and line."""


class FetchError(DataError):
    """An archive could not be found, downloaded or verified; the message says where it looked."""


class CheckpointMismatch(ValueError):
    """A weights file does not fit the model; the message names the tensor."""


class NonFiniteError(RuntimeError):
    """Too many consecutive updates had a non-finite loss or gradients; the run stopped."""
