"""File helpers shared by the run folder's writers and readers.

`write_text_atomic` / `write_json_atomic` are the one way a small file of the run folder or the study is
replaced: the bytes go to a temporary name unique to this host and process, are fsynced, and `os.replace`
publishes them, so a reader (or a crash) sees the old file or the new one, never a part (docs/design.md §6).
`write_json_strict` is `write_json_atomic` for the study's records, whose numbers are read back.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def temporary_name(path: Path) -> Path:
    """`.NAME.tmp-HOST-PID` beside `path`: pids repeat across hosts that share a filesystem, so both count."""
    from .locks import hostname

    return path.with_name(f".{path.name}.tmp-{hostname()}-{os.getpid()}")


def write_text_atomic(path: Path, text: str) -> None:
    """Replace `path` by `text` (UTF-8): temporary file, fsync, rename."""
    path = Path(path)
    tmp = temporary_name(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a failed write (a full disk, a signal) leaves no temporary behind
        raise


def write_json_atomic(path: Path, obj: Any, **dumps: Any) -> None:
    """Replace `path` by `obj` as JSON (json.dumps keywords pass through; indent 2 unless given)."""
    dumps.setdefault("indent", 2)
    write_text_atomic(path, json.dumps(obj, **dumps))


def write_json_strict(path: Path, obj: Any) -> None:
    """`write_json_atomic` for records whose numbers are read back (the study's grid.json, cell.json, result.json,
    status.json, report.json): indent 1, a NaN or infinity refused (ValueError: clean it first), a numpy scalar
    written as its Python value."""
    write_json_atomic(path, obj, indent=1, allow_nan=False, default=_numpy_scalar)


def _numpy_scalar(o: Any) -> Any:
    import numpy as np  # only for objects json cannot write itself

    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(type(o))
