"""Exceptions the runner raises on purpose.

RunnerError
 ├── ConfigError      invalid configuration or rule; raised before any load is sent
 ├── DataError        a dataset file or tokenizer that cannot be used
 └── EndpointError    the server is unreachable or fails every request

A failed request is never an exception: it becomes a record with ``success=False``.
The command line prints a ``RunnerError`` as one line and exits non-zero.
"""


class RunnerError(Exception):
    """Base of the errors that reach the user as one line."""


class ConfigError(RunnerError):
    """Invalid configuration value or SLA rule."""


class DataError(RunnerError):
    """Dataset file or tokenizer that cannot be used."""


class EndpointError(RunnerError):
    """Server that cannot be reached or that fails every request."""
