"""Stopping a training loop cleanly on SIGINT/SIGTERM.

Inside `StopOnSignal`, the first signal only records itself: the loop finishes the step it is in, saves a
checkpoint and raises `Interrupted` (exit code 130 from the command line). A second signal while stopping
raises KeyboardInterrupt at once. The previous handlers come back on exit (docs/design.md §6).
"""

from __future__ import annotations

import signal
import threading
from types import FrameType


class StopOnSignal:
    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def describe(self) -> str:
        """The signal's name, for the message of the stop (another rank's signal has none here)."""
        return signal.Signals(self.signum).name if self.signum else "a signal on another rank"

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            self._previous = {s: signal.signal(s, self._handler) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous = {}
