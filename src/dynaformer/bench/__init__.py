"""Benchmarks behind `dynaformer bench NAME`. Each module defines `add_arguments(parser)` and
`run(args) -> Iterator[dict]` (one JSON-able record per measurement); register it in BENCHMARKS.

Benchmarks compare variants side by side in one process (the machines are noisy: read ratios)."""

from __future__ import annotations

from types import ModuleType

from . import attention, generate, residual, tasks, train

BENCHMARKS: dict[str, ModuleType] = {"train": train, "generate": generate, "attention": attention,
                                     "residual": residual, "tasks": tasks}
