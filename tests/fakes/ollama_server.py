"""A stand-in for Ollama's HTTP API on a real TCP socket, faithful where timing matters.

In a test::

    with FakeOllama(models=["gpt-oss:20b"], slots=2, ttft_s=0.2, tokens_per_s=50) as fake:
        fake.configure(mode="busy503")          # or POST {fake.url}/_fake/config
        ...
        fake.stats()["cancelled"]               # or GET {fake.url}/_fake/stats

As a process (integration tests that spawn real workers)::

    python -m tests.fakes.ollama_server --port 0 --models gpt-oss:20b [--slots 1]
        [--max-queue 512] [--load 0] [--keep-alive 300] [--ttft 0] [--tokens-per-s 0]
        [--reply-tokens 0] [--latency 0] [--latency-jitter 0] [--mode ok]

prints ``READY http://127.0.0.1:PORT`` once listening and serves until SIGTERM/SIGINT (or until
its parent exits). ``FakeOllamaProcess`` (``tests.fakes.ollama_process``) wraps that.

Endpoints, shaped like real Ollama's: ``GET /``, ``GET /api/version``, ``GET /api/tags``,
``POST /api/chat``, ``POST /api/generate`` (streaming NDJSON unless ``"stream": false``; the last
chunk has ``done``, ``done_reason``, ``eval_count``, ``eval_duration``, ``prompt_eval_count``,
``prompt_eval_duration``, ``load_duration``, ``total_duration`` in ns), ``GET /v1/models``,
``POST /v1/chat/completions`` (OpenAI-compatible, SSE when ``"stream": true``; Codex uses it).
Replies are deterministic: ``"echo: " + the last user message`` (or the prompt), lengthened to
``reply_tokens`` tokens with filler words ``w0 w1 ...`` (one word = one token = one chunk),
cut to ``options.num_predict`` when the request sets it (``done_reason: "length"``).

Timing, as in real Ollama (see ``tests.fakes.ollama_state``):

- ``slots`` (``OLLAMA_NUM_PARALLEL``, default 1; 0 = unlimited): generations at once. Other
  requests wait in a FIFO queue of at most ``max_queue`` (``OLLAMA_MAX_QUEUE``, default 512);
  beyond it the answer is HTTP 503 ``server busy, please try again.  maximum pending requests
  exceeded``. The slots are shared by every model of the server.
- ``load_s``: with a slot, a model that is not loaded is loaded first (once; concurrent
  requests wait for that load); it stays loaded ``keep_alive_s`` (default 300, Ollama's 5m;
  negative: forever) after its last request, or the request's own ``keep_alive``.
- ``ttft_s`` (plus ``latency_s`` and up to ``jitter_s``): from holding a loaded model to the
  first token; then ``tokens_per_s`` (0 = at once). Generation time = ttft + tokens / rate.
  Waiting in the queue and loading come before that, so a client sees them in its time to the
  first token; a streamed reply's headers go out with the first chunk, as in Ollama.
- A client that closes its connection (queued, loading, generating or hanging) is noticed
  within ``POLL_S`` and its slot freed at once; the request counts in ``cancelled``.

A request's ``format`` (``"json"`` or a JSON Schema) is honoured: the answer is JSON of that
shape (``tests.fakes.ollama_format``), its strings carrying the echo; ``misfit_next`` makes the
next N such answers miss it. Each entry of ``calls`` records the request's ``options``,
``format``, ``system`` prompt and message ``roles``, so tests can check what was sent.

Other settings: ``mode`` (``ok | error500 | busy503 | hang | malformed | truncated | huge |
missing_content``), ``huge_chars``, ``fail_next`` (the next N model requests fail),
``fail_next_mode`` (how, default ``error500``), ``models``. ``POST /_fake/config`` (or
``configure``) changes any of them at runtime; ``POST /_fake/release`` lets every request
hanging in ``hang`` mode go on (with an ordinary answer), which makes ``hang`` usable as a
barrier; ``POST /_fake/reset`` clears the stats. ``GET /_fake/stats``: ``requests``,
``by_path``, ``prompts``, ``calls`` (per request: path, model, stream, options, ``queue_wait_s``,
``load_s``, ``tokens`` sent, ``outcome``: done | cancelled | busy | a failure mode),
``in_flight``, ``active`` (slots in use), ``queue_depth``, their high-water marks
``max_in_flight``, ``max_concurrency``, ``max_queue_depth``, and ``cancelled``,
``rejected_busy``, ``loads``, ``loaded_models``, ``injected_errors``.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

from tests.fakes.ollama_format import formatted_reply, misfit_reply
from tests.fakes.ollama_process import (
    FLAGS,
    REPO_ROOT,
    FakeOllamaProcess,
    configure_remote,
    remote_stats,
)
from tests.fakes.ollama_reply import Reply, last_user_text, one_chunk, shape_reply, token_count
from tests.fakes.ollama_state import (
    BUSY_MESSAGE,
    DEFAULT_MODELS,
    MODES,
    FakeConfig,
    FakeState,
    canonical_model,
    keep_alive_seconds,
)

__all__ = [
    "BUSY_MESSAGE",
    "DEFAULT_MODELS",
    "FLAGS",
    "MODES",
    "REPO_ROOT",
    "FakeConfig",
    "FakeOllama",
    "FakeOllamaProcess",
    "canonical_model",
    "configure_remote",
    "main",
    "remote_stats",
]

FAKE_VERSION = "0.12.6"
MAX_REQUEST_BYTES = 64 * 1024 * 1024


def _now_rfc3339() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 128  # many workers connecting at once must not see SYN retries

    def __init__(self, address: tuple[str, int], state: FakeState, verbose: bool) -> None:
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
    def state(self) -> FakeState:
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

    def _client_gone(self) -> bool:
        """Whether the client closed its connection (as Ollama notices a cancelled request)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            if not readable:
                return False
            return self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def _abandon(self, call: dict[str, Any], **values: Any) -> None:
        """Stop answering: the client left (``cancelled``) or the server stops."""
        outcome = "stopped" if self.state.stopping.is_set() else "cancelled"
        self.state.note(call, outcome=outcome, **values)
        self.close_connection = True

    def _model_request(self, path: str) -> None:
        received_ns = time.perf_counter_ns()
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
        fmt = body.get("format")
        if fmt is not None and fmt != "json" and not isinstance(fmt, dict):
            # Ollama: a format is "json" or a JSON Schema object
            self._send_error_json(400, f"invalid format: {json.dumps(fmt)[:80]}", openai)
            return
        try:
            keep_alive_s = keep_alive_seconds(body.get("keep_alive"), self.state.setting("keep_alive_s"))
        except ValueError as exc:
            self._send_error_json(400, str(exc), openai)
            return
        if path == "/api/generate":
            prompt = body.get("prompt") if isinstance(body.get("prompt"), str) else ""
        else:
            prompt = last_user_text(body.get("messages"))
        call = self.state.record(path, model, str(prompt), body)
        if not self.state.known_model(model):
            self.state.note(call, outcome="model_not_found")
            self._send_error_json(404, f'model "{model}" not found, try pulling it first', openai)
            return
        admitted = self.state.enter(call, self._client_gone)
        if admitted == "busy":
            self._send_error_json(503, BUSY_MESSAGE, openai)
            return
        if admitted != "ok":
            self.close_connection = True
            return
        held: list[str] = []  # the model this request holds loaded, once it does
        try:
            self._answer(path, model, str(prompt), body, openai, call, received_ns, held)
        finally:
            self.state.leave(held[0] if held else None, keep_alive_s)

    def _answer(
        self,
        path: str,
        model: str,
        prompt: str,
        body: dict[str, Any],
        openai: bool,
        call: dict[str, Any],
        received_ns: int,
        held: list[str],
    ) -> None:
        if not self.state.pause(self.state.delay_s(), self._client_gone):
            self._abandon(call)
            return
        mode = self.state.effective_mode()
        if mode == "hang":
            if not self.state.hang(self._client_gone):
                self._abandon(call)
                return
            mode = "ok"
        if mode in ("error500", "busy503", "malformed"):
            self.state.note(call, outcome=mode)
            if mode == "error500":
                self._send_error_json(500, "fake ollama: injected internal server error", openai)
            elif mode == "busy503":
                self._send_error_json(503, BUSY_MESSAGE, openai)
            else:
                self._send(200, b'{"model": "fake", this is not json', "application/json")
            return
        load_s = self.state.ensure_loaded(model, self._client_gone)
        if load_s is None:
            self._abandon(call)
            return
        held.append(model)
        load_only = prompt == "" and path == "/api/generate"
        content = "" if load_only else f"echo: {prompt}"
        fmt = body.get("format")
        if fmt is not None and not load_only and not openai:
            # constrained to the format, as Ollama's grammar-guided sampling is
            content = misfit_reply(fmt) if self.state.take_misfit() else formatted_reply(fmt, content)
        if mode == "huge":
            size = self.state.setting("huge_chars")
            filler = " lorem ipsum dolor sit amet"
            content = (content + filler * (size // len(filler) + 1))[:size]
        options = body.get("options") or {}
        reply_tokens = 0 if load_only else self.state.setting("reply_tokens")
        pieces, counts, done_reason = shape_reply(content, reply_tokens, options.get("num_predict"))
        ttft_s = float(self.state.setting("ttft_s"))
        reply = Reply(
            pieces=pieces,
            counts=counts,
            done_reason="load" if load_only else done_reason,
            prompt_tokens=token_count(prompt),
            received_ns=received_ns,
            load_ns=int(load_s * 1e9),
            ttft_s=ttft_s,
            first_at=time.monotonic() + ttft_s,
            rate=float(self.state.setting("tokens_per_s")),
        )
        self.state.note(call, load_s=round(load_s, 6), tokens=0)
        # Ollama streams unless told not to; the OpenAI-compatible endpoint only when asked.
        stream = bool(body.get("stream", not openai))
        if openai:
            self._answer_openai(model, reply, stream, mode, call)
        else:
            self._answer_ollama(path == "/api/chat", model, reply, stream, mode, call)

    def _stream(
        self,
        reply: Reply,
        render: Callable[[str], bytes],
        final: Callable[[], list[bytes]],
        content_type: str,
        truncate: bool,
        call: dict[str, Any],
    ) -> None:
        """Send ``reply`` chunk by chunk at its pace; with ``truncate`` drop the line halfway."""
        pieces = reply.pieces[: max(1, len(reply.pieces) // 2)] if truncate else reply.pieces
        events: list[tuple[float, Callable[[], list[bytes]], int]] = []
        before = 0
        for piece, count in zip(pieces, reply.counts, strict=False):
            events.append((reply.due(before), functools.partial(one_chunk, render, piece), count))
            before += count
        if not truncate:
            events.append((reply.due(reply.tokens), final, 0))
        sent = 0
        headers_sent = False
        index = 0
        while index < len(events):
            if not self.state.pause_until(events[index][0], self._client_gone) or self._client_gone():
                self._abandon(call, tokens=sent)
                return
            now = time.monotonic()
            out = bytearray()
            tokens = 0
            while index < len(events) and events[index][0] <= now:
                for data in events[index][1]():
                    out += f"{len(data):X}\r\n".encode("ascii") + data + b"\r\n"
                tokens += events[index][2]
                index += 1
            finished = index >= len(events) and not truncate
            if finished:  # recorded before the client can see the end, so stats never lag it
                out += b"0\r\n\r\n"
                self.state.note(call, outcome="done", tokens=sent + tokens)
            try:
                if not headers_sent:
                    self.send_response(200)
                    self.send_header("Content-Type", content_type)
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    headers_sent = True
                self.wfile.write(bytes(out))
                self.wfile.flush()
            except OSError:
                self._abandon(call, tokens=sent)
                return
            sent += tokens
        if truncate:
            self.state.note(call, outcome="truncated", tokens=sent)
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return

    def _answer_whole(
        self, reply: Reply, data: dict[str, Any] | Callable[[], dict[str, Any]], content_type: str,
        truncate: bool, call: dict[str, Any],
    ) -> None:
        """Wait until the whole reply is generated, then send it in one body."""
        if not self.state.pause_until(reply.due(reply.tokens), self._client_gone):
            self._abandon(call)
            return
        encoded = json.dumps(data() if callable(data) else data).encode("utf-8")
        if truncate:
            self.state.note(call, outcome="truncated")
            self._send_truncated(encoded, content_type)
            return
        self.state.note(call, outcome="done", tokens=reply.tokens)  # before the client sees it
        self._send(200, encoded, content_type)

    def _answer_ollama(
        self, chat: bool, model: str, reply: Reply, stream: bool, mode: str, call: dict[str, Any]
    ) -> None:
        def piece(text: str) -> dict[str, Any]:
            base: dict[str, Any] = {"model": model, "created_at": _now_rfc3339()}
            if mode != "missing_content":
                if chat:
                    base["message"] = {"role": "assistant", "content": text}
                else:
                    base["response"] = text
            base["done"] = False
            return base

        def final(text: str) -> dict[str, Any]:
            data = piece(text)
            data["done"] = True
            data["done_reason"] = reply.done_reason
            if not chat:
                data["context"] = [1, 2, 3]
            data.update(reply.durations())
            return data

        truncate = mode == "truncated"
        if stream:
            self._stream(
                reply,
                lambda text: json.dumps(piece(text)).encode() + b"\n",
                lambda: [json.dumps(final("")).encode() + b"\n"],
                "application/x-ndjson",
                truncate,
                call,
            )
        else:
            content_type = "application/json; charset=utf-8"
            self._answer_whole(reply, lambda: final(reply.content), content_type, truncate, call)

    def _answer_openai(
        self, model: str, reply: Reply, stream: bool, mode: str, call: dict[str, Any]
    ) -> None:
        created = int(time.time())
        ident = f"chatcmpl-{self.state.random.randrange(10**9)}"
        finish = "length" if reply.done_reason == "length" else "stop"

        def chunk(delta: dict[str, Any], finish_reason: str | None) -> bytes:
            data = {
                "id": ident,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "system_fingerprint": "fp_ollama",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
            }
            return b"data: " + json.dumps(data).encode() + b"\n\n"

        first = [True]

        def render(text: str) -> bytes:
            delta = {"role": "assistant", "content": text} if first[0] else {"content": text}
            first[0] = False
            return chunk(delta, None)

        truncate = mode == "truncated"
        if stream:
            final = lambda: [chunk({"content": ""}, finish), b"data: [DONE]\n\n"]  # noqa: E731
            self._stream(reply, render, final, "text/event-stream", truncate, call)
            return
        message: dict[str, Any] = {"role": "assistant", "content": reply.content}
        if mode == "missing_content":
            message = {"role": "assistant"}
        data = {
            "id": ident,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "system_fingerprint": "fp_ollama",
            "choices": [{"index": 0, "message": message, "finish_reason": finish}],
            "usage": {
                "prompt_tokens": reply.prompt_tokens,
                "completion_tokens": reply.tokens,
                "total_tokens": reply.prompt_tokens + reply.tokens,
            },
        }
        self._answer_whole(reply, data, "application/json", truncate, call)


class FakeOllama:
    """The fake server in a background thread of this process.

    ``config`` takes any ``FakeConfig`` setting (``slots=2, ttft_s=0.5, ...``); ``models``
    are the names ``/api/tags`` lists and the model endpoints accept.
    """

    def __init__(
        self,
        models: Sequence[str] = DEFAULT_MODELS,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        verbose: bool = False,
        **config: Any,
    ) -> None:
        settings = FakeConfig()
        settings.update({"models": list(models), **config})
        self._state = FakeState(settings)
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


# -- standalone -------------------------------------------------------------------------------


def _model_names(values: Iterable[str]) -> Iterator[str]:
    for value in values:
        yield from (name for name in value.split(",") if name)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tests.fakes.ollama_server",
        description="A stand-in for Ollama's HTTP API; prints 'READY <url>' once listening.",
    )
    defaults = FakeConfig()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), help="names (or comma lists)")
    helps = {
        "latency_s": (float, "extra seconds before the first token"),
        "jitter_s": (float, "extra 0..N seconds before the first token"),
        "slots": (int, "generations at once, OLLAMA_NUM_PARALLEL (0: unlimited)"),
        "max_queue": (int, "requests waiting beyond the slots before 503, OLLAMA_MAX_QUEUE"),
        "load_s": (float, "seconds to load a model on first use"),
        "keep_alive_s": (float, "seconds a model stays loaded after use (negative: forever)"),
        "ttft_s": (float, "seconds from a loaded model to the first token"),
        "tokens_per_s": (float, "generation speed (0: at once)"),
        "reply_tokens": (int, "tokens per reply at least (0: just the echo)"),
        "huge_chars": (int, "characters of a reply in huge mode"),
    }
    for name, (kind, text) in helps.items():
        default = getattr(defaults, name)
        parser.add_argument(FLAGS[name], dest=name, type=kind, default=default,
                            help=f"{text} (default {default})")
    parser.add_argument("--mode", choices=MODES, default="ok")
    parser.add_argument(
        "--keep-running", action="store_true", help="do not exit when the parent process exits"
    )
    parser.add_argument("--verbose", action="store_true", help="log requests to stderr")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    settings = {name: getattr(args, name) for name in FLAGS}
    try:
        fake = FakeOllama(
            list(_model_names(args.models)), host=args.host, port=args.port, verbose=args.verbose,
            **settings,
        ).start()
    except ValueError as exc:
        print(f"fake-ollama: {exc}", file=sys.stderr)
        return 2
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
