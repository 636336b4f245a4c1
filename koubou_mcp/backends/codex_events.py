"""Following ``codex exec --json``: its JSONL event stream on stdout, for liveness.

Codex prints one JSON object per line: ``thread.started``, ``turn.started``, ``item.started`` /
``item.updated`` / ``item.completed`` (an item is an ``agent_message``, ``reasoning``,
``command_execution``, ``file_change``, ``mcp_tool_call``, ``web_search``, ``todo_list`` or
``error``; agent messages carry ``text``), then ``turn.completed`` (with ``usage``:
``input_tokens``, ``cached_input_tokens``, ``output_tokens``) or ``turn.failed`` (``error``:
``{"message"}``); a top-level ``error`` event has a ``message``. The final answer still comes
from the ``-o`` file; this only says how far the run got. Lines that are not JSON objects
(an older Codex, noise) are ignored. No I/O: lines in, reports out.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from koubou_mcp.backends.base import (
    MAX_PROGRESS_MESSAGE_CHARS,
    MAX_RESULT_CHARS,
    PROGRESS_INTERVAL_S,
    GenerationProgress,
    ProgressCallback,
)

#: A stdout line longer than this is not an event worth parsing (it is dropped, not kept).
MAX_EVENT_LINE_BYTES = 4 * MAX_RESULT_CHARS


class CodexEvents:
    """What the event stream has said so far, reported to ``on_progress`` as it changes."""

    def __init__(
        self, on_progress: ProgressCallback | None, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.on_progress = on_progress
        self.clock = clock
        self.started = clock()
        self.steps = 0
        self.tokens = 0
        self.first_token_s: float | None = None
        self.done = False
        self.message: str | None = None  # the latest agent message (bounded)
        self.error: str | None = None  # from turn.failed or an error event
        self.seen = 0  # events parsed: stdout is an event stream, not a printed answer
        self._buffer = bytearray()
        self._overlong = False
        self._last_report: float | None = None

    def feed_bytes(self, data: bytes) -> None:
        """Take a piece of stdout; complete lines are parsed, an overlong one is skipped."""
        while data:
            newline = data.find(b"\n")
            part, data = (data, b"") if newline < 0 else (data[: newline + 1], data[newline + 1 :])
            if not self._overlong:
                self._buffer += part
                if len(self._buffer) > MAX_EVENT_LINE_BYTES:
                    self._buffer.clear()
                    self._overlong = True
            if newline >= 0:
                if not self._overlong:
                    self.feed_line(bytes(self._buffer))
                self._buffer.clear()
                self._overlong = False

    def feed_line(self, line: bytes) -> None:
        try:
            event = json.loads(line)
        except ValueError:
            return
        if isinstance(event, dict) and isinstance(event.get("type"), str):
            self.seen += 1
            self._handle(event["type"], event)

    def _handle(self, kind: str, event: dict[str, Any]) -> None:
        changed = milestone = False  # a milestone is reported at once, other news throttled
        if kind.startswith("item."):
            if self.first_token_s is None:
                self.first_token_s = self.clock() - self.started
                changed = milestone = True
            item = event.get("item")
            if isinstance(item, dict):
                text = item.get("text")
                if item.get("type") == "agent_message" and isinstance(text, str):
                    self.message = text[:MAX_RESULT_CHARS]
                    changed = True
                if kind == "item.completed":
                    self.steps += 1
                    changed = milestone = True
        elif kind == "turn.completed":
            usage = event.get("usage")
            output_tokens = usage.get("output_tokens") if isinstance(usage, dict) else None
            if isinstance(output_tokens, int) and not isinstance(output_tokens, bool):
                self.tokens = output_tokens
            self.done = changed = milestone = True
        elif kind in ("turn.failed", "error"):
            error = event.get("error")
            message = error.get("message") if isinstance(error, dict) else event.get("message")
            if isinstance(message, str):
                self.error = message
        if changed:
            self.report(force=milestone)

    def progress(self) -> GenerationProgress:
        message = self.message
        return GenerationProgress(
            text=message or "",
            tokens=self.tokens,
            first_token_s=self.first_token_s,
            elapsed_s=self.clock() - self.started,
            done=self.done,
            steps=self.steps,
            last_message=None if message is None else message[:MAX_PROGRESS_MESSAGE_CHARS],
        )

    def report(self, *, force: bool = False) -> None:
        """Tell ``on_progress`` how far the run got (throttled unless ``force``)."""
        if self.on_progress is None:
            return
        now = self.clock()
        if not force and self._last_report is not None and now - self._last_report < PROGRESS_INTERVAL_S:
            return
        self._last_report = now
        self.on_progress(self.progress())
