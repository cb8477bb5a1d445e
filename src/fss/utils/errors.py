"""User-facing errors: one line that says what was wrong and what is accepted."""


class ConfigError(ValueError):
    """A configuration value is invalid; the message says what is accepted."""
