"""A one-purpose HTTP server on a real socket that answers every request with scripted bytes.

For the replies the stand-in Ollama does not produce on purpose (a thinking model's chunks, an
error line mid-stream, a stream without its final chunk): the client under test reads them
over a real TCP connection, framing and keep-alive included. It counts the connections it
accepted, so a test can tell whether a client kept its connection alive.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager


def chunked(body: bytes, *, end: bool = True) -> bytes:
    """``body`` in chunked transfer encoding (one chunk per line), with the zero chunk when
    ``end``."""
    out = bytearray()
    for line in body.splitlines(keepends=True):
        out += f"{len(line):X}\r\n".encode() + line + b"\r\n"
    if end:
        out += b"0\r\n\r\n"
    return bytes(out)


def ndjson_stream(*chunks: dict[str, object]) -> bytes:
    """A 200 reply streaming these NDJSON chunks, as Ollama streams ``/api/chat``."""
    body = b"".join(json.dumps(chunk).encode() + b"\n" for chunk in chunks)
    return (b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n" + chunked(body))


def json_reply(data: object, status: str = "200 OK") -> bytes:
    body = json.dumps(data).encode()
    return (f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


class ScriptedServer:
    """Answers each request with ``reply``; ``close_after_reply`` drops the connection after
    each answer (as a server whose keep-alive ran out)."""

    def __init__(self, reply: bytes, *, close_after_reply: bool = False) -> None:
        self.reply = reply
        self.close_after_reply = close_after_reply
        self.connections = 0
        self.requests = 0
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            buffer = b""
            while True:
                while b"\r\n\r\n" not in buffer:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buffer += data
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value.strip())
                while len(buffer) < length:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buffer += data
                buffer = buffer[length:]
                self.requests += 1
                conn.sendall(self.reply)
                if self.close_after_reply:
                    return

    def close(self) -> None:
        self._stop.set()
        self._sock.close()


@contextmanager
def scripted(reply: bytes, **kwargs: bool) -> Iterator[ScriptedServer]:
    server = ScriptedServer(reply, **kwargs)
    try:
        yield server
    finally:
        server.close()


@contextmanager
def full_backlog() -> Iterator[str]:
    """The URL of a listener whose accept queue is full: connecting there times out (the
    kernel drops the SYN), as with a host that does not answer."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    fillers: list[socket.socket] = []
    try:
        for _ in range(4):  # a backlog of 0 still queues one or two; fill it for certain
            filler = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            filler.setblocking(False)
            try:
                filler.connect(listener.getsockname())
            except BlockingIOError:
                pass
            fillers.append(filler)
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        for filler in fillers:
            filler.close()
        listener.close()
