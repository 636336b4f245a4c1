"""Assembling one streamed Ollama chat reply (NDJSON chunks) and reporting its progress.

Kept apart from the HTTP code so that the parsing rules (what is a token, what is malformed,
when progress is reported) read in one place. No I/O: lines in, text and reports out.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from koubou_mcp.backends.base import (
    MAX_RESULT_CHARS,
    PROGRESS_INTERVAL_S,
    GenerationProgress,
    PermanentBackendError,
    ProgressCallback,
    TransientBackendError,
    truncation_note,
)

_EXCERPT_CHARS = 300


def _excerpt(text: str, limit: int = _EXCERPT_CHARS) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "…"


def _positive_int(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return None


class ChatStream:
    """The text so far of one ``/api/chat`` stream, its counters, and its progress reports.

    ``feed`` each line; it returns True at the final chunk (``done``). Reports go to
    ``on_progress`` at the first token, then at most every ``PROGRESS_INTERVAL_S``, at the
    final chunk, and whenever ``report(force=True)`` is called (before the caller raises).
    """

    def __init__(
        self,
        url: str,
        on_progress: ProgressCallback | None,
        *,
        limit: int = MAX_RESULT_CHARS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self.on_progress = on_progress
        self.limit = limit
        self.clock = clock
        self.started = clock()
        self.tokens = 0
        self.first_token_s: float | None = None
        self.done = False
        self.eval_tokens_per_s: float | None = None
        self.load_s: float | None = None
        self._pieces: list[str] = []
        self._kept = 0  # characters in _pieces (at most limit)
        self._total = 0  # characters received
        self._last_report: float | None = None

    # -- input ----------------------------------------------------------------------------------

    def feed(self, line: bytes) -> bool:
        """Take one NDJSON line; True when it was the final chunk."""
        data = self._parse(line)
        error = data.get("error")
        if isinstance(error, str):
            raise TransientBackendError(
                f"Ollama at {self.url} failed while generating: {_excerpt(error)}",
                kind="server_error",
            )
        done = data.get("done") is True
        content, thinking = self._message_parts(data, done)
        first = False
        if content or thinking:  # a thinking model's reasoning counts as generation too
            self.tokens += 1
            if self.first_token_s is None:
                self.first_token_s = self.clock() - self.started
                first = True
        if content:
            self._add(content)
        if done:
            self._final_counts(data)
            self.done = True
            self.report(force=True)
            return True
        self.report(force=first)
        return False

    def finish(self) -> None:
        """The stream ended; an end without the final chunk is a truncated reply."""
        if not self.done:
            raise PermanentBackendError(
                f"Ollama at {self.url} sent a truncated reply: the stream ended after "
                f"{self.tokens} chunks without its final (done) chunk",
                kind="malformed",
            )

    def _malformed(self, reason: str) -> PermanentBackendError:
        return PermanentBackendError(
            f"Ollama at {self.url} sent a malformed reply: {reason}", kind="malformed"
        )

    def _parse(self, line: bytes) -> dict[str, Any]:
        try:
            data = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise self._malformed(f"not UTF-8 ({exc})") from exc
        except ValueError as exc:
            text = line.decode("utf-8", errors="replace")
            raise self._malformed(f"not valid JSON ({exc}): {_excerpt(text, 120)!r}") from exc
        if not isinstance(data, dict):
            raise self._malformed(f"expected a JSON object, got {type(data).__name__}")
        return data

    def _message_parts(self, data: dict[str, Any], done: bool) -> tuple[str, str]:
        """``message.content`` and ``message.thinking`` of a chunk (the final one may omit them)."""
        message = data.get("message")
        if not isinstance(message, dict):
            if done and message is None:
                return "", ""
            raise self._malformed("no 'message' object in the reply")
        content = message.get("content")
        if content is None and done:
            content = ""
        if not isinstance(content, str):
            raise self._malformed("no 'message.content' string in the reply")
        thinking = message.get("thinking")
        return content, thinking if isinstance(thinking, str) else ""

    def _add(self, content: str) -> None:
        self._total += len(content)
        room = self.limit - self._kept
        if room > 0:
            kept = content[:room]
            self._pieces.append(kept)
            self._kept += len(kept)

    def _final_counts(self, data: dict[str, Any]) -> None:
        eval_count = _positive_int(data.get("eval_count"))
        eval_ns = _positive_int(data.get("eval_duration"))
        load_ns = data.get("load_duration")
        if eval_count is not None:
            self.tokens = eval_count
            if eval_ns is not None:
                self.eval_tokens_per_s = eval_count / (eval_ns / 1e9)
        if isinstance(load_ns, int) and not isinstance(load_ns, bool) and load_ns >= 0:
            self.load_s = load_ns / 1e9

    # -- output ---------------------------------------------------------------------------------

    def text(self) -> str:
        """The text so far (at most ``limit`` characters)."""
        if len(self._pieces) > 1:
            self._pieces = ["".join(self._pieces)]  # join once, not on every report
        return self._pieces[0] if self._pieces else ""

    def result(self) -> str:
        """The whole answer, with a note when it had to be cut to ``limit``."""
        text = self.text()
        if self._total > self.limit:
            return text + truncation_note(self._total, self.limit)
        return text

    def progress(self) -> GenerationProgress:
        return GenerationProgress(
            text=self.text(),
            tokens=self.tokens,
            first_token_s=self.first_token_s,
            elapsed_s=self.clock() - self.started,
            done=self.done,
            eval_tokens_per_s=self.eval_tokens_per_s,
            load_s=self.load_s,
        )

    def report(self, *, force: bool = False) -> None:
        """Tell ``on_progress`` how far the stream got (throttled unless ``force``)."""
        if self.on_progress is None:
            return
        now = self.clock()
        if not force and self._last_report is not None and now - self._last_report < PROGRESS_INTERVAL_S:
            return
        self._last_report = now
        self.on_progress(self.progress())
