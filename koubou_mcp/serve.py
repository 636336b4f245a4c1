"""Running koubou-mcp's transports until a stop signal: MCP over stdio (what Claude Code
starts), or Streamable HTTP with uvicorn (MCP at ``/mcp`` beside the REST API and
``/metrics`` of ``http_api``, behind its ``Guard``); signals, a bounded shutdown, and the
watchdog that ends the process should shutting down hang.

Signal handlers only set flags here (anyio's signal receiver, uvicorn's ``should_exit``): the
first SIGTERM/SIGINT/SIGHUP drains, a second one forces.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any

import anyio

from koubou_mcp.config import ConfigError, Settings
from koubou_mcp.server import build_server, http_app
from koubou_mcp.service import Service

log = logging.getLogger("koubou_mcp.serve")

#: After a stop signal, how long the server may take to shut down before it exits anyway, s
SHUTDOWN_GRACE_S = 1.5
#: After a stop signal, how long open HTTP requests (a sync wait, an MCP stream) may go on, s
HTTP_DRAIN_S = 3.0


def run_server(settings: Settings, *, pool: bool = True, transport: str = "stdio",
               host: str = "127.0.0.1", port: int = 8765) -> None:
    """Serve MCP on stdio or streamable HTTP until the client goes away or a stop signal
    arrives."""
    if transport == "stdio":
        server = build_server(settings, pool=pool)
        anyio.run(_serve_until_signal, server.run_stdio_async, server.service.stopped)
    elif transport == "streamable-http":
        serve_http(settings, pool=pool, host=host, port=port)
    else:
        raise ValueError(f"unknown transport {transport!r}; use stdio or streamable-http")


# -- stdio --------------------------------------------------------------------------------

async def _serve_until_signal(serve: Callable[[], Awaitable[None]],
                              cleaned_up: threading.Event | None = None) -> None:
    """Run ``serve``; on SIGTERM/SIGINT/SIGHUP stop it (its lifespan cleans up).

    The stdio transport reads stdin in a thread that a cancellation cannot interrupt (Ctrl-C
    in a terminal leaves stdin open), so after a stop signal a watchdog ends the process as
    soon as the lifespan has cleaned up (``cleaned_up``), quietly, or after
    ``SHUTDOWN_GRACE_S`` with a warning.
    """
    async with anyio.create_task_group() as tg:
        async def watch() -> None:
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT,
                                            signal.SIGHUP) as signals:
                async for signum in signals:
                    log.info("received %s: shutting down", signal.Signals(signum).name)
                    _arm_watchdog(SHUTDOWN_GRACE_S, cleaned_up)
                    tg.cancel_scope.cancel()
                    return

        tg.start_soon(watch)
        await serve()
        tg.cancel_scope.cancel()


def _arm_watchdog(delay_s: float, cleaned_up: threading.Event | None = None) -> None:
    """End the process ``delay_s`` from now, or as soon as ``cleaned_up`` is set."""
    done = cleaned_up if cleaned_up is not None else threading.Event()

    def expire() -> None:
        if done.wait(delay_s):
            log.info("shut down cleanly")
        else:
            log.warning("shutdown took longer than %.1f s; exiting now", delay_s)
        for handler in logging.getLogger().handlers:
            with suppress(Exception):
                handler.flush()
        with suppress(Exception):
            sys.stderr.flush()
        os._exit(0)

    threading.Thread(target=expire, name="shutdown-watchdog", daemon=True).start()


# -- Streamable HTTP ----------------------------------------------------------------------

def _http_api() -> Any:
    """The HTTP modules, or a ConfigError saying what is missing. All of it is a core
    dependency (uvicorn and starlette come with ``mcp``): missing means a broken install."""
    try:
        import uvicorn  # noqa: F401

        from koubou_mcp import http_api
    except ImportError as exc:
        raise ConfigError(f"the HTTP transport needs {exc.name}, which is not installed; the "
                          "install is incomplete: reinstall koubou-mcp (in a checkout: pip install -e .)"
                          ) from None
    return http_api


def build_http_app(settings: Settings, *, pool: bool = True) -> Any:
    """One ASGI application for the HTTP transport: MCP at ``/mcp`` and the REST API and
    ``/metrics`` (``http_api``) beside it, over one service, on one Starlette app whose
    lifespan is the MCP server's, all behind ``http_api.Guard`` (token or loopback checks,
    body size limit)."""
    http_api = _http_api()
    service = Service(settings, run_pool=pool)
    server = build_server(settings, pool=pool, service=service)
    limit = http_api.max_body_bytes(settings)
    app = http_app(server, http_api.RestApi(service).endpoints(), max_body=limit,
                   session_idle_s=settings.http_session_idle_s)
    return http_api.guarded(app, settings)


def serve_http(settings: Settings, *, pool: bool, host: str, port: int) -> None:
    """Serve the HTTP transport until SIGTERM/SIGINT/SIGHUP (a second one forces).

    Refuses (ConfigError) to bind a non-loopback address without ``KOUBOU_HTTP_TOKEN``, and
    binds before anything starts, so a port in use is reported before a pool is spawned.
    """
    http_api = _http_api()
    import uvicorn

    from koubou_mcp.http_conn import protocol_options

    http_api.check_bind(host, settings.http_token)
    app = build_http_app(settings, pool=pool)
    sock = listen(host, port)
    config = uvicorn.Config(
        app, log_config=None, log_level=settings.log_level.lower(), lifespan="on", ws="none",
        access_log=settings.log_level == "DEBUG", server_header=False,
        timeout_graceful_shutdown=int(HTTP_DRAIN_S),
        **protocol_options(settings.http_max_connections, settings.http_header_timeout_s),
    )
    where = f"[{host}]" if ":" in host else host
    log.info("serving MCP at http://%s:%d/mcp, the REST API and /metrics (%s)", where, port,
             "bearer token required" if settings.http_token else "loopback only, no token")
    try:
        anyio.run(_serve_uvicorn, config, sock)
    finally:
        sock.close()


async def _serve_uvicorn(config: Any, sock: socket.socket) -> None:
    """Run uvicorn on ``sock``, stopping on SIGTERM/SIGINT/SIGHUP like the stdio server: the
    first signal drains (open requests get ``HTTP_DRAIN_S``, then the lifespan stops the pool),
    a second one forces. uvicorn's own handling would re-raise the signal after a clean
    shutdown, so the process would seem killed; here it exits 0."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield  # the watcher below handles the signals

    server = Server(config)
    async with anyio.create_task_group() as tg:
        async def watch() -> None:
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT,
                                            signal.SIGHUP) as signals:
                async for signum in signals:
                    name = signal.Signals(signum).name
                    if server.should_exit:
                        log.warning("received %s again: stopping now", name)
                        server.force_exit = True
                        continue
                    log.info("received %s: shutting down", name)
                    server.should_exit = True
                    _arm_watchdog(HTTP_DRAIN_S + SHUTDOWN_GRACE_S + 5.0)

        tg.start_soon(watch)
        await server.serve(sockets=[sock])
        tg.cancel_scope.cancel()


def listen(host: str, port: int) -> socket.socket:
    """A listening, non-blocking socket on ``host:port``, or a ConfigError saying what to
    change."""
    sock = None
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        if sock is not None:
            sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; is another "
                          "server using it? Choose another --port (KOUBOU_HTTP_PORT) or "
                          "--host (KOUBOU_HTTP_HOST)") from None
    sock.setblocking(False)
    return sock


__all__ = ["HTTP_DRAIN_S", "SHUTDOWN_GRACE_S", "build_http_app", "listen", "run_server",
           "serve_http"]
