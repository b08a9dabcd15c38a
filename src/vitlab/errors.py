"""Error types raised for user input. Both are ``ValueError`` subclasses, so plain ``except ValueError`` works."""


class CheckpointError(ValueError):
    """A checkpoint could not be read or does not fit the requested model; the message says why."""
