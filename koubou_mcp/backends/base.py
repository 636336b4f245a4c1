"""The contract every backend fulfils, and the errors it may raise.

A backend turns one task (its type, prompt and model) into a result string. It never touches
the database: the worker records what the backend returns or raises. Backends are async so
that a cancel or a timeout aborts the call at once (anyio cancellation reaches the HTTP
request or the child process).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

#: Result text longer than this is truncated with a note (never a crash, never an unbounded row).
MAX_RESULT_CHARS = 1_000_000
#: Codex's last agent message in a progress report is cut to this many characters.
MAX_PROGRESS_MESSAGE_CHARS = 4_000
#: A backend reports progress at most this often while chunks arrive (plus once at the first
#: token, once at the end and once before it raises), so a fast stream costs no more than this.
PROGRESS_INTERVAL_S = 0.1


@dataclass(frozen=True)
class GenerationProgress:
    """How far one model call has got; handed to ``BackendRequest.on_progress`` as it runs.

    The last report a caller received before the backend returned or raised (cancelled, timed
    out, failed mid-stream) carries the text generated so far.
    """

    #: The answer so far, at most ``MAX_RESULT_CHARS`` characters (Codex: its last agent message).
    text: str = ""
    #: Tokens generated so far (Ollama: streamed chunks, then the final ``eval_count``).
    tokens: int = 0
    #: Seconds from sending the request to the first token (Codex: the first event about an
    #: item); None until then. Includes any wait in the model server's queue and model load.
    first_token_s: float | None = None
    #: Seconds from sending the request to this report.
    elapsed_s: float = 0.0
    #: The model said it is finished (Ollama's ``done``; Codex's ``turn.completed``).
    done: bool = False
    #: Generation speed from the final chunk (``eval_count / eval_duration``), when known.
    eval_tokens_per_s: float | None = None
    #: Seconds the server spent loading the model for this request (final chunk), when known.
    load_s: float | None = None
    #: Codex: items (messages, commands, file changes, ...) completed so far.
    steps: int = 0
    #: Codex: the latest agent message, at most ``MAX_PROGRESS_MESSAGE_CHARS`` characters.
    last_message: str | None = None


#: The progress callback: called from the backend's own task, must be cheap and must not raise
#: (no I/O: the caller keeps the latest report and saves it at its own pace).
ProgressCallback = Callable[[GenerationProgress], None]


@dataclass(frozen=True)
class BackendRequest:
    """What a backend needs to run one task."""

    task_id: str
    prompt: str
    timeout_s: float
    #: Run on this model instead of the backend's default.
    model: str | None = None
    #: A system prompt (general tasks).
    system: str | None = None
    #: Sampling options for the model server (general tasks; checked by ``taskfields``).
    options: Mapping[str, int | float] | None = None
    #: A JSON Schema the answer must fit (general tasks): asked of the model server, and the
    #: answer is checked against it.
    output_schema: Mapping[str, Any] | None = None
    #: The task's project directory (where Codex works); None: the backend's default.
    workdir: str | None = None
    #: Told how the generation is going as it streams (see ``GenerationProgress``).
    on_progress: ProgressCallback | None = None


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


def truncation_note(total_chars: int, limit: int = MAX_RESULT_CHARS) -> str:
    """The note appended to a result of ``total_chars`` characters cut to ``limit``."""
    return f"\n\n[koubou-mcp: output truncated, {total_chars - limit} of {total_chars} characters cut]"


def bound_result(text: str, limit: int = MAX_RESULT_CHARS) -> str:
    """Keep a result within ``limit`` characters, saying so when it had to be cut."""
    if len(text) <= limit:
        return text
    return text[:limit] + truncation_note(len(text), limit)
