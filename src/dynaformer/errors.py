"""User-facing errors: the CLI prints them as one line and exits with code 2."""


class DynaformerError(Exception):
    """A problem with the user's input (config, data, run folder, checkpoint), not a bug."""


class ConfigError(DynaformerError):
    """An unknown, mistyped or out-of-range configuration field."""


class CheckpointError(DynaformerError):
    """A checkpoint that is missing, truncated, corrupt or not written by dynaformer."""


class Interrupted(Exception):
    """Training stopped by SIGINT/SIGTERM after saving a checkpoint; the CLI exits with 130."""
