"""Timing helpers shared by the benchmarks."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ..cli import load_yaml_config
from ..configtools import from_dict
from ..model import ModelConfig

CONFIG_DIR = Path(__file__).resolve().parents[3] / "configs"


def preset(name_or_path: str | None, default: str = "small") -> ModelConfig:
    """A ModelConfig from configs/NAME.yaml or a YAML path."""
    path = Path(name_or_path) if name_or_path else CONFIG_DIR / f"{default}.yaml"
    if not path.suffix:
        path = CONFIG_DIR / f"{path}.yaml"
    return from_dict(ModelConfig, load_yaml_config(str(path))["model"], "model")


def sync(device: torch.device) -> None:
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
