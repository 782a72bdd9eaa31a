"""How far back a span reaches: the one formula every kernel, the KV cache bound and the benchmarks share."""

from __future__ import annotations

import torch


def keys_reached(z: torch.Tensor, ramp: float, hard: bool) -> torch.Tensor:
    """Keys a query with span z weights with m > 0 on one side, counting the query itself: ⌊z⌋ + 1 for a hard
    window (m(d) = [d ≤ z]), ⌈z + R⌉ for the soft ramp (m(d) > 0 ⇔ d < z + R). Computed in z's dtype."""
    return (z.floor() + 1) if hard else torch.ceil(z + ramp)
