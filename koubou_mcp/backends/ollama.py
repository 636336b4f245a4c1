"""Run a task on a local Ollama server through its HTTP API (``POST /api/chat``, streamed).

The reply streams as NDJSON, one chunk per token or so; the backend assembles the text and
reports progress (``GenerationProgress``) as chunks arrive. Every way the call can fail becomes
a ``BackendError`` whose ``kind`` says what happened and whose message says what to do about
it. Transient errors (the server is down, busy, slow or failing) are worth retrying; permanent
ones (model not pulled, bad request, garbage reply) are not. A cancelled call closes the
stream at once, which frees the model server's slot.
"""

from __future__ import annotations

import json
from typing import Any

import httpx

from koubou_mcp.backends.base import (
    BackendRequest,
    PermanentBackendError,
    TransientBackendError,
    run_in_thread,
)
from koubou_mcp.backends.http_stream import (
    Abort,
    Aborted,
    BadURL,
    Garbled,
    NoReply,
    Refused,
    Reply,
    Stalled,
    StreamingClient,
)
from koubou_mcp.backends.stream import ChatStream
from koubou_mcp.backends.structured import Misfit, parse_structured

#: A reply body larger than this is refused rather than held in memory. The result itself is
#: bounded to ``MAX_RESULT_CHARS``; this leaves room for JSON escaping and metadata.
MAX_RESPONSE_BYTES = 64 * 1024 * 1024

#: How much of an error body goes into an error message.
BODY_EXCERPT_CHARS = 300

_FIX_UNREACHABLE = "start it with `ollama serve`, or set KOUBOU_OLLAMA_URL to where Ollama listens"


def model_present(models: list[str], model: str) -> bool:
    """Whether ``model`` is among ``models`` (names from ``/api/tags``).

    Ollama treats a name without a tag as ``name:latest``, so ``llama3.2`` and
    ``llama3.2:latest`` are the same model.
    """
    wanted = _canonical_model_name(model)
    return any(_canonical_model_name(name) == wanted for name in models)


def _canonical_model_name(name: str) -> str:
    name = name.strip()
    last_segment = name.rsplit("/", 1)[-1]
    return name if ":" in last_segment else f"{name}:latest"


def _excerpt(text: str, limit: int = BODY_EXCERPT_CHARS) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "…"


def _error_text(body: bytes) -> str:
    """The ``error`` field of an Ollama error body, or the body itself when it is not JSON."""
    text = body.decode("utf-8", errors="replace")
    try:
        data = json.loads(text)
    except ValueError:
        return text
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, str):
            return error
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])
    return text


class OllamaBackend:
    """Runs a prompt as one streamed chat turn on an Ollama model.

    The worker calls ``run_blocking`` (its hot path: one kept-alive connection, aborted from
    its watchdog thread); ``run`` is the same call for async callers, cancelled like any
    anyio call. One call at a time per backend.
    """

    name = "ollama"

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        connect_timeout_s: float = 5.0,
        options: dict[str, Any] | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.connect_timeout_s = connect_timeout_s
        self.options = dict(options) if options else None
        self._http = StreamingClient(self.base_url)

    def run_blocking(self, request: BackendRequest, abort: Abort) -> str:
        """Stream the prompt's answer from ``/api/chat`` and return it (bounded).

        With an output schema, the server is asked for output in that format and the answer
        must fit it: one that does not is asked for once more, then the task fails saying why.
        ``abort.fire()`` (from any thread) ends the call at once with ``Aborted``.
        """
        model = request.model or self.model
        payload = self.payload(request)
        first = self._once(model, payload, request, abort)
        if request.output_schema is None:
            return first
        try:
            parse_structured(first, request.output_schema)
            return first
        except Misfit as exc:
            reason = str(exc)
        second = self._once(model, payload, request, abort)
        try:
            parse_structured(second, request.output_schema)
        except Misfit as exc:
            raise PermanentBackendError(
                f"the model's answer did not fit output_schema, twice: {exc} (first try: "
                f"{reason}); simplify the schema, say in the prompt what each field holds, "
                "or use a more capable model", kind="schema_mismatch") from None
        return second

    async def run(self, request: BackendRequest) -> str:
        """``run_blocking`` for async callers: cancelling the call aborts the request."""
        return await run_in_thread(self.run_blocking, request)

    def payload(self, request: BackendRequest) -> dict[str, Any]:
        """The ``/api/chat`` request body for ``request``."""
        messages = [{"role": "user", "content": request.prompt}]
        if request.system is not None:
            messages.insert(0, {"role": "system", "content": request.system})
        payload: dict[str, Any] = {"model": request.model or self.model, "messages": messages,
                                   "stream": True}
        options = {**(self.options or {}), **(request.options or {})}
        if options:
            payload["options"] = options
        if request.output_schema is not None:
            payload["format"] = dict(request.output_schema)
        return payload

    def _once(self, model: str, payload: dict[str, Any], request: BackendRequest,
              abort: Abort) -> str:
        url = f"{self.base_url}/api/chat"
        chat = ChatStream(url, request.on_progress)
        try:
            self._stream(url, model, json.dumps(payload).encode(), request.timeout_s, chat,
                         abort)
        except BaseException:
            chat.report(force=True)  # the caller keeps the text so far
            raise
        return chat.result()

    async def probe(self, *, timeout_s: float | None = None) -> dict[str, Any]:
        """Health check: is Ollama reachable, which version, which models are pulled.

        Returns ``{"reachable", "version", "models", "error"}`` and never raises a backend
        error; ``error`` says what went wrong, if anything.
        """
        timeout = httpx.Timeout(timeout_s if timeout_s is not None else self.connect_timeout_s)
        result: dict[str, Any] = {"reachable": False, "version": None, "models": [], "error": None}
        try:
            async with httpx.AsyncClient(timeout=timeout) as client:
                await self._probe(client, result)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            result["error"] = f"cannot reach Ollama at {self.base_url} ({exc}); {_FIX_UNREACHABLE}"
        except httpx.HTTPError as exc:
            result["error"] = f"Ollama at {self.base_url}: {type(exc).__name__}: {exc}"
        except (ValueError, AttributeError) as exc:
            result["error"] = f"Ollama at {self.base_url} sent an unexpected reply: {exc}"
        return result

    async def _probe(self, client: httpx.AsyncClient, result: dict[str, Any]) -> None:
        response = await client.get(f"{self.base_url}/api/version")
        result["reachable"] = True
        if response.status_code != 200:
            result["error"] = (
                f"{self.base_url}/api/version answered HTTP {response.status_code}; "
                "is KOUBOU_OLLAMA_URL pointing at Ollama?"
            )
            return
        version = response.json().get("version")
        result["version"] = version if isinstance(version, str) else None
        response = await client.get(f"{self.base_url}/api/tags")
        if response.status_code != 200:
            result["error"] = f"{self.base_url}/api/tags answered HTTP {response.status_code}"
            return
        models = response.json().get("models") or []
        result["models"] = [
            str(entry.get("name") or entry.get("model"))
            for entry in models
            if isinstance(entry, dict) and (entry.get("name") or entry.get("model"))
        ]

    def close(self) -> None:
        """Close the kept-alive connection (the next call opens another)."""
        self._http.close()

    async def aclose(self) -> None:
        self.close()

    def _stream(self, url: str, model: str, body: bytes, timeout_s: float, chat: ChatStream,
                abort: Abort) -> None:
        """POST ``body`` and feed the streamed reply to ``chat``, mapping transport failures."""
        connect_s = min(self.connect_timeout_s, timeout_s)
        try:
            with self._http.post("/api/chat", body, connect_timeout_s=connect_s,
                                 read_timeout_s=timeout_s, abort=abort) as reply:
                if reply.status >= 400:
                    raise self._http_error(url, model, reply.status,
                                           _read_bounded(reply, MAX_RESPONSE_BYTES, url))
                if not _feed_lines(reply, chat, MAX_RESPONSE_BYTES, url) and not abort.fired:
                    chat.finish()
            if abort.fired:
                raise Aborted()
        except BadURL as exc:
            raise PermanentBackendError(
                f"invalid Ollama URL {self.base_url!r} ({exc}); set KOUBOU_OLLAMA_URL to "
                "something like http://127.0.0.1:11434",
                kind="bad_request",
            ) from None
        except Refused as exc:
            raise TransientBackendError(
                f"cannot reach Ollama at {self.base_url} ({exc}); {_FIX_UNREACHABLE}",
                kind="unreachable",
            ) from None
        except NoReply as exc:
            if exc.timed_out:
                raise TransientBackendError(
                    f"Ollama at {url} did not answer within {timeout_s:g}s", kind="timeout",
                ) from None
            raise TransientBackendError(
                f"Ollama at {url} dropped the connection before answering ({exc})",
                kind="server_error",
            ) from None
        except Stalled:
            raise TransientBackendError(
                f"Ollama at {url} stopped sending its reply for longer than the read "
                f"timeout ({timeout_s:g}s)",
                kind="timeout",
            ) from None
        except Garbled as exc:
            raise PermanentBackendError(
                f"Ollama at {url} sent a truncated or undecodable reply: {exc}",
                kind="malformed",
            ) from None

    def _http_error(
        self, url: str, model: str, status: int, body: bytes
    ) -> TransientBackendError | PermanentBackendError:
        """The backend error for an HTTP error status."""
        error = _error_text(body)
        excerpt = _excerpt(error)
        if status == 503:
            return TransientBackendError(
                f"Ollama at {self.base_url} is busy (HTTP 503): {excerpt}", kind="busy"
            )
        if status == 429:
            return TransientBackendError(
                f"Ollama at {self.base_url} is rate limiting (HTTP 429): {excerpt}", kind="busy"
            )
        if status >= 500:
            return TransientBackendError(
                f"Ollama at {url} failed with HTTP {status}: {excerpt}", kind="server_error"
            )
        lowered = error.lower()
        if status == 404 and "model" in lowered and "not found" in lowered:
            return PermanentBackendError(
                f"model {model!r} is not available on Ollama at {self.base_url} "
                f"({excerpt}); run `ollama pull {model}` or configure a model it has",
                kind="model_not_found",
            )
        hint = ""
        if status == 404:
            hint = "; is KOUBOU_OLLAMA_URL pointing at Ollama's root (e.g. http://127.0.0.1:11434)?"
        return PermanentBackendError(
            f"Ollama at {url} rejected the request with HTTP {status}: {excerpt}{hint}",
            kind="bad_request",
        )


def _read_bounded(reply: Reply, limit: int, url: str) -> bytes:
    """The whole response body, refusing (``malformed``) one longer than ``limit`` bytes."""
    chunks: list[bytes] = []
    size = 0
    for chunk in reply.chunks():
        size += len(chunk)
        if size > limit:
            raise _too_large(url, limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _feed_lines(reply: Reply, chat: ChatStream, limit: int, url: str) -> bool:
    """Feed the body's NDJSON lines to ``chat`` as they arrive, refusing (``malformed``) more
    than ``limit`` bytes in all; True when the final chunk came. The body is read to its end
    even after the final chunk (it follows at once), so the connection can be kept."""
    buffer = bytearray()
    size = 0
    done = False
    for chunk in reply.chunks():
        size += len(chunk)
        if size > limit:
            raise _too_large(url, limit)
        buffer += chunk
        if b"\n" not in chunk:
            continue
        *complete, rest = buffer.split(b"\n")
        buffer = bytearray(rest)
        for line in complete:
            if not done and line.strip():
                done = chat.feed(bytes(line))
    if not done and buffer.strip():
        done = chat.feed(bytes(buffer))
    return done


def _too_large(url: str, limit: int) -> PermanentBackendError:
    return PermanentBackendError(f"Ollama at {url} sent a reply larger than {limit} bytes",
                                 kind="malformed")
