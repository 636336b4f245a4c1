"""The contract every backend fulfils, and the errors it may raise.

A backend turns one task (its type, prompt and model) into a result string. It never touches
the database: the worker records what the backend returns or raises. Backends are async so
that a cancel or a timeout aborts the call at once (anyio cancellation reaches the HTTP
request or the child process).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

#: Result text longer than this is truncated with a note (never a crash, never an unbounded row).
MAX_RESULT_CHARS = 1_000_000


@dataclass(frozen=True)
class BackendRequest:
    """What a backend needs to run one task."""

    task_id: str
    prompt: str
    timeout_s: float


class BackendError(Exception):
    """A backend call failed. ``kind`` is a short, stable label used in stats and metrics."""

    transient: bool = False

    def __init__(self, message: str, *, kind: str = "error") -> None:
        super().__init__(message)
        self.kind = kind


class TransientBackendError(BackendError):
    """Worth retrying later: connection refused, HTTP 5xx, 503 busy, connect/read timeouts."""

    transient = True


class PermanentBackendError(BackendError):
    """Retrying cannot help: model missing, bad request, Codex not installed, non-zero exit."""

    transient = False


class Backend(Protocol):
    """One way of running a task. ``run`` returns the result text or raises BackendError.

    Implementations must honour anyio cancellation (the worker cancels the call when the task
    is cancelled or its timeout passes) and must clean up what they started (child processes).
    """

    name: str

    async def run(self, request: BackendRequest) -> str: ...

    async def aclose(self) -> None: ...


def bound_result(text: str, limit: int = MAX_RESULT_CHARS) -> str:
    """Keep a result within ``limit`` characters, saying so when it had to be cut."""
    if len(text) <= limit:
        return text
    note = f"\n\n[koubou-mcp: output truncated, {len(text) - limit} of {len(text)} characters cut]"
    return text[:limit] + note
