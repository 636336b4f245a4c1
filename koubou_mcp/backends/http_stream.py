"""A blocking HTTP/1.1 POST whose reply is read as it streams, and that another thread can abort.

The worker's hot path: one kept-alive connection per model server, the standard library's
``http.client`` (a fraction of the CPU an async client spends per request, see
docs/benchmarks.md), and an abort that works from any thread or a signal handler: it shuts
the socket down, so the reading thread's blocking ``recv`` returns at once and the model
server sees the client leave (Ollama then stops generating and frees its slot).

Failures are raised as the few transport outcomes a caller words for its user (``Refused``,
``NoReply``, ``Stalled``, ``Garbled``); an aborted call raises ``Aborted``. No proxy
variables are honoured: the model server is addressed directly.
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import select
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit


class TransportError(Exception):
    """The request failed below HTTP semantics."""


class BadURL(TransportError):
    """The base URL cannot be used (scheme, host or port)."""


class Refused(TransportError):
    """No connection could be made (refused, unknown host, connect timeout)."""


class NoReply(TransportError):
    """Connected, but the server closed the connection or went silent before the status line.

    ``timed_out``: silent for longer than the read timeout (rather than closed)."""

    def __init__(self, message: str, *, timed_out: bool) -> None:
        super().__init__(message)
        self.timed_out = timed_out


class Stalled(TransportError):
    """The reply started, then nothing arrived for longer than the read timeout."""


class Garbled(TransportError):
    """The reply started, then broke off or could not be decoded (HTTP framing)."""


class Aborted(Exception):
    """The call was aborted from outside (``Abort.fire``)."""


class Abort:
    """Stops a blocking call from another thread or a signal handler.

    ``fire`` runs the hooks the call registered (shutting its socket down); a hook registered
    after ``fire`` runs at once. Hooks must be safe to run twice; firing twice is harmless.
    """

    def __init__(self) -> None:
        # reentrant: a signal handler may fire in the thread that is registering a hook
        self._lock = threading.RLock()
        self._fired = False
        self._hooks: list[Callable[[], None]] = []

    @property
    def fired(self) -> bool:
        return self._fired

    def fire(self) -> None:
        with self._lock:
            self._fired = True
            hooks, self._hooks = self._hooks, []
        for hook in hooks:
            hook()

    def hook(self, action: Callable[[], None]) -> Callable[[], None]:
        """Run ``action`` when fired (at once if already fired); returns the unhooking call."""
        with self._lock:
            self._hooks.append(action)
            fired = self._fired  # read after appending: a fire in between ran it already
        if fired:
            action()

        def unhook() -> None:
            with self._lock:
                if action in self._hooks:
                    self._hooks.remove(action)

        return unhook


@dataclass(frozen=True)
class Endpoint:
    """Where a base URL points: scheme, host, port and path prefix."""

    https: bool
    host: str
    port: int
    prefix: str

    @classmethod
    def parse(cls, url: str) -> Endpoint:
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise BadURL(str(exc)) from None
        if parts.scheme not in ("http", "https"):
            raise BadURL(f"the scheme must be http or https, not {parts.scheme or 'none'!r}")
        if not parts.hostname:
            raise BadURL("it names no host")
        default = 443 if parts.scheme == "https" else 80
        return cls(parts.scheme == "https", parts.hostname, port or default,
                   parts.path.rstrip("/"))


@dataclass(frozen=True)
class Reply:
    """A reply whose status line and headers arrived; read the body with ``chunks``."""

    status: int
    response: http.client.HTTPResponse

    def chunks(self, size: int = 65536) -> Iterator[bytes]:
        """The body as it arrives (chunked transfer decoded), until its end."""
        try:
            while chunk := self.response.read1(size):
                yield chunk
        except TimeoutError:
            raise Stalled("no data for longer than the read timeout") from None
        except (http.client.HTTPException, OSError, ValueError) as exc:
            raise Garbled(f"{type(exc).__name__}: {exc}") from None


class StreamingClient:
    """Blocking POSTs to one server over one kept-alive connection (one caller at a time)."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self._conn: http.client.HTTPConnection | None = None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    @contextlib.contextmanager
    def post(self, path: str, body: bytes, *, connect_timeout_s: float, read_timeout_s: float,
             abort: Abort) -> Iterator[Reply]:
        """POST ``body`` and yield the reply once (a generator used as a context: the
        connection is kept for the next request only when the body was read to its end)."""
        endpoint = Endpoint.parse(self.base_url)
        for attempt in range(2):
            conn, reused = self._connection(endpoint, connect_timeout_s)
            sock = conn.sock
            unhook = abort.hook(functools.partial(_shutdown, sock))
            finished = False
            try:
                try:
                    sock.settimeout(read_timeout_s)
                    conn.request("POST", endpoint.prefix + path, body=body,
                                 headers={"Content-Type": "application/json"})
                    response = conn.getresponse()
                except TimeoutError:
                    raise NoReply("no reply within the read timeout", timed_out=True) from None
                except (http.client.HTTPException, OSError) as exc:
                    if abort.fired:
                        raise Aborted() from None
                    if reused and attempt == 0:
                        # the server had closed the idle kept-alive connection: send anew
                        self.close()
                        continue
                    raise NoReply(f"{type(exc).__name__}: {exc}", timed_out=False) from None
                reply = Reply(response.status, response)
                try:
                    yield reply
                except (Stalled, Garbled):
                    if abort.fired:
                        raise Aborted() from None
                    raise
                finished = response.isclosed() and not response.will_close
                return
            finally:
                unhook()
                if not finished:  # a reply not read to its end leaves the connection unusable
                    self.close()
        raise AssertionError("unreachable")  # pragma: no cover

    def _connection(self, endpoint: Endpoint,
                    connect_timeout_s: float) -> tuple[http.client.HTTPConnection, bool]:
        """The kept-alive connection when it is still good, else a new one."""
        if self._conn is not None and self._conn.sock is not None and _idle_ok(self._conn.sock):
            return self._conn, True
        self.close()
        cls = http.client.HTTPSConnection if endpoint.https else http.client.HTTPConnection
        conn = cls(endpoint.host, endpoint.port, timeout=connect_timeout_s)
        try:
            conn.connect()
            conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise Refused(f"{type(exc).__name__}: {exc}") from None
        self._conn = conn
        return conn, False


def _idle_ok(sock: socket.socket) -> bool:
    """An idle kept-alive connection is usable when it has nothing to read: readable means
    the server closed it (or sent something unasked for)."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return False
    return not readable


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed: nothing is blocked on it
