"""A stand-in for Ollama's HTTP API on a real TCP socket, for tests and benchmarks.

In a test::

    with FakeOllama(models=["gpt-oss:20b"]) as fake:
        fake.configure(mode="busy503")          # or POST {fake.url}/_fake/config
        ...
        fake.stats()["prompts"]                 # or GET {fake.url}/_fake/stats

As a process (integration tests that spawn real workers)::

    python -m tests.fakes.ollama_server --port 0 --models gpt-oss:20b [--latency 0.05]
        [--latency-jitter 0.02] [--slots 2] [--mode ok]

prints ``READY http://127.0.0.1:PORT`` once listening and serves until SIGTERM/SIGINT (or until
its parent exits). ``FakeOllamaProcess`` wraps that for tests.

Endpoints, shaped like real Ollama's: ``GET /``, ``GET /api/version``, ``GET /api/tags``,
``POST /api/chat``, ``POST /api/generate`` (streaming NDJSON by default, like Ollama, or
``"stream": false``), ``GET /v1/models``, ``POST /v1/chat/completions`` (OpenAI-compatible,
SSE when ``"stream": true``; Codex uses it). Replies are deterministic: ``"echo: " + the last
user message`` (or the prompt).

Control: ``POST /_fake/config`` with any of ``latency_s``, ``jitter_s``, ``mode``
(``ok | error500 | busy503 | hang | malformed | truncated | huge | missing_content``),
``huge_chars``, ``fail_next`` (the next N model requests fail), ``fail_next_mode`` (how they
fail, default ``error500``), ``slots`` (requests processed at once, 0 = unlimited; others
wait), ``models``. ``POST /_fake/release`` lets every request hanging in ``hang`` mode go on
(with an ordinary answer), which makes ``hang`` usable as a barrier. ``POST /_fake/reset``
clears the stats. ``GET /_fake/stats`` returns counts, the prompts received, the calls
(path, model, stream, options) and the highest concurrency seen.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

from tests.support.env import plain_env
from tests.support.paths import REPO_ROOT

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
FAKE_VERSION = "0.12.6"
#: "hang" waits this long at most (far beyond any test timeout); stop() ends it at once.
HANG_S = 3600.0
MAX_REQUEST_BYTES = 64 * 1024 * 1024
BUSY_MESSAGE = "server busy, please try again.  maximum pending requests exceeded"


def canonical_model(name: str) -> str:
    """``llama3.2`` and ``llama3.2:latest`` name the same model, as in Ollama."""
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


def _now_rfc3339() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


@dataclass
class FakeConfig:
    """How the fake behaves; changed at runtime through ``configure`` or ``/_fake/config``."""

    latency_s: float = 0.0
    jitter_s: float = 0.0
    mode: str = "ok"
    huge_chars: int = 2_000_000
    fail_next: int = 0
    fail_next_mode: str = "error500"
    slots: int = 0
    models: list[str] = field(default_factory=lambda: list(DEFAULT_MODELS))

    def update(self, changes: dict[str, Any]) -> None:
        """Apply ``changes`` after validating all of them (nothing changes on error)."""
        unknown = sorted(set(changes) - set(asdict(self)))
        if unknown:
            raise ValueError(f"unknown config keys: {', '.join(unknown)}")
        new = FakeConfig(**{**asdict(self), **changes})
        for name in ("latency_s", "jitter_s"):
            value = getattr(new, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ValueError(f"{name} must be a number >= 0")
        for name in ("huge_chars", "fail_next", "slots"):
            value = getattr(new, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0")
        for name in ("mode", "fail_next_mode"):
            if getattr(new, name) not in MODES:
                raise ValueError(f"{name} must be one of {', '.join(MODES)}")
        if not isinstance(new.models, list) or not all(isinstance(m, str) for m in new.models):
            raise ValueError("models must be a list of names")
        self.__dict__.update(asdict(new))


class _State:
    """Configuration, statistics and the slot gate, shared by all handler threads."""

    def __init__(self, config: FakeConfig, seed: int = 0) -> None:
        self.config = config
        self.lock = threading.Condition()
        self.stopping = threading.Event()
        self.random = random.Random(seed)
        self.release_generation = 0
        self.in_flight = 0  # model requests received and not yet answered
        self.active = 0  # of those, the ones holding a slot
        self.requests = 0
        self.by_path: dict[str, int] = {}
        self.prompts: list[str] = []
        self.calls: list[dict[str, Any]] = []
        self.injected_errors = 0
        self.max_in_flight = 0
        self.max_concurrency = 0

    def reset_stats(self) -> None:
        """Forget what was seen (requests still in flight keep counting)."""
        with self.lock:
            self.requests = 0
            self.by_path = {}
            self.prompts = []
            self.calls = []
            self.injected_errors = 0
            self.max_in_flight = self.in_flight
            self.max_concurrency = self.active

    def stats(self) -> dict[str, Any]:
        with self.lock:
            return {
                "requests": self.requests,
                "by_path": dict(self.by_path),
                "prompts": list(self.prompts),
                "calls": [dict(call) for call in self.calls],
                "injected_errors": self.injected_errors,
                "in_flight": self.in_flight,
                "active": self.active,
                "max_in_flight": self.max_in_flight,
                "max_concurrency": self.max_concurrency,
            }

    def configure(self, changes: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            self.config.update(changes)
            self.lock.notify_all()  # a raised slot limit lets waiters in
            return asdict(self.config)

    def release_hung(self) -> None:
        with self.lock:
            self.release_generation += 1
            self.lock.notify_all()

    def stop(self) -> None:
        with self.lock:
            self.stopping.set()
            self.lock.notify_all()

    def record(self, path: str, model: str, prompt: str, body: dict[str, Any]) -> None:
        with self.lock:
            self.requests += 1
            self.by_path[path] = self.by_path.get(path, 0) + 1
            self.prompts.append(prompt)
            self.calls.append(
                {
                    "path": path,
                    "model": model,
                    "stream": body.get("stream"),
                    "options": body.get("options"),
                }
            )

    def enter(self) -> bool:
        """Wait for a free slot; False when the server is stopping."""
        with self.lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            while self.config.slots and self.active >= self.config.slots and not self.stopping.is_set():
                self.lock.wait()
            if self.stopping.is_set():
                self.in_flight -= 1
                return False
            self.active += 1
            self.max_concurrency = max(self.max_concurrency, self.active)
            return True

    def leave(self) -> None:
        with self.lock:
            self.active -= 1
            self.in_flight -= 1
            self.lock.notify_all()

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

    def hang(self) -> bool:
        """Block until released or stopped; True when released (the request goes on)."""
        with self.lock:
            generation = self.release_generation
            deadline = time.monotonic() + HANG_S
            while self.release_generation == generation and not self.stopping.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self.lock.wait(remaining)
            return self.release_generation != generation and not self.stopping.is_set()

    def known_model(self, model: str) -> bool:
        with self.lock:
            wanted = canonical_model(model)
            return any(canonical_model(name) == wanted for name in self.config.models)

    def models(self) -> list[str]:
        with self.lock:
            return list(self.config.models)

    def huge_chars(self) -> int:
        with self.lock:
            return self.config.huge_chars


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 128  # many workers connecting at once must not see SYN retries

    def __init__(self, address: tuple[str, int], state: _State, verbose: bool) -> None:
        self.state = state
        self.verbose = verbose
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError) and not self.verbose:
            return  # a client that went away is normal here
        super().handle_error(request, client_address)

    def close_connections(self) -> None:
        with self.connections_lock:
            connections = list(self.connections)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _last_user_text(messages: Any) -> str:
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


def _token_count(text: str) -> int:
    return max(1, len(text.split())) if text else 0


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Real Ollama (Go) sets TCP_NODELAY; without it every reply waits ~40 ms on delayed ACKs.
    disable_nagle_algorithm = True
    server: _Server

    # -- plumbing ---------------------------------------------------------------------------

    def setup(self) -> None:
        super().setup()
        with self.server.connections_lock:
            self.server.connections.add(self.connection)

    def finish(self) -> None:
        with self.server.connections_lock:
            self.server.connections.discard(self.connection)
        try:
            super().finish()
        except OSError:
            pass

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.verbose:
            sys.stderr.write(f"fake-ollama: {format % args}\n")

    @property
    def state(self) -> _State:
        return self.server.state

    def _send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _send_json(self, status: int, data: Any) -> None:
        self._send(status, json.dumps(data).encode("utf-8"), "application/json; charset=utf-8")

    def _send_error_json(self, status: int, message: str, openai: bool) -> None:
        if openai:
            kind = {400: "invalid_request_error", 404: "not_found_error"}.get(status, "api_error")
            self._send_json(
                status, {"error": {"message": message, "type": kind, "param": None, "code": None}}
            )
        else:
            self._send_json(status, {"error": message})

    def _send_truncated(self, body: bytes, content_type: str) -> None:
        """Promise the whole body, send half, then drop the connection."""
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: max(1, len(body) // 2)])
        self.wfile.flush()
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _send_stream(self, chunks: Iterable[bytes], content_type: str, truncate: bool) -> None:
        """A chunked response; with ``truncate`` the connection drops before the last chunk."""
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        items = list(chunks)
        if truncate:
            items = items[: max(1, len(items) // 2)]
        for data in items:
            self.wfile.write(f"{len(data):X}\r\n".encode("ascii") + data + b"\r\n")
        if truncate:
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        self.wfile.write(b"0\r\n\r\n")

    def _read_json(self) -> tuple[dict[str, Any] | None, str | None]:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_REQUEST_BYTES:
            return None, "request body too large"
        raw = self.rfile.read(length) if length else b""
        try:
            data = json.loads(raw or b"null")
        except ValueError as exc:
            return None, f"invalid request body: {exc}"
        if not isinstance(data, dict):
            return None, "invalid request body: expected a JSON object"
        return data, None

    # -- routing ----------------------------------------------------------------------------

    def do_HEAD(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        if path == "/":
            self._send(200, b"Ollama is running", "text/plain; charset=utf-8")
        elif path == "/api/version":
            self._send_json(200, {"version": FAKE_VERSION})
        elif path == "/api/tags":
            self._send_json(200, {"models": [self._tag(name) for name in self.state.models()]})
        elif path == "/v1/models":
            created = int(time.time())
            data = [
                {"id": name, "object": "model", "created": created, "owned_by": "library"}
                for name in self.state.models()
            ]
            self._send_json(200, {"object": "list", "data": data})
        elif path == "/_fake/stats":
            self._send_json(200, self.state.stats())
        elif path == "/_fake/config":
            self._send_json(200, self.state.configure({}))
        else:
            self._send(404, b"404 page not found", "text/plain")

    def do_POST(self) -> None:
        path = urlsplit(self.path).path
        if path in ("/api/chat", "/api/generate", "/v1/chat/completions"):
            self._model_request(path)
            return
        if path == "/_fake/config":
            data, error = self._read_json()
            if data is None:
                self._send_json(400, {"error": error})
                return
            try:
                self._send_json(200, self.state.configure(data))
            except (TypeError, ValueError) as exc:
                self._send_json(400, {"error": str(exc)})
        elif path == "/_fake/release":
            self._read_json()
            self.state.release_hung()
            self._send_json(200, {"released": True})
        elif path == "/_fake/reset":
            self._read_json()
            self.state.reset_stats()
            self._send_json(200, {"reset": True})
        else:
            self._read_json()
            self._send(404, b"404 page not found", "text/plain")

    @staticmethod
    def _tag(name: str) -> dict[str, Any]:
        digest = hashlib.sha256(name.encode("utf-8")).hexdigest()
        return {
            "name": name,
            "model": name,
            "modified_at": "2025-08-05T12:00:00.000000000Z",
            "size": 13_780_173_839,
            "digest": digest,
            "details": {
                "parent_model": "",
                "format": "gguf",
                "family": "fake",
                "families": ["fake"],
                "parameter_size": "20.9B",
                "quantization_level": "MXFP4",
            },
        }

    # -- the model endpoints ----------------------------------------------------------------

    def _model_request(self, path: str) -> None:
        openai = path.startswith("/v1/")
        body, error = self._read_json()
        if body is None:
            self._send_error_json(400, error or "invalid request body", openai)
            return
        model = body.get("model")
        if not isinstance(model, str) or not model:
            self._send_error_json(400, "model is required", openai)
            return
        if "options" in body and body["options"] is not None and not isinstance(body["options"], dict):
            self._send_error_json(400, "options must be an object", openai)
            return
        if path == "/api/generate":
            prompt = body.get("prompt") if isinstance(body.get("prompt"), str) else ""
        else:
            prompt = _last_user_text(body.get("messages"))
        self.state.record(path, model, str(prompt), body)
        if not self.state.known_model(model):
            self._send_error_json(404, f'model "{model}" not found, try pulling it first', openai)
            return
        if not self.state.enter():
            self.close_connection = True
            return
        try:
            self._answer(path, model, str(prompt), body, openai)
        finally:
            self.state.leave()

    def _answer(self, path: str, model: str, prompt: str, body: dict[str, Any], openai: bool) -> None:
        if self.state.stopping.wait(self.state.delay_s()):
            self.close_connection = True
            return
        mode = self.state.effective_mode()
        if mode == "hang":
            if not self.state.hang():
                self.close_connection = True
                return
            mode = "ok"
        if mode == "error500":
            self._send_error_json(500, "fake ollama: injected internal server error", openai)
            return
        if mode == "busy503":
            self._send_error_json(503, BUSY_MESSAGE, openai)
            return
        if mode == "malformed":
            self._send(200, b'{"model": "fake", this is not json', "application/json")
            return
        content = f"echo: {prompt}"
        if mode == "huge":
            size = self.state.huge_chars()
            filler = " lorem ipsum dolor sit amet"
            content = (content + filler * (size // len(filler) + 1))[:size]
        # Ollama streams unless told not to; the OpenAI-compatible endpoint only when asked.
        stream = bool(body.get("stream", not openai))
        truncate = mode == "truncated"
        if openai:
            self._answer_openai(model, content, prompt, stream, truncate, mode)
        else:
            self._answer_ollama(path, model, content, prompt, stream, truncate, mode)

    def _answer_ollama(
        self,
        path: str,
        model: str,
        content: str,
        prompt: str,
        stream: bool,
        truncate: bool,
        mode: str,
    ) -> None:
        chat = path == "/api/chat"
        load_only = prompt == "" and path == "/api/generate"
        if load_only:
            content = ""
        started = time.perf_counter_ns()

        def piece(text: str) -> dict[str, Any]:
            base: dict[str, Any] = {"model": model, "created_at": _now_rfc3339()}
            if chat:
                base["message"] = {"role": "assistant", "content": text}
            else:
                base["response"] = text
            base["done"] = False
            return base

        def final(text: str) -> dict[str, Any]:
            data = piece(text)
            data["done"] = True
            data["done_reason"] = "load" if load_only else "stop"
            if not chat:
                data["context"] = [1, 2, 3]
            elapsed = max(1, time.perf_counter_ns() - started)
            data.update(
                {
                    "total_duration": elapsed,
                    "load_duration": 1_000,
                    "prompt_eval_count": _token_count(prompt),
                    "prompt_eval_duration": elapsed // 3,
                    "eval_count": _token_count(content),
                    "eval_duration": elapsed // 2,
                }
            )
            return data

        if stream:
            lines = [json.dumps(piece(p)).encode() + b"\n" for p in _pieces(content)]
            lines.append(json.dumps(final("")).encode() + b"\n")
            self._send_stream(lines, "application/x-ndjson", truncate)
            return
        reply = final(content)
        if mode == "missing_content":
            reply.pop("message", None)
            reply.pop("response", None)
        encoded = json.dumps(reply).encode("utf-8")
        if truncate:
            self._send_truncated(encoded, "application/json; charset=utf-8")
        else:
            self._send(200, encoded, "application/json; charset=utf-8")

    def _answer_openai(
        self, model: str, content: str, prompt: str, stream: bool, truncate: bool, mode: str
    ) -> None:
        created = int(time.time())
        ident = f"chatcmpl-{self.state.random.randrange(10**9)}"
        usage = {
            "prompt_tokens": _token_count(prompt),
            "completion_tokens": _token_count(content),
            "total_tokens": _token_count(prompt) + _token_count(content),
        }
        if stream:
            events = []
            for index, text in enumerate(_pieces(content)):
                delta = {"role": "assistant", "content": text} if index == 0 else {"content": text}
                chunk = {
                    "id": ident,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": model,
                    "system_fingerprint": "fp_ollama",
                    "choices": [{"index": 0, "delta": delta, "finish_reason": None}],
                }
                events.append(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            last = {
                "id": ident,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "system_fingerprint": "fp_ollama",
                "choices": [{"index": 0, "delta": {"content": ""}, "finish_reason": "stop"}],
            }
            events.append(b"data: " + json.dumps(last).encode() + b"\n\n")
            events.append(b"data: [DONE]\n\n")
            self._send_stream(events, "text/event-stream", truncate)
            return
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if mode == "missing_content":
            message = {"role": "assistant"}
        reply = {
            "id": ident,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "system_fingerprint": "fp_ollama",
            "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
            "usage": usage,
        }
        encoded = json.dumps(reply).encode("utf-8")
        if truncate:
            self._send_truncated(encoded, "application/json")
        else:
            self._send(200, encoded, "application/json")


class FakeOllama:
    """The fake server in a background thread of this process."""

    def __init__(
        self,
        models: Sequence[str] = DEFAULT_MODELS,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        latency_s: float = 0.0,
        jitter_s: float = 0.0,
        slots: int = 0,
        mode: str = "ok",
        huge_chars: int = 2_000_000,
        verbose: bool = False,
    ) -> None:
        config = FakeConfig()
        config.update(
            {
                "models": list(models),
                "latency_s": latency_s,
                "jitter_s": jitter_s,
                "slots": slots,
                "mode": mode,
                "huge_chars": huge_chars,
            }
        )
        self._state = _State(config)
        self._address = (host, port)
        self._verbose = verbose
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("FakeOllama is not started")
        host, port = self._server.server_address[:2]
        if isinstance(host, bytes):
            host = host.decode()
        return f"http://{host}:{port}"

    def start(self) -> FakeOllama:
        if self._server is not None:
            return self
        self._server = _Server(self._address, self._state, self._verbose)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.02},
            name="fake-ollama",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving; hanging and waiting requests end at once (their clients see a drop)."""
        server, thread = self._server, self._thread
        if server is None:
            return
        self._state.stop()
        server.shutdown()
        server.server_close()
        server.close_connections()
        if thread is not None:
            thread.join(timeout=5)
        self._server = None
        self._thread = None

    def __enter__(self) -> FakeOllama:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def configure(self, **changes: Any) -> dict[str, Any]:
        """Same keys as ``POST /_fake/config``; returns the whole new configuration."""
        return self._state.configure(changes)

    def stats(self) -> dict[str, Any]:
        return self._state.stats()

    def reset_stats(self) -> None:
        self._state.reset_stats()

    def release(self) -> None:
        """Let every request hanging in ``hang`` mode go on with an ordinary answer."""
        self._state.release_hung()


# -- driving a fake that runs in another process ----------------------------------------------


def _post_json(url: str, data: dict[str, Any], timeout_s: float = 5.0) -> dict[str, Any]:
    request = urllib.request.Request(
        url,
        data=json.dumps(data).encode("utf-8"),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        result: dict[str, Any] = json.loads(response.read())
        return result


def configure_remote(url: str, **changes: Any) -> dict[str, Any]:
    """``POST {url}/_fake/config``."""
    return _post_json(f"{url}/_fake/config", changes)


def remote_stats(url: str) -> dict[str, Any]:
    """``GET {url}/_fake/stats``."""
    with urllib.request.urlopen(f"{url}/_fake/stats", timeout=5.0) as response:
        result: dict[str, Any] = json.loads(response.read())
        return result


class FakeOllamaProcess:
    """The fake server as a child process (``python -m tests.fakes.ollama_server``)."""

    def __init__(
        self,
        models: Sequence[str] = DEFAULT_MODELS,
        *,
        latency_s: float = 0.0,
        jitter_s: float = 0.0,
        slots: int = 0,
        mode: str = "ok",
        python: str = sys.executable,
        start_timeout_s: float = 15.0,
    ) -> None:
        self.argv = [
            python,
            "-m",
            "tests.fakes.ollama_server",
            "--port",
            "0",
            "--models",
            *models,
            "--latency",
            str(latency_s),
            "--latency-jitter",
            str(jitter_s),
            "--slots",
            str(slots),
            "--mode",
            mode,
        ]
        self.start_timeout_s = start_timeout_s
        self.process: subprocess.Popen[bytes] | None = None
        self._url: str | None = None

    @property
    def url(self) -> str:
        if self._url is None:
            raise RuntimeError("FakeOllamaProcess is not started")
        return self._url

    def start(self) -> FakeOllamaProcess:
        self.process = subprocess.Popen(
            self.argv, cwd=REPO_ROOT, env=plain_env(), stdout=subprocess.PIPE, stdin=subprocess.DEVNULL
        )
        try:
            self._url = self._read_ready_line()
        except BaseException:
            self.stop()
            raise
        return self

    def _read_ready_line(self) -> str:
        assert self.process is not None and self.process.stdout is not None
        deadline = time.monotonic() + self.start_timeout_s
        buffer = b""
        with selectors.DefaultSelector() as selector:
            selector.register(self.process.stdout, selectors.EVENT_READ)
            while b"\n" not in buffer:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError("fake Ollama did not print READY in time")
                if not selector.select(remaining):
                    continue
                data = os.read(self.process.stdout.fileno(), 4096)
                if not data:
                    raise RuntimeError(f"fake Ollama exited before READY (code {self.process.poll()})")
                buffer += data
        line = buffer.split(b"\n", 1)[0].decode()
        if not line.startswith("READY "):
            raise RuntimeError(f"unexpected first line from fake Ollama: {line!r}")
        return line.split(" ", 1)[1].strip()

    def stop(self, timeout_s: float = 5.0) -> None:
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout_s)
        if process.stdout is not None:
            process.stdout.close()
        self.process = None

    def __enter__(self) -> FakeOllamaProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def configure(self, **changes: Any) -> dict[str, Any]:
        return configure_remote(self.url, **changes)

    def stats(self) -> dict[str, Any]:
        return remote_stats(self.url)

    def reset_stats(self) -> None:
        _post_json(f"{self.url}/_fake/reset", {})

    def release(self) -> None:
        _post_json(f"{self.url}/_fake/release", {})


# -- standalone -------------------------------------------------------------------------------


def _model_names(values: Iterable[str]) -> Iterator[str]:
    for value in values:
        yield from (name for name in value.split(",") if name)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.fakes.ollama_server",
        description="A stand-in for Ollama's HTTP API; prints 'READY <url>' once listening.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), help="names (or comma lists)")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds per request")
    parser.add_argument("--latency-jitter", type=float, default=0.0, help="extra 0..N seconds")
    parser.add_argument("--slots", type=int, default=0, help="requests at once (0: unlimited)")
    parser.add_argument("--mode", choices=MODES, default="ok")
    parser.add_argument("--huge-chars", type=int, default=2_000_000)
    parser.add_argument(
        "--keep-running", action="store_true", help="do not exit when the parent process exits"
    )
    parser.add_argument("--verbose", action="store_true", help="log requests to stderr")
    args = parser.parse_args(argv)

    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    fake = FakeOllama(
        list(_model_names(args.models)),
        host=args.host,
        port=args.port,
        latency_s=args.latency,
        jitter_s=args.latency_jitter,
        slots=args.slots,
        mode=args.mode,
        huge_chars=args.huge_chars,
        verbose=args.verbose,
    ).start()
    parent = os.getppid()
    try:
        print(f"READY {fake.url}", flush=True)
        while not stop.wait(0.2):
            if not args.keep_running and os.getppid() != parent:
                break  # orphaned: whoever started us is gone
    finally:
        fake.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
