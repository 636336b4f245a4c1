"""A blocking HTTP/1.1 POST whose reply is read as it streams, and that another thread can abort.

The worker's hot path: one kept-alive connection per model server, HTTP/1.1 spoken directly on
the socket, and an abort that works from any thread or a signal handler: it shuts the socket
down, so the reading thread's blocking ``recv`` returns at once and the model server sees the
client leave (Ollama then stops generating and frees its slot).

The client speaks only what a POST to a model server needs: one request with a
``Content-Length`` body, and a reply framed by ``Transfer-Encoding: chunked``, a
``Content-Length`` or the connection's end. The standard library's ``http.client`` spent a
third of a worker's CPU per task, most of it parsing the reply's headers as an e-mail message
(docs/benchmarks.md has the profile); an async client spends several times more.

Failures are raised as the few transport outcomes a caller words for its user (``Refused``,
``NoReply``, ``Stalled``, ``Garbled``); an aborted call raises ``Aborted``. No proxy
variables are honoured: the model server is addressed directly.
"""

from __future__ import annotations

import contextlib
import functools
import select
import socket
import ssl
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

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host  # an IPv6 literal
        default = 443 if self.https else 80
        return host if self.port == default else f"{host}:{self.port}"


#: the most a reply's status line and headers may take, bytes (Ollama sends a few hundred)
MAX_HEAD_BYTES = 64 * 1024
#: the most a chunk-size line or a trailer line may take, bytes
MAX_LINE_BYTES = 4096
_READ_SIZE = 65536


class _Closed(Exception):
    """The peer closed the connection (``recv`` returned nothing)."""


class _Wire:
    """Buffered reads from a socket: lines, exact lengths, or what has arrived."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = bytearray()

    def _fill(self) -> None:
        data = self.sock.recv(_READ_SIZE)
        if not data:
            raise _Closed()
        self.buffer += data

    def until(self, marker: bytes, limit: int) -> bytes:
        """The bytes up to ``marker`` (dropped), waiting for more as needed."""
        start = 0
        while (at := self.buffer.find(marker, start)) < 0:
            if len(self.buffer) > limit:
                raise Garbled(f"a line or header block longer than {limit} bytes")
            start = max(0, len(self.buffer) - len(marker) + 1)
            self._fill()
        if at > limit:
            raise Garbled(f"a line or header block longer than {limit} bytes")
        out = bytes(self.buffer[:at])
        del self.buffer[:at + len(marker)]
        return out

    def some(self, most: int) -> bytes:
        """Up to ``most`` bytes: those already here, else those of the next ``recv``."""
        if not self.buffer:
            self._fill()
        out = bytes(self.buffer[:most])
        del self.buffer[:most]
        return out

    def exactly(self, count: int) -> bytes:
        while len(self.buffer) < count:
            self._fill()
        out = bytes(self.buffer[:count])
        del self.buffer[:count]
        return out


@dataclass
class Reply:
    """A reply whose status line and headers arrived; read the body with ``chunks``."""

    status: int
    headers: dict[str, str]
    _wire: _Wire
    #: the body's framing: "chunked", "length" or "close" (until the connection ends)
    _framing: str
    _length: int = 0
    #: the body was read to its end
    complete: bool = False
    #: the server will close the connection after this reply (or the framing needs it to)
    will_close: bool = False

    def chunks(self) -> Iterator[bytes]:
        """The body as it arrives (chunked transfer decoded), until its end."""
        try:
            if self._framing == "chunked":
                yield from self._chunked()
            elif self._framing == "length":
                left = self._length
                while left > 0:
                    piece = self._wire.some(min(left, _READ_SIZE))
                    left -= len(piece)
                    yield piece
            else:
                while True:
                    try:
                        yield self._wire.some(_READ_SIZE)
                    except _Closed:
                        break
            self.complete = True
        except TimeoutError:
            raise Stalled("no data for longer than the read timeout") from None
        except _Closed:
            raise Garbled("the connection closed before the reply's end") from None
        except OSError as exc:
            raise Garbled(f"{type(exc).__name__}: {exc}") from None

    def _chunked(self) -> Iterator[bytes]:
        wire = self._wire
        while True:
            line = wire.until(b"\r\n", MAX_LINE_BYTES)
            size_text = line.split(b";", 1)[0].strip()  # chunk extensions are ignored
            try:
                size = int(size_text, 16)
            except ValueError:
                raise Garbled(f"a bad chunk size line {line[:40]!r}") from None
            if size < 0:
                raise Garbled(f"a bad chunk size line {line[:40]!r}")
            if size == 0:
                while wire.until(b"\r\n", MAX_LINE_BYTES):  # trailers, up to the empty line
                    pass
                return
            left = size
            while left > 0:
                piece = wire.some(left)
                left -= len(piece)
                yield piece
            if wire.exactly(2) != b"\r\n":
                raise Garbled("a chunk not followed by CRLF")


def _read_head(wire: _Wire) -> tuple[int, str, dict[str, str]]:
    """Status, HTTP version and headers (lower-cased names) of the next reply, 1xx skipped."""
    while True:
        head = wire.until(b"\r\n\r\n", MAX_HEAD_BYTES)
        status_line, *lines = head.decode("latin-1").split("\r\n")
        version, _, rest = status_line.partition(" ")
        code = rest[:3]
        if not version.startswith("HTTP/1.") or not code.isdigit() or len(code) != 3:
            raise Garbled(f"not an HTTP/1.x status line: {status_line[:60]!r}")
        headers: dict[str, str] = {}
        for line in lines:
            name, sep, value = line.partition(":")
            if not sep or not name or name != name.strip():
                raise Garbled(f"a malformed header line {line[:60]!r}")
            key = name.lower()
            value = value.strip()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        status = int(code)
        if 100 <= status < 200 and status != 101:
            continue  # an interim reply (100 Continue): the real one follows
        return status, version, headers


def _reply(wire: _Wire) -> Reply:
    """The reply to a POST: its status, headers and how its body is framed."""
    status, version, headers = _read_head(wire)
    connection = headers.get("connection", "").lower()
    will_close = "close" in connection or (version == "HTTP/1.0" and "keep-alive" not in connection)
    encoding = headers.get("transfer-encoding", "").lower()
    if status in (204, 304):
        return Reply(status, headers, wire, "length", 0, will_close=will_close)
    if encoding:
        # chunked must be the last coding (RFC 9112 6.3); anything else reads until the end
        if encoding.rsplit(",", 1)[-1].strip() == "chunked":
            return Reply(status, headers, wire, "chunked", will_close=will_close)
        return Reply(status, headers, wire, "close", will_close=True)
    if "content-length" in headers:
        text = headers["content-length"]
        values = {v.strip() for v in text.split(",")}
        if len(values) != 1 or not next(iter(values)).isdigit():
            raise Garbled(f"a bad Content-Length {text[:40]!r}")
        return Reply(status, headers, wire, "length", int(next(iter(values))),
                     will_close=will_close)
    return Reply(status, headers, wire, "close", will_close=True)


@dataclass
class _Connection:
    sock: socket.socket
    wire: _Wire

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


#: kept-alive connections a client keeps idle (a worker makes one call at a time)
MAX_IDLE_CONNECTIONS = 2


class StreamingClient:
    """Blocking POSTs to one server over kept-alive connections. Calls from several threads
    at once each get a connection of their own."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self._idle: list[_Connection] = []
        self._lock = threading.Lock()

    def close(self) -> None:
        """Close the idle connections (a call in progress closes its own when it ends)."""
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    @contextlib.contextmanager
    def post(self, path: str, body: bytes, *, connect_timeout_s: float, read_timeout_s: float,
             abort: Abort) -> Iterator[Reply]:
        """POST ``body`` and yield the reply once (a generator used as a context: the
        connection is kept for the next request only when the body was read to its end)."""
        endpoint = Endpoint.parse(self.base_url)
        head = (f"POST {endpoint.prefix}{path} HTTP/1.1\r\nHost: {endpoint.host_header}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                "Accept-Encoding: identity\r\n\r\n").encode("latin-1")
        for attempt in range(2):
            conn, reused = self._connection(endpoint, connect_timeout_s)
            unhook = abort.hook(functools.partial(_shutdown, conn.sock))
            finished = False
            try:
                try:
                    conn.sock.settimeout(read_timeout_s)
                    conn.sock.sendall(head + body)
                    reply = _reply(conn.wire)
                except TimeoutError:
                    raise NoReply("no reply within the read timeout", timed_out=True) from None
                except (_Closed, OSError) as exc:
                    if abort.fired:
                        raise Aborted() from None
                    if reused and attempt == 0 and not conn.wire.buffer:
                        # the server had closed the idle kept-alive connection: send anew
                        continue
                    why = "the server closed the connection" if isinstance(exc, _Closed) \
                        else f"{type(exc).__name__}: {exc}"
                    raise NoReply(why, timed_out=False) from None
                except Garbled:
                    if abort.fired:
                        raise Aborted() from None
                    raise
                try:
                    yield reply
                except (Stalled, Garbled):
                    if abort.fired:
                        raise Aborted() from None
                    raise
                finished = reply.complete and not reply.will_close and not conn.wire.buffer
                return
            finally:
                unhook()
                if finished:
                    self._give_back(conn)
                else:  # a reply not read to its end leaves the connection unusable
                    conn.close()
        raise AssertionError("unreachable")  # pragma: no cover

    def _connection(self, endpoint: Endpoint,
                    connect_timeout_s: float) -> tuple[_Connection, bool]:
        """An idle kept-alive connection that is still good, else a new one."""
        with self._lock:
            while self._idle:
                conn = self._idle.pop()
                if _idle_ok(conn.sock):
                    return conn, True
                conn.close()
        try:
            sock = socket.create_connection((endpoint.host, endpoint.port),
                                            timeout=connect_timeout_s)
        except OSError as exc:
            raise Refused(f"{type(exc).__name__}: {exc}") from None
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if endpoint.https:
                sock = ssl.create_default_context().wrap_socket(sock,
                                                                server_hostname=endpoint.host)
        except OSError as exc:  # ssl.SSLError is an OSError
            sock.close()
            raise Refused(f"{type(exc).__name__}: {exc}") from None
        return _Connection(sock, _Wire(sock)), False

    def _give_back(self, conn: _Connection) -> None:
        with self._lock:
            if len(self._idle) < MAX_IDLE_CONNECTIONS:
                self._idle.append(conn)
                return
        conn.close()


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
