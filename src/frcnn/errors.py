"""User-facing errors: each one is printed by the CLI as a single line, never a traceback."""


class FrcnnError(Exception):
    """Base class of every error caused by the user's input (files, flags, config)."""


class DataError(FrcnnError):
    """A data folder, annotation or image is missing or malformed. The message names the file."""


class ConfigError(FrcnnError):
    """An unknown config key, a wrong type, or an unknown preset."""


class CheckpointError(FrcnnError):
    """A checkpoint folder is missing, incomplete, or not a frcnn checkpoint."""
