"""What this machine can give: available memory, used to refuse sizes before they are allocated."""

from __future__ import annotations

import os

from .errors import ConfigError, DynaformerError


def available_memory() -> int | None:
    """Bytes this machine can still give (MemAvailable), or None where that is unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits_in_memory(need: int, what: str) -> None:
    """Refuse, naming `what`, an allocation of `need` bytes above this machine's available memory."""
    avail = available_memory()
    if avail is not None and need > avail:
        raise DynaformerError(f"{what} needs about {need / 2**30:.1f} GiB; this machine has "
                              f"{avail / 2**30:.1f} GiB available")


def check_threads(threads: int, field: str) -> None:
    """At most 4 threads per core this machine has (more only oversubscribes; 10⁵ crashes torch)."""
    limit = 4 * (os.cpu_count() or 1)
    if threads > limit:
        raise ConfigError(f"{field}: {threads} threads is more than 4 per core on this machine (at most {limit})")
