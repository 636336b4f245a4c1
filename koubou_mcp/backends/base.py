"""The contract every backend fulfils, and the errors it may raise.

A backend turns one task (its type, prompt and model) into a result string. It never touches
the database: the worker records what the backend returns or raises. Each backend can be
called two ways, and a cancel or a timeout ends either at once:

* ``run_blocking(request, abort)``: the worker's way (its loop is synchronous: see
  ``worker``); ``abort.fire()`` from another thread or a signal handler ends the call, which
  then raises ``Aborted``;
* ``async run(request)``: for async callers; anyio cancellation ends the call.

``run_in_thread`` and ``run_coroutine_blocking`` turn one into the other, so a backend writes
only the one that suits it (Ollama: blocking HTTP; Codex: an async child process).
"""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import anyio
import anyio.to_thread

from koubou_mcp.backends.http_stream import Abort, Aborted

__all__ = ["Abort", "Aborted"]  # re-exported: the names a backend's caller needs

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
    """One way of running a task. ``run``/``run_blocking`` return the result text or raise
    BackendError (``Aborted`` when aborted).

    Implementations must end at once when cancelled or aborted (the worker does that when the
    task is cancelled or its time limit passes) and must clean up what they started (child
    processes).
    """

    name: str

    def run_blocking(self, request: BackendRequest, abort: Abort) -> str: ...

    async def run(self, request: BackendRequest) -> str: ...

    def close(self) -> None: ...

    async def aclose(self) -> None: ...


#: how long a cancelled ``run_in_thread`` waits for the aborted call to wind up (its last
#: progress report), s; an abort ends a call in milliseconds
_ABORTED_CALL_GRACE_S = 10.0
#: how often ``run_coroutine_blocking`` looks at its abort, s (signal-safe: no lock, no I/O)
_ABORT_POLL_S = 0.05


async def run_in_thread(blocking: Callable[[BackendRequest, Abort], str],
                        request: BackendRequest) -> str:
    """Run a blocking backend call in a thread; cancelling this call aborts it and waits
    (shielded) until it has wound up, so its last progress report is in before we go on."""
    abort = Abort()
    ended = threading.Event()
    outcome: list[tuple[bool, Any]] = []

    def call() -> None:
        try:
            outcome.append((True, blocking(request, abort)))
        except BaseException as exc:  # handed to the awaiting task below
            outcome.append((False, exc))
        finally:
            ended.set()

    try:
        await anyio.to_thread.run_sync(call, abandon_on_cancel=True)
    except anyio.get_cancelled_exc_class():
        abort.fire()
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(ended.wait, _ABORTED_CALL_GRACE_S)
        raise
    ok, value = outcome[0]
    if ok:
        return str(value)
    raise value


def run_coroutine_blocking(run: Callable[[BackendRequest], Awaitable[str]],
                           request: BackendRequest, abort: Abort) -> str:
    """Run an async backend call to its end on an event loop of its own (this thread's);
    ``abort.fire()`` cancels it (the call cleans up, then this raises ``Aborted``)."""
    outcome: list[tuple[bool, Any]] = []

    async def guarded() -> None:
        async with anyio.create_task_group() as tg:

            async def watch() -> None:
                while not abort.fired:
                    await anyio.sleep(_ABORT_POLL_S)
                tg.cancel_scope.cancel()

            tg.start_soon(watch)
            try:
                outcome.append((True, await run(request)))
            except Exception as exc:  # kept out of the task group's ExceptionGroup
                outcome.append((False, exc))
            tg.cancel_scope.cancel()

    anyio.run(guarded)
    if not outcome:
        raise Aborted()
    ok, value = outcome[0]
    if ok:
        return str(value)
    raise value


def truncation_note(total_chars: int, limit: int = MAX_RESULT_CHARS) -> str:
    """The note appended to a result of ``total_chars`` characters cut to ``limit``."""
    return f"\n\n[koubou-mcp: output truncated, {total_chars - limit} of {total_chars} characters cut]"


def bound_result(text: str, limit: int = MAX_RESULT_CHARS) -> str:
    """Keep a result within ``limit`` characters, saying so when it had to be cut."""
    if len(text) <= limit:
        return text
    return text[:limit] + truncation_note(len(text), limit)
