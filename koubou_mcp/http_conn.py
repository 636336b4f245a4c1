"""Limits on the HTTP transport's connections, below the application: how many may be open at
once, and how long a request's headers may take to arrive.

uvicorn arms its keep-alive timer only after a response, and any byte received disarms it, so a
client that connects and sends nothing, or one header byte now and then, would hold its socket
(and a file descriptor) for ever; enough of them and nobody else can connect. Here every
connection must deliver a request's complete headers within ``header_timeout_s`` of connecting
(or of the previous response), and past ``max_connections`` open connections a new one is
answered 503 and closed at once. The body has its own deadline in ``http_api.Guard``.

Imported only by the HTTP transport (it needs uvicorn).
"""

from __future__ import annotations

import asyncio
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
         b"connection: close\r\ncontent-length: 49\r\n\r\n"
         b'{"error": "too many open connections; try again"}')


def bounded_protocol(max_connections: int, header_timeout_s: float) -> type[asyncio.Protocol]:
    """uvicorn's h11 protocol with a connection cap and a header deadline (for ``http=``)."""

    class BoundedH11Protocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                self.transport.write(_BUSY)
                self.transport.close()
                return
            self._arm_header_deadline()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:  # a request's headers are all in
                self._disarm_header_deadline()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
                self._arm_header_deadline()  # the next request on this connection, too

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm_header_deadline()
            super().connection_lost(exc)

        def _arm_header_deadline(self) -> None:
            self._disarm_header_deadline()
            self._header_timer = self.loop.call_later(header_timeout_s, self._headers_too_slow)

        def _disarm_header_deadline(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()  # idle or half-open: nothing to answer

    return BoundedH11Protocol


def protocol_options(max_connections: int, header_timeout_s: float) -> dict[str, Any]:
    """The ``uvicorn.Config`` options that apply these limits."""
    return {"http": bounded_protocol(max_connections, header_timeout_s)}


__all__ = ["bounded_protocol", "protocol_options"]
