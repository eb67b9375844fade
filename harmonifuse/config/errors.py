"""The error every config check raises (its own module: loading and the rename table both raise it)."""


class ConfigError(ValueError):
    """A configuration value is unknown or invalid; the message names the dotted field."""
