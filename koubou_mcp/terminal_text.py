"""Text from prompts and results made safe to print on a terminal.

A prompt or a model's answer may carry escape sequences (``ESC [ 2 J``, a window title, an
OSC 8 link, a C1 ``CSI``) or bidirectional overrides; printed raw they would clear the screen,
retitle the window or make the text read differently from what it is. Here each such character
is shown as an escape (``\\x1b``, ``\\u202e``) instead; newlines and tabs stay.
"""

from __future__ import annotations

import json
import re
from typing import Any

#: C0 controls but tab and newline, DEL, C1 controls, and the bidirectional controls
_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def safe_text(text: str) -> str:
    """``text`` with every terminal control character shown as an escape."""
    return _UNSAFE.sub(_escape, text)


def safe_json(data: Any) -> str:
    """``data`` as one line of JSON in which no terminal control character appears raw (JSON
    escapes C0 controls itself, not C1 or the bidirectional ones)."""
    text = json.dumps(data, ensure_ascii=False)
    return _UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


__all__ = ["safe_json", "safe_text"]
