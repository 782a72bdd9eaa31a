"""User-facing errors: the CLI prints them as one line and exits with code 2."""

import errno


class DynaformerError(Exception):
    """A problem with the user's input (config, data, run folder, checkpoint), not a bug."""


class ConfigError(DynaformerError):
    """An unknown, mistyped or out-of-range configuration field."""


class CheckpointError(DynaformerError):
    """A checkpoint that is missing, truncated, corrupt or not written by dynaformer."""


class Interrupted(Exception):
    """Training stopped by SIGINT/SIGTERM after saving a checkpoint; the CLI exits with 130."""


def is_disk_full(e: BaseException) -> bool:
    """ENOSPC or a quota, as an OSError or as the text of a library's own I/O error (safetensors)."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return "No space left on device" in str(e) or "os error 28" in str(e)
