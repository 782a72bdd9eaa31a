"""Folder locks: one writer per run folder or grid cell. `FOLDER/.lock` holds the holder's host:pid; it is
created with O_EXCL (atomic), and a lock whose process is gone (same host) is stale and taken over. On a
shared filesystem, processes on other hosts see the lock as held (its pid means nothing there), which is
how `compare` on several nodes shares one grid. The host name is DYNAFORMER_HOST when set (nodes or
containers that report the same host name must set distinct ones), else the machine's."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from .errors import DynaformerError, is_disk_full


def hostname() -> str:
    return os.environ.get("DYNAFORMER_HOST") or socket.gethostname()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def try_lock(d: Path) -> bool:
    """Take d/.lock atomically; a lock left by a dead process on this host is taken over."""
    lock = d / ".lock"
    me = f"{hostname()}:{os.getpid()}"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                host, pid = lock.read_text().strip().rsplit(":", 1)
            except (OSError, ValueError):
                host, pid = "", "0"
            if host == hostname() and not _alive(int(pid or 0)):
                stale = d / f".lock.stale-{os.getpid()}"
                try:
                    os.replace(lock, stale)  # only one taker wins the rename
                    stale.unlink()
                except OSError:
                    return False
                continue
            return False
        try:
            with os.fdopen(fd, "w") as f:
                f.write(me)
        except OSError:
            lock.unlink(missing_ok=True)  # an empty lock (disk full) would look held by nobody, for ever
            raise
        return True
    return False


def unlock(d: Path) -> None:
    try:
        (d / ".lock").unlink()
    except FileNotFoundError:
        pass


def holder(d: Path) -> str:
    try:
        return (d / ".lock").read_text().strip() or "another process"
    except OSError:
        return "another process"


@contextlib.contextmanager
def exclusive(folder: Path, what: str = "folder") -> Iterator[None]:
    """Hold folder/.lock for the block, creating the folder if needed (and removing what this created if
    the block leaves it empty, so a refused command writes nothing). Held elsewhere: a DynaformerError
    naming the holder."""
    if folder.exists() and not folder.is_dir():
        raise DynaformerError(f"{what} '{folder}' exists and is not a folder")
    missing = []
    p = folder
    while not p.exists():
        missing.append(p)
        p = p.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DynaformerError(f"cannot create {what} '{folder}' ({_reason(e)})") from None
    try:
        locked = try_lock(folder)
    except OSError as e:
        raise DynaformerError(f"cannot write to {what} '{folder}' ({_reason(e)})") from None
    if not locked:
        raise DynaformerError(f"{what} '{folder}' is in use by {holder(folder)}; wait for it to finish or stop it")
    try:
        yield
    finally:
        unlock(folder)
        for d in missing:  # deepest first
            try:
                d.rmdir()  # only if empty
            except OSError:
                break


def _reason(e: OSError) -> str:
    return "the disk is full; nothing in it was changed" if is_disk_full(e) else str(e.strerror)
