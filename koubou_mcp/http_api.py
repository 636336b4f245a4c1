"""The HTTP side of ``koubou-mcp serve --transport streamable-http``: the seed's REST API next
to MCP at ``/mcp``, ``/metrics``, and the guard in front of every route.

Routes (JSON in and out; an error is ``{"error": "<what is wrong and what is accepted>"}``,
plus ``"field"`` when one field is to blame):

* ``GET /health``: the ``koubou://health`` document; 503 when its status is ``down``.
* ``POST /task/delegate``: ``{"prompt", "type", "priority", "sync", "timeout_s", "wait_s",
  "idempotency_key"}`` (only ``prompt`` required) → what the ``delegate_task`` tool returns:
  ``{"task_id", "status", "result", ...}``. With ``"sync": true`` it waits like the tool, at
  most ``wait_s``. 400 for a body that is not a JSON object, 422 for a bad field.
* ``GET /task/{task_id}/status[?include_prompt=true]``: the task's record; 404 when unknown.
* ``POST /task/{task_id}/cancel``: cancel it; 404 when unknown, 409 when it already ended.
* ``POST /task/delegate`` also takes the ``delegate_task`` tool's ``workdir``, ``files``,
  ``model``, ``system``, ``options`` and ``output_schema``.
* ``POST /tasks/delegate``: ``{"tasks": [{...}, ...]}`` (each a ``/task/delegate`` body
  without ``sync``/``wait_s``) → ``{"task_ids", "tasks"}``; all stored or none: 422 with the
  ``index`` of the first bad task.
* ``POST /tasks/wait``: ``{"task_ids", "mode": "all"|"any", "wait_s"}`` → what ``wait_tasks``
  returns; 404 for an unknown id.
* ``GET /tasks[?status=&limit=]``: ``{"tasks": [...], "counts": {...}}``, newest first.
* ``GET /workers``: live workers, with counts by status and host.
* ``GET /metrics``: Prometheus text (``metrics.py``).

The checks of the fields are those of the MCP tools (``service.validate``), so the messages
are the same. The routes call :class:`koubou_mcp.service.Service`; its errors become statuses
(``STATUS_OF``).

``Guard`` wraps the whole application, MCP included:

1. With no token (so bound to loopback: ``check_bind`` refuses anything else), the ``Host``
   must name a loopback address and an ``Origin``, when sent, must be loopback too: a web page
   cannot reach the API through DNS rebinding or a cross-site request (421 / 403).
2. With a token (``KOUBOU_HTTP_TOKEN``), every request must carry ``Authorization: Bearer
   <token>``, compared in constant time (401).
3. Request bodies over ``max_body_bytes`` are refused (413): at once when their length is
   declared, as they arrive otherwise, whatever the framing; a body must arrive within
   ``KOUBOU_HTTP_HEADER_TIMEOUT`` (408).
4. One client address may hold at most ``KOUBOU_HTTP_SESSIONS_PER_CLIENT`` open MCP sessions
   (429 for the next ``initialize``; ``http_sessions``).
"""

from __future__ import annotations

import functools
import hmac
import ipaddress
import json
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import anyio
import anyio.to_thread
from starlette.datastructures import Headers, QueryParams
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from koubou_mcp.config import MIN_HTTP_TOKEN_CHARS, ConfigError, Settings
from koubou_mcp.http_sessions import SessionLimiter
from koubou_mcp.metrics import StoreCollector, build_registry, render
from koubou_mcp.models import TaskStatus
from koubou_mcp.service import (
    MAX_LIST_LIMIT,
    MAX_SYNC_WAIT_S,
    InvalidRequest,
    Service,
    ServiceError,
    StoreUnavailable,
    TaskFinished,
    TaskNotFound,
)

log = logging.getLogger("koubou_mcp.http_api")

#: Room in a request body beyond the prompt itself (the other fields, JSON syntax), bytes
BODY_SLACK_BYTES = 64 * 1024
#: The fields ``POST /task/delegate`` accepts, in the order its errors list them
DELEGATE_FIELDS = ("prompt", "type", "priority", "sync", "timeout_s", "wait_s",
                   "idempotency_key", "workdir", "files", "model", "system", "options",
                   "output_schema")


# -- binding --------------------------------------------------------------------------------

def is_loopback(host: str) -> bool:
    """Whether binding ``host`` only accepts connections from this machine."""
    name = host.strip().strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def check_bind(host: str, token: str) -> None:
    """Refuse to serve beyond this machine without a token (ConfigError says how to fix it)."""
    if token or is_loopback(host):
        return
    raise ConfigError(
        f"refusing to serve HTTP on {host}: it is not a loopback address, and without a token "
        "anyone who can reach the port could run prompts and read every result. Set "
        f"KOUBOU_HTTP_TOKEN to a secret of at least {MIN_HTTP_TOKEN_CHARS} characters (for "
        "example the output of `python3 -c 'import secrets; print(secrets.token_urlsafe(32))'`) "
        "and have clients send `Authorization: Bearer <token>`; or bind 127.0.0.1 (the default)"
    )


def max_body_bytes(settings: Settings) -> int:
    """The largest request body accepted: room for the longest prompt allowed even when every
    character is sent as a ``\\uXXXX`` escape (6 bytes), plus the other fields."""
    return 6 * settings.max_prompt_chars + BODY_SLACK_BYTES


# -- errors ---------------------------------------------------------------------------------

class ApiError(Exception):
    """An answer other than success: its status and a JSON body."""

    def __init__(self, status: int, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.body = {"error": message, **extra}
        self.headers: dict[str, str] = {}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body, status_code=self.status, headers=self.headers)


#: What a 401 says to do: the reply's body is often all the user gets to see
TOKEN_HOWTO = ("send the header `Authorization: Bearer <token>` with the KOUBOU_HTTP_TOKEN the "
               "server was started with; for Claude Code: claude mcp add --transport http koubou "
               "<url>/mcp --header \"Authorization: Bearer <token>\"")

#: Where OAuth clients look for an authorization server (RFC 9728, RFC 8414, OpenID)
OAUTH_DISCOVERY_PREFIXES = ("/.well-known/oauth-protected-resource",
                            "/.well-known/oauth-authorization-server",
                            "/.well-known/openid-configuration")


def _unauthorized(message: str) -> ApiError:
    error = ApiError(401, message, fix=TOKEN_HOWTO)
    error.headers["WWW-Authenticate"] = 'Bearer realm="koubou"'
    return error


#: The HTTP status of each kind of service error
STATUS_OF: dict[type[ServiceError], int] = {
    InvalidRequest: 422, TaskNotFound: 404, TaskFinished: 409, StoreUnavailable: 503,
}


def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
    status = next((code for kind, code in STATUS_OF.items() if isinstance(exc, kind)), 500)
    body: dict[str, Any] = {"error": str(exc)}
    if isinstance(exc, InvalidRequest) and exc.field is not None:
        body["field"] = exc.field
    if isinstance(exc, InvalidRequest) and exc.index is not None:
        body["index"] = exc.index
    if isinstance(exc, TaskNotFound | TaskFinished) and "task_id" in request.path_params:
        body["task_id"] = request.path_params["task_id"]
    return JSONResponse(body, status_code=status)


async def http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own errors (unknown path, wrong method) as JSON like ours."""
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        message = (f"no route {request.url.path}; the API has / (a status page), /health, /task/delegate, "
                   "/task/<id>/status, /task/<id>/cancel, /tasks, /tasks/delegate, /tasks/wait, "
                   "/workers, /metrics and /mcp")
    elif exc.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path}"
    else:
        message = str(exc.detail)
    return JSONResponse({"error": message}, status_code=exc.status_code,
                        headers=dict(exc.headers or {}))


# -- the guard ------------------------------------------------------------------------------

class Guard:
    """ASGI middleware in front of everything: origin checks or the bearer token, then the
    body size limit and deadline, then the cap on MCP sessions per client. See the module
    docstring."""

    def __init__(self, app: ASGIApp, *, token: str, max_body: int, body_timeout_s: float = 10.0,
                 sessions: SessionLimiter | None = None) -> None:
        self.app = app
        self.token = token.encode("utf-8") if token else None
        self.max_body = max_body
        self.body_timeout_s = body_timeout_s
        self.sessions = sessions

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, send)
            return
        if scope["type"] != "http":  # no websockets here
            await send({"type": "websocket.close", "code": 1008})
            return
        headers = Headers(scope=scope)
        if scope["path"].startswith(OAUTH_DISCOVERY_PREFIXES):
            # No OAuth here. Answering these with 401 would start a client's OAuth flow, and
            # the user would never read the 401 that says how to send the token.
            refusal = ApiError(404, "this server does not use OAuth; it takes a bearer token",
                               fix=TOKEN_HOWTO)
            await refusal.response()(scope, receive, send)
            return
        try:
            self._check_caller(headers)
            length = self._declared_length(headers)
            if length != 0 or "transfer-encoding" in headers:
                # Counted as it arrives whatever the framing: a Content-Length beside
                # Transfer-Encoding: chunked (the chunks win) must not slip past the limit,
                # and a body dribbled in byte by byte must not hold the connection for ever.
                receive = _replay(await self._read_capped(receive), receive)
        except ApiError as exc:
            await exc.response()(scope, receive, send)
            return
        if self.sessions is not None and scope["path"].rstrip("/") == "/mcp":
            await self._mcp(scope, receive, send, headers)
            return
        await self.app(scope, receive, send)

    async def _mcp(self, scope: Scope, receive: Receive, send: Send, headers: Headers) -> None:
        """Pass an MCP request on, keeping count of the client's open sessions."""
        assert self.sessions is not None
        limiter = self.sessions
        client = (scope.get("client") or ("?", 0))[0]
        session_id = headers.get("mcp-session-id")
        if session_id is None:
            if scope["method"] == "POST" and not limiter.admit(client, anyio.current_time()):
                error = ApiError(429, f"{client} already has {limiter.per_client} open MCP "
                                      "sessions; end one (DELETE /mcp) or wait for an idle one "
                                      f"to expire ({limiter.idle_s:g} s)")
                error.headers["Retry-After"] = str(max(1, int(limiter.idle_s)))
                await error.response()(scope, receive, send)
                return
            opened: str | None = None

            async def noting_send(message: Message) -> None:
                nonlocal opened
                if message["type"] == "http.response.start" and opened is None:
                    new_id = Headers(raw=message.get("headers", [])).get("mcp-session-id")
                    if new_id is not None:
                        opened = new_id
                        limiter.opened(client, new_id, anyio.current_time())
                await send(message)

            try:
                await self.app(scope, receive, noting_send)
            finally:
                if opened is None and scope["method"] == "POST":
                    limiter.abandoned(client)
            return
        status = 0

        async def status_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        limiter.begin(client, session_id)
        try:
            await self.app(scope, receive, status_send)
        finally:
            limiter.end(client, session_id, anyio.current_time(),
                        closed=scope["method"] == "DELETE" or status == 404)

    def _check_caller(self, headers: Headers) -> None:
        if self.token is None:
            host = headers.get("host", "")
            if not is_loopback(_hostname(host)):
                raise ApiError(421, f"Host {host!r} is not a loopback name: this server only "
                                    "answers requests addressed to a loopback address "
                                    "(127.0.0.1, localhost, [::1], ...) (set KOUBOU_HTTP_TOKEN "
                                    "to serve other names)")
            origin = headers.get("origin")
            if origin is not None and not is_loopback(_hostname(urlsplit(origin).netloc)):
                raise ApiError(403, f"cross-origin request from {origin!r} refused")
            return
        scheme, _, given = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise _unauthorized("this server needs `Authorization: Bearer <token>` with the "
                                "KOUBOU_HTTP_TOKEN it was started with")
        if not hmac.compare_digest(given.strip().encode("latin-1"), self.token):
            raise _unauthorized("wrong bearer token")

    def _declared_length(self, headers: Headers) -> int | None:
        raw = headers.get("content-length")
        if raw is None:
            return None
        try:
            length = int(raw)
        except ValueError:
            raise ApiError(400, f"Content-Length {raw!r} is not a number") from None
        if length > self.max_body:
            raise self._too_large()
        return length

    def _too_large(self) -> ApiError:
        return ApiError(413, f"request body larger than {self.max_body} bytes (6 bytes per "
                             "KOUBOU_MAX_PROMPT_CHARS plus 64 KiB)", limit_bytes=self.max_body)

    async def _read_capped(self, receive: Receive) -> bytes:
        """The whole body, or ApiError 413 past the limit, 408 past the deadline."""
        chunks, size = [], 0
        with anyio.move_on_after(self.body_timeout_s) as deadline:
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    break  # the client went away; the app will see it too
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > self.max_body:
                    raise self._too_large()
                chunks.append(chunk)
                if not message.get("more_body", False):
                    break
        if deadline.cancelled_caught:
            raise ApiError(408, f"the request body did not arrive within "
                                f"{self.body_timeout_s:g} s (KOUBOU_HTTP_HEADER_TIMEOUT)")
        return b"".join(chunks)


def _hostname(authority: str) -> str:
    """The host part of a ``Host`` header or an origin's netloc, lowercase, without brackets
    or port."""
    authority = authority.strip().lower().rsplit("@", 1)[-1]
    if authority.startswith("["):
        return authority[1:].split("]", 1)[0]
    return authority.rsplit(":", 1)[0] if authority.count(":") == 1 else authority


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # then whatever comes next (a disconnect)

    return replay


# -- the REST API ---------------------------------------------------------------------------

Handler = Callable[[Request], Awaitable[Response]]


class Endpoint(NamedTuple):
    path: str
    methods: list[str]
    handler: Handler


def _json_errors(handler: Handler) -> Handler:
    @functools.wraps(handler)
    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except ApiError as exc:
            return exc.response()
        except ServiceError as exc:
            return _service_error(request, exc)

    return wrapped


class RestApi:
    """The seed's REST API over a service (the one the MCP server beside it uses)."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.settings = service.settings
        self._registry = build_registry(StoreCollector(
            service.settings, lambda: service.store, service.pool_health))

    def endpoints(self) -> list[Endpoint]:
        routes = [
            ("/", ["GET"], self.status_page),
            ("/health", ["GET"], self.health),
            ("/task/delegate", ["POST"], self.delegate),
            ("/task/{task_id}/status", ["GET"], self.status),
            ("/task/{task_id}/cancel", ["POST"], self.cancel),
            ("/tasks", ["GET"], self.tasks),
            ("/tasks/delegate", ["POST"], self.delegate_many),
            ("/tasks/wait", ["POST"], self.wait_many),
            ("/workers", ["GET"], self.workers),
            ("/metrics", ["GET"], self.metrics),
        ]
        return [Endpoint(path, methods, _json_errors(fn)) for path, methods, fn in routes]

    # -- routes --------------------------------------------------------------------------
    async def status_page(self, request: Request) -> Response:
        """What ``koubou-mcp top`` shows, as a page that reloads itself."""
        _query(request, ())
        from koubou_mcp import status_page  # rich only loads for whoever opens the page

        try:
            store = self.service.require_store()
        except ServiceError as exc:
            page, ok = status_page.render_page(None, self.service.settings, str(exc)), False
        else:
            page, ok = await anyio.to_thread.run_sync(status_page.current_page, store,
                                                      self.service.settings)
        return HTMLResponse(page, status_code=200 if ok else 503,
                            headers={"Cache-Control": "no-store"})

    async def health(self, request: Request) -> Response:
        _query(request, ())
        document = await self.service.health()
        return JSONResponse(document, status_code=503 if document["status"] == "down" else 200)

    async def delegate(self, request: Request) -> Response:
        body = _fields(await _json_object(request), DELEGATE_FIELDS, "prompt", request)
        fields = {k: v for k, v in body.items() if k not in ("sync", "wait_s")}
        task_request = await self.service.prepare(fields)
        sync = body.get("sync", False)
        if not isinstance(sync, bool):
            raise ApiError(422, f"sync must be true or false, got {_json(sync)}", field="sync")
        wait_s = body.get("wait_s")
        if wait_s is not None and (isinstance(wait_s, bool) or not isinstance(wait_s, int | float)
                                   or not math.isfinite(wait_s)
                                   or not 0 <= wait_s <= MAX_SYNC_WAIT_S):
            raise ApiError(422, f"wait_s must be a number of seconds from 0 to "
                                f"{MAX_SYNC_WAIT_S:g}, got {_json(wait_s)}", field="wait_s")
        self.service.require_store()
        limit = None
        if sync:
            limit = self.service.default_wait_s if wait_s is None else float(wait_s)
        if limit is None:
            result = await self.service.submit(task_request)
            return JSONResponse(result.model_dump(mode="json"))
        return await _unless_gone(request, lambda: self.service.submit(task_request,
                                                                       wait_s=limit))

    async def delegate_many(self, request: Request) -> Response:
        """``{"tasks": [...]}``: all stored, or none (422 with the index of the first bad)."""
        body = _fields(await _json_object(request), ("tasks",), "tasks", request)
        self.service.require_store()
        results = await self.service.submit_many(await self.service.prepare_batch(body["tasks"]))
        return JSONResponse({"task_ids": [r.task_id for r in results],
                             "tasks": [r.model_dump(mode="json") for r in results]})

    async def wait_many(self, request: Request) -> Response:
        """``{"task_ids": [...], "mode": "all"|"any", "wait_s": N}``: the wait_tasks tool."""
        body = _fields(await _json_object(request), ("task_ids", "mode", "wait_s"), "task_ids",
                       request)
        self.service.require_store()
        return await _unless_gone(request, lambda: self.service.wait_many(
            body["task_ids"], body.get("mode", "all"), body.get("wait_s")))

    async def status(self, request: Request) -> Response:
        params = _query(request, ("include_prompt",))
        include_prompt = _flag(params, "include_prompt")
        record = await self.service.read(request.path_params["task_id"],
                                         include_prompt=include_prompt)
        return JSONResponse(record.as_json())

    async def cancel(self, request: Request) -> Response:
        _query(request, ())
        record = await self.service.cancel(request.path_params["task_id"])
        return JSONResponse(record.as_json())

    async def tasks(self, request: Request) -> Response:
        params = _query(request, ("status", "limit"))
        status = params.get("status") or None
        statuses = [s.value for s in TaskStatus]
        if status is not None and status not in statuses:
            raise ApiError(422, f"status must be one of {', '.join(statuses)}, got "
                                f"{status!r}", field="status")
        raw_limit = params.get("limit", "20")
        try:
            limit = int(raw_limit)
        except ValueError:
            limit = 0
        if not 1 <= limit <= MAX_LIST_LIMIT:
            raise ApiError(422, f"limit must be an integer from 1 to {MAX_LIST_LIMIT}, got "
                                f"{raw_limit!r}", field="limit")
        listing = await self.service.list_tasks(status, limit)
        return JSONResponse(listing.model_dump(mode="json"))

    async def workers(self, request: Request) -> Response:
        _query(request, ())
        return JSONResponse(await self.service.workers())

    async def metrics(self, request: Request) -> Response:
        _query(request, ())
        body, content_type = await anyio.to_thread.run_sync(
            render, self._registry, request.headers.get("accept"))
        return Response(body, headers={"Content-Type": content_type})


def _fields(body: dict[str, Any], accepted: tuple[str, ...], required: str,
            request: Request) -> dict[str, Any]:
    """``body`` when it has only ``accepted`` fields and the ``required`` one."""
    unknown = sorted(set(body) - set(accepted))
    if unknown:
        raise ApiError(422, f"unknown field(s) {', '.join(unknown)}; {request.url.path} "
                            f"accepts {', '.join(accepted)}", field=unknown[0])
    if required not in body:
        what = "everything the local model needs" if required == "prompt" else "see docs/http.md"
        raise ApiError(422, f"{required} is required: {what}", field=required)
    return body


async def _unless_gone(request: Request, wait: Callable[[], Awaitable[Any]]) -> Response:
    """The JSON of what ``wait`` returns; a client that goes away meanwhile stops the wait
    (the tasks stay queued) and gets nothing."""
    answer: Response = Response(status_code=499)  # nobody is left to read it
    failed: ServiceError | None = None
    async with anyio.create_task_group() as tg:
        async def watch() -> None:
            # the body is read, so the next message is the client going away
            while (await request.receive())["type"] != "http.disconnect":
                pass
            log.info("the client left during a wait; stopped waiting (the tasks go on)")
            tg.cancel_scope.cancel()

        tg.start_soon(watch)
        try:
            result = await wait()
            data = result.as_json() if hasattr(result, "as_json") else \
                result.model_dump(mode="json")
            answer = JSONResponse(data)
        except ServiceError as exc:  # raised out here, not wrapped in the group's exceptions
            failed = exc
        tg.cancel_scope.cancel()
    if failed is not None:
        raise failed
    return answer


async def _json_object(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if not raw.strip():
        raise ApiError(400, 'the body is empty; send a JSON object such as {"prompt": "..."}')
    try:
        data = json.loads(raw, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise ApiError(400, f"the body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the body must be a JSON object, got {_kind(data)}")
    return data


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _query(request: Request, allowed: tuple[str, ...]) -> QueryParams:
    params = request.query_params
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        accepted = ", ".join(allowed) if allowed else "none"
        raise ApiError(422, f"unknown query parameter(s) {', '.join(unknown)}; "
                            f"{request.url.path} accepts {accepted}", field=unknown[0])
    return params


def _flag(params: QueryParams, name: str) -> bool:
    raw = params.get(name, "false").lower()
    if raw not in ("true", "false", "1", "0"):
        raise ApiError(422, f"{name} must be true or false, got {raw!r}", field=name)
    return raw in ("true", "1")


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "true/false",
            type(None): "null"}.get(type(value), "a number")


def _json(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def guarded(app: ASGIApp, settings: Settings) -> Guard:
    """``app`` (a Starlette application carrying the API's routes) answering Starlette's own
    errors as JSON, behind the guard for ``settings``."""
    app.add_exception_handler(HTTPException, http_error)  # type: ignore[attr-defined]
    return Guard(app, token=settings.http_token, max_body=max_body_bytes(settings),
                 body_timeout_s=settings.http_header_timeout_s,
                 sessions=SessionLimiter(settings.http_sessions_per_client,
                                         settings.http_session_idle_s))


__all__ = ["STATUS_OF", "ApiError", "Guard", "RestApi", "check_bind", "guarded", "http_error",
           "is_loopback", "max_body_bytes"]
