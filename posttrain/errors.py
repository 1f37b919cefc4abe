"""Errors a user can act on. Each message names the file, line, config key or path at fault."""


class PosttrainError(Exception):
    """Base class: the CLI prints these as one line and exits non-zero, without a traceback."""


class ConfigError(PosttrainError):
    """A job file or override that does not validate (unknown key, wrong type, bad arithmetic)."""


class DataError(PosttrainError):
    """A sample that cannot be used: malformed JSON, missing field, bad conversation.

    `reason` is a short key (e.g. `malformed_json`) under which `on_error: skip` counts it.
    """

    def __init__(self, message: str, reason: str = "invalid_sample"):
        super().__init__(message)
        self.reason = reason


class ModelError(PosttrainError):
    """A model or tokenizer that cannot be loaded, or one that fails verification."""


class TrackerError(PosttrainError):
    """An experiment tracker that cannot start (package missing, tracking URI unreachable)."""
