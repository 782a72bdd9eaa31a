"""What the `dynaformer bench` modules share: model presets and interleaved timing (defined in
presets.py and timing.py, where the study uses them too)."""

from __future__ import annotations

from ..presets import preset
from ..timing import sync, time_interleaved

__all__ = ["preset", "sync", "time_interleaved"]
