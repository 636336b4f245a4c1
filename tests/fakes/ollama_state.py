"""The simulated model server behind the stand-in Ollama (``tests.fakes.ollama_server``).

Configuration, the slots and the queue in front of them, model loads and ``keep_alive``
expiry, and the statistics, shared by every handler thread under one lock. Timing follows real
Ollama: a request takes a slot (``OLLAMA_NUM_PARALLEL``, 1 by default in current releases) or
waits in a FIFO queue of at most ``max_queue`` requests (``OLLAMA_MAX_QUEUE``, 512 by default;
beyond it: HTTP 503); with a slot it loads the model if it is not loaded (``load_s``), then
answers after ``ttft_s`` and streams tokens at ``tokens_per_s``. A request whose client went
away stops where it is (queue, load or generation) and frees its slot, as Ollama's cancelled
request context does.
"""

from __future__ import annotations

import random
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

MODES = (
    "ok",
    "error500",
    "busy503",
    "hang",
    "malformed",
    "truncated",
    "huge",
    "missing_content",
)
DEFAULT_MODELS = ("gpt-oss:20b",)
#: Real Ollama's defaults (FAQ / server env docs): one generation at a time per model,
#: 512 requests queued before 503, a model stays loaded 5 minutes after its last use.
OLLAMA_DEFAULT_NUM_PARALLEL = 1
OLLAMA_DEFAULT_MAX_QUEUE = 512
OLLAMA_DEFAULT_KEEP_ALIVE_S = 300.0
#: "hang" waits this long at most (far beyond any test timeout); stop() ends it at once.
HANG_S = 3600.0
BUSY_MESSAGE = "server busy, please try again.  maximum pending requests exceeded"
#: How often a waiting request checks whether its client is still there.
POLL_S = 0.02

#: Reports whether the client of a request has gone away (closed its connection).
Gone = Callable[[], bool]

_DURATION = re.compile(r"^(-?\d+(?:\.\d+)?)(ms|s|m|h)?$")
_DURATION_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def system_text(body: dict[str, Any]) -> str | None:
    """The system prompt of a request: ``/api/generate``'s ``system``, or the system messages of
    a chat, joined (None when there is none)."""
    if isinstance(body.get("system"), str):
        return str(body["system"])
    messages = body.get("messages")
    if not isinstance(messages, list):
        return None
    texts = [str(m.get("content", "")) for m in messages
             if isinstance(m, dict) and m.get("role") == "system"]
    return "\n".join(texts) if texts else None


def roles(messages: Any) -> list[str]:
    """The roles of a chat's messages, in order."""
    if not isinstance(messages, list):
        return []
    return [str(m.get("role")) for m in messages if isinstance(m, dict)]


def canonical_model(name: str) -> str:
    """``llama3.2`` and ``llama3.2:latest`` name the same model, as in Ollama."""
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


def keep_alive_seconds(value: Any, default_s: float) -> float:
    """A request's ``keep_alive`` (seconds, or ``"5m"``-style) in seconds; negative: forever."""
    if value is None:
        return default_s
    if isinstance(value, bool):
        raise ValueError("keep_alive must be a number of seconds or a duration such as '5m'")
    if isinstance(value, int | float):
        return float(value)
    match = _DURATION.match(str(value).strip()) if isinstance(value, str) else None
    if match is None:
        raise ValueError(f"invalid keep_alive duration {value!r}")
    return float(match.group(1)) * _DURATION_UNIT_S[match.group(2)]


@dataclass
class FakeConfig:
    """How the fake behaves; changed at runtime through ``configure`` or ``/_fake/config``."""

    latency_s: float = 0.0
    jitter_s: float = 0.0
    mode: str = "ok"
    huge_chars: int = 2_000_000
    fail_next: int = 0
    fail_next_mode: str = "error500"
    slots: int = OLLAMA_DEFAULT_NUM_PARALLEL
    max_queue: int = OLLAMA_DEFAULT_MAX_QUEUE
    load_s: float = 0.0
    keep_alive_s: float = OLLAMA_DEFAULT_KEEP_ALIVE_S
    ttft_s: float = 0.0
    tokens_per_s: float = 0.0
    reply_tokens: int = 0
    #: the next N requests with a ``format`` answer JSON that does not fit it
    misfit_next: int = 0
    models: list[str] = field(default_factory=lambda: list(DEFAULT_MODELS))

    def update(self, changes: dict[str, Any]) -> None:
        """Apply ``changes`` after validating all of them (nothing changes on error)."""
        unknown = sorted(set(changes) - set(asdict(self)))
        if unknown:
            raise ValueError(f"unknown config keys: {', '.join(unknown)}")
        new = FakeConfig(**{**asdict(self), **changes})
        for name in ("latency_s", "jitter_s", "load_s", "ttft_s", "tokens_per_s"):
            value = getattr(new, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ValueError(f"{name} must be a number >= 0")
        if isinstance(new.keep_alive_s, bool) or not isinstance(new.keep_alive_s, int | float):
            raise ValueError("keep_alive_s must be a number (negative: keep loaded forever)")
        for name in ("huge_chars", "fail_next", "slots", "max_queue", "reply_tokens",
                     "misfit_next"):
            value = getattr(new, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0")
        for name in ("mode", "fail_next_mode"):
            if getattr(new, name) not in MODES:
                raise ValueError(f"{name} must be one of {', '.join(MODES)}")
        if not isinstance(new.models, list) or not all(isinstance(m, str) for m in new.models):
            raise ValueError("models must be a list of names")
        self.__dict__.update(asdict(new))


class _Ticket:
    """One model request waiting in the queue."""

    __slots__ = ("gone",)

    def __init__(self, gone: Gone) -> None:
        self.gone = gone


class FakeState:
    """Configuration, statistics, the slots and their queue, shared by all handler threads."""

    def __init__(self, config: FakeConfig, seed: int = 0) -> None:
        self.config = config
        self.lock = threading.Condition()
        self.stopping = threading.Event()
        self.random = random.Random(seed)
        self.release_generation = 0
        self.in_flight = 0  # model requests admitted (holding a slot or queued), not yet answered
        self.active = 0  # of those, the ones holding a slot
        self.queue: deque[_Ticket] = deque()  # FIFO, like Ollama's pending requests
        self.loaded_until: dict[str, float] = {}  # model -> monotonic expiry (inf: in use/forever)
        self.loading: set[str] = set()
        self.users: dict[str, int] = {}  # model -> requests holding a slot with it loaded
        self._reset_counters()

    def _reset_counters(self) -> None:
        self.requests = 0
        self.by_path: dict[str, int] = {}
        self.prompts: list[str] = []
        self.calls: list[dict[str, Any]] = []
        self.injected_errors = 0
        self.cancelled = 0
        self.rejected_busy = 0
        self.loads = 0
        self.max_in_flight = self.in_flight
        self.max_concurrency = self.active
        self.max_queue_depth = len(self.queue)

    def reset_stats(self) -> None:
        """Forget what was seen (requests still in flight keep counting)."""
        with self.lock:
            self._reset_counters()

    def stats(self) -> dict[str, Any]:
        with self.lock:
            now = time.monotonic()
            return {
                "requests": self.requests,
                "by_path": dict(self.by_path),
                "prompts": list(self.prompts),
                "calls": [dict(call) for call in self.calls],
                "injected_errors": self.injected_errors,
                "in_flight": self.in_flight,
                "active": self.active,
                "queue_depth": len(self.queue),
                "max_in_flight": self.max_in_flight,
                "max_concurrency": self.max_concurrency,
                "max_queue_depth": self.max_queue_depth,
                "cancelled": self.cancelled,
                "rejected_busy": self.rejected_busy,
                "loads": self.loads,
                "loaded_models": sorted(m for m, until in self.loaded_until.items() if until > now),
            }

    def configure(self, changes: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            self.config.update(changes)
            self.lock.notify_all()  # a raised slot limit lets waiters in
            return asdict(self.config)

    def setting(self, name: str) -> Any:
        with self.lock:
            return getattr(self.config, name)

    def release_hung(self) -> None:
        with self.lock:
            self.release_generation += 1
            self.lock.notify_all()

    def stop(self) -> None:
        with self.lock:
            self.stopping.set()
            self.lock.notify_all()

    def record(self, path: str, model: str, prompt: str, body: dict[str, Any]) -> dict[str, Any]:
        """Count a model request; returns its entry in ``calls`` (updated as it goes on)."""
        call = {
            "path": path,
            "model": model,
            "stream": body.get("stream"),
            "options": body.get("options"),
            "format": body.get("format"),
            "system": system_text(body),
            "roles": roles(body.get("messages")),
        }
        with self.lock:
            self.requests += 1
            self.by_path[path] = self.by_path.get(path, 0) + 1
            self.prompts.append(prompt)
            self.calls.append(call)
        return call

    def take_misfit(self) -> bool:
        """Whether this formatted answer is to miss its format (``misfit_next``)."""
        with self.lock:
            if self.config.misfit_next > 0:
                self.config.misfit_next -= 1
                return True
            return False

    def note(self, call: dict[str, Any], **values: Any) -> None:
        """Update a request's entry in ``calls`` (outcome, tokens, ...)."""
        with self.lock:
            call.update(values)
            if values.get("outcome") == "cancelled":
                self.cancelled += 1

    # -- slots and queue ------------------------------------------------------------------------

    def enter(self, call: dict[str, Any], gone: Gone) -> str:
        """Take a slot, waiting in the queue if need be.

        Returns ``"ok"`` (holding a slot: call ``leave`` later), ``"busy"`` (queue full: answer
        503), ``"gone"`` (the client left while queued) or ``"stopping"``.
        """
        with self.lock:
            slots = self.config.slots
            if slots and self.active >= slots and len(self.queue) >= self.config.max_queue:
                self.rejected_busy += 1
                call.update(outcome="busy", queue_wait_s=0.0)
                return "busy"
            queued_at = time.monotonic()
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            ticket = _Ticket(gone)
            self.queue.append(ticket)
            self.max_queue_depth = max(self.max_queue_depth, self._waiting())
            outcome = "ok"
            while self.queue[0] is not ticket or (self.config.slots and self.active >= self.config.slots):
                if self.stopping.is_set():
                    outcome = "stopping"
                    break
                self.lock.wait(POLL_S)
                if gone():
                    outcome = "gone"
                    break
            self.queue.remove(ticket)
            self.lock.notify_all()  # the next in line may go now
            call["queue_wait_s"] = round(time.monotonic() - queued_at, 6)
            if outcome != "ok":
                self.in_flight -= 1
                if outcome == "gone":
                    call["outcome"] = "cancelled"
                    self.cancelled += 1
                return outcome
            self.active += 1
            self.max_concurrency = max(self.max_concurrency, self.active)
            return "ok"

    def _waiting(self) -> int:
        """Requests in the queue that cannot have a slot yet (the queue depth that matters)."""
        slots = self.config.slots
        if not slots:
            return 0
        return max(0, len(self.queue) - max(0, slots - self.active))

    def leave(self, model: str | None, keep_alive_s: float) -> None:
        """Give the slot back; the model stays loaded ``keep_alive_s`` after its last user."""
        with self.lock:
            self.active -= 1
            self.in_flight -= 1
            if model is not None and model in self.users:
                self.users[model] -= 1
                if self.users[model] == 0:
                    del self.users[model]
                    expiry = float("inf") if keep_alive_s < 0 else time.monotonic() + keep_alive_s
                    self.loaded_until[model] = expiry
            self.lock.notify_all()

    # -- model loads ----------------------------------------------------------------------------

    def ensure_loaded(self, model: str, gone: Gone) -> float | None:
        """Load ``model`` unless it is loaded (one load at a time per model; others wait).

        Returns the seconds this request spent on the load (0 when it was loaded), or None
        when the client left or the server stops meanwhile. The caller must then pass
        ``model`` to ``leave`` (it counts as in use until then).
        """
        started = time.monotonic()
        with self.lock:
            while model in self.loading:
                self.lock.wait(POLL_S)
                if gone() or self.stopping.is_set():
                    return None
            if self.loaded_until.get(model, 0.0) > time.monotonic():
                self._use(model)
                return time.monotonic() - started
            self.loading.add(model)
            self.loads += 1
            load_s = float(self.config.load_s)
        loaded = self.pause(load_s, gone)
        with self.lock:
            self.loading.discard(model)
            if loaded:
                self._use(model)
            self.lock.notify_all()
        return time.monotonic() - started if loaded else None

    def _use(self, model: str) -> None:
        self.users[model] = self.users.get(model, 0) + 1
        self.loaded_until[model] = float("inf")

    # -- time ----------------------------------------------------------------------------------

    def pause(self, seconds: float, gone: Gone) -> bool:
        """Let ``seconds`` pass; False when the client left or the server stops first."""
        return self.pause_until(time.monotonic() + seconds, gone)

    def pause_until(self, deadline: float, gone: Gone) -> bool:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return True
            if self.stopping.wait(min(remaining, POLL_S)) or gone():
                return False

    def delay_s(self) -> float:
        with self.lock:
            jitter = self.random.uniform(0, self.config.jitter_s) if self.config.jitter_s else 0
            return float(self.config.latency_s) + jitter

    def effective_mode(self) -> str:
        """The mode for this request, consuming one ``fail_next`` if any are left."""
        with self.lock:
            if self.config.fail_next > 0:
                self.config.fail_next -= 1
                self.injected_errors += 1
                return self.config.fail_next_mode
            mode = self.config.mode
            if mode in ("error500", "busy503", "malformed", "truncated", "missing_content"):
                self.injected_errors += 1
            return mode

    def hang(self, gone: Gone) -> bool:
        """Block until released, stopped or the client leaves; True when released."""
        with self.lock:
            generation = self.release_generation
            deadline = time.monotonic() + HANG_S
            while self.release_generation == generation and not self.stopping.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0 or gone():
                    break
                self.lock.wait(min(remaining, POLL_S))
            return self.release_generation != generation and not self.stopping.is_set()

    def known_model(self, model: str) -> bool:
        with self.lock:
            wanted = canonical_model(model)
            return any(canonical_model(name) == wanted for name in self.config.models)

    def models(self) -> list[str]:
        with self.lock:
            return list(self.config.models)
