"""Timing side by side: the median time per call of several functions, called round-robin.

Used by `dynaformer bench`, by the study's cost measurement (study/cost.py) and by its wall-clock
calibration (study/calibrate.py). The machines are noisy, so read ratios of one call's numbers.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on CPU), so that a clock reading includes it."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 2,
                     device: torch.device | None = None,
                     clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Median seconds per call of each function, calls interleaved round-robin so that drifts in the
    machine's speed hit every variant alike. clock: wall time by default, or e.g. time.process_time."""
    device = device or torch.device("cpu")
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            t = clock()
            fn()
            sync(device)
            times[name].append(clock() - t)
    return {k: statistics.median(v) for k, v in times.items()}
