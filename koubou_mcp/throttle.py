"""Keeping one message, repeated in a burst, from filling the logs.

When accepting connections fails (out of file descriptors, say), the event loop reports it again
and again, each time with a traceback. ``RepeatFilter`` lets the first few of one message through
per window and drops the rest; the first one let through after a window with drops says how many
were not logged.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

#: Records of one message let through per window, and the window, s
BURST = 5
WINDOW_S = 60.0
#: Messages tracked at once (the oldest windows are forgotten first)
_MAX_KEYS = 1024


@dataclass
class _Window:
    start: float
    passed: int = 0
    dropped: int = 0


class RepeatFilter(logging.Filter):
    """Drop a record (WARNING and up) whose logger, level and message template already passed
    ``burst`` times in the current ``window_s``."""

    def __init__(self, burst: int = BURST, window_s: float = WINDOW_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.burst = burst
        self.window_s = window_s
        self.clock = clock
        self._windows: dict[tuple[str, int, str], _Window] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        verdict = record.__dict__.get("_koubou_repeat")
        if verdict is None:  # one verdict per record, however many handlers share this filter
            verdict = record.__dict__["_koubou_repeat"] = self._decide(record)
        return bool(verdict)

    def _decide(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno, str(record.msg))
        now = self.clock()
        window = self._windows.get(key)
        if window is None or now - window.start >= self.window_s:
            dropped = window.dropped if window is not None else 0
            if window is None and len(self._windows) >= _MAX_KEYS:
                del self._windows[next(iter(self._windows))]
            self._windows.pop(key, None)
            window = self._windows[key] = _Window(now)
            if dropped:
                record.msg = f"{record.msg} [{dropped} more like this in the last " \
                             f"{self.window_s:g} s were not logged]"
        if window.passed >= self.burst:
            window.dropped += 1
            return False
        window.passed += 1
        return True


__all__ = ["BURST", "WINDOW_S", "RepeatFilter"]
