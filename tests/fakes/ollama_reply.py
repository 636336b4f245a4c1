"""What the stand-in Ollama answers to one request, and when each piece of it is due.

One word of the reply is one token and one streamed chunk (long text goes in 4096-character
blocks); the timing is the state's ``ttft_s`` and ``tokens_per_s``.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


def last_user_text(messages: Any) -> str:
    """The text of the last user message (string content or OpenAI content parts)."""
    if not isinstance(messages, list):
        return ""
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                return "".join(
                    str(part.get("text", ""))
                    for part in content
                    if isinstance(part, dict) and part.get("type") in ("text", "input_text")
                )
            return ""
    return ""


def _pieces(text: str) -> list[str]:
    """How a reply is split into streamed chunks: words, or fixed blocks for long text."""
    if len(text) > 10_000:
        return [text[i : i + 4096] for i in range(0, len(text), 4096)]
    return re.findall(r"\S+\s*|\s+", text) or [""]


def token_count(text: str) -> int:
    return max(1, len(text.split())) if text else 0


@dataclass
class Reply:
    """What one model request answers, and when each piece of it is due."""

    pieces: list[str]
    counts: list[int]  # tokens in each piece
    done_reason: str
    prompt_tokens: int
    received_ns: int  # perf_counter_ns when the request arrived
    load_ns: int
    ttft_s: float
    first_at: float  # time.monotonic() of the first token
    rate: float  # tokens per second; 0 = all at once

    @property
    def tokens(self) -> int:
        return sum(self.counts)

    @property
    def content(self) -> str:
        return "".join(self.pieces)

    def due(self, tokens_before: int) -> float:
        return self.first_at + (tokens_before / self.rate if self.rate else 0.0)

    def durations(self) -> dict[str, int]:
        """The final chunk's timings in ns, as Ollama reports them."""
        now_ns = time.perf_counter_ns()
        eval_ns = int((time.monotonic() - self.first_at) * 1e9)
        return {
            "total_duration": max(1, now_ns - self.received_ns),
            "load_duration": max(1_000, self.load_ns),
            "prompt_eval_count": self.prompt_tokens,
            "prompt_eval_duration": max(1, int(self.ttft_s * 1e9)),
            "eval_count": self.tokens,
            "eval_duration": max(1, eval_ns),
        }


def one_chunk(render: Callable[[str], bytes], piece: str) -> list[bytes]:
    return [render(piece)]


def shape_reply(content: str, reply_tokens: int, num_predict: Any) -> tuple[list[str], list[int], str]:
    """The reply's pieces and their token counts: lengthened to ``reply_tokens``, cut to
    ``num_predict``; and the ``done_reason`` that results."""
    pieces = _pieces(content) if content else []
    counts = [token_count(piece) for piece in pieces]
    missing = reply_tokens - sum(counts)
    if missing > 0:
        if pieces and not pieces[-1][-1:].isspace():
            pieces[-1] += " "
        pieces += [f"w{index} " for index in range(missing - 1)] + [f"w{missing - 1}"]
        counts += [1] * missing
    done_reason = "stop"
    if isinstance(num_predict, int) and not isinstance(num_predict, bool) and num_predict > 0:
        kept, total = 0, 0
        while kept < len(counts) and total + counts[kept] <= num_predict:
            total += counts[kept]
            kept += 1
        if kept < len(pieces):
            pieces, counts, done_reason = pieces[:kept], counts[:kept], "length"
    return pieces, counts, done_reason
