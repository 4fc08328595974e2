"""User-facing errors: one line, naming the field or file at fault."""


class NeonError(Exception):
    """A problem the user can fix (bad config value, missing file, ...). The CLI prints it on one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class ConfigError(NeonError):
    """A config value failed validation; the message starts with the dotted field path."""
