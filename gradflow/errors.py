"""Error types that the CLI turns into a one-line message and exit status 2."""


class ConfigError(ValueError):
    """Bad user input: the message names the key and what is accepted.

    Example:
        >>> raise ConfigError("model.depth: expected a positive int, got 0")
        Traceback (most recent call last):
        ...
        gradflow.errors.ConfigError: model.depth: expected a positive int, got 0
    """
