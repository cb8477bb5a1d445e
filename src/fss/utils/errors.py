"""User-facing errors: one line that says what was wrong and what is accepted."""


class ConfigError(ValueError):
    """A configuration value is invalid; the message says what is accepted."""


class DataError(ConfigError):
    """Data on disk is missing, incomplete or corrupt; the message names the file or folder
    and the command that fixes it. A ConfigError, so the CLI prints it as one line."""


class RegressionError(RuntimeError):
    """A run's score is outside the tolerance its configuration expects."""


class InputError(ValueError):
    """A tensor passed to a model's public entry point (``forward``, ``predict``, ...) has
    the wrong layout, dtype or values; the one-sentence message names the argument, what
    was found, what is expected and how to fix it (``docs/errors.md``, "Model API")."""
