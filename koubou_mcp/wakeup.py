"""Waking idle workers when work arrives, without busy polling.

Polling the database every few milliseconds would make dispatch fast but burn CPU while idle;
polling every second keeps the CPU quiet but adds up to a second of latency. Instead each idle
waiter blocks on a wake-up channel and polls only as a safety net (wake-ups can be lost):

* SQLite (one machine): each waiter owns a named pipe (FIFO) under ``$KOUBOU_HOME/run/wake/``;
  ``notify`` writes one byte into every pipe. A pipe nobody reads any more is removed.
* PostgreSQL (many machines): ``LISTEN``/``NOTIFY`` on one channel. The two statements come
  from ``store`` (only the store and the queue write SQL); this module only runs them.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import stat
import time
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import Engine, Executable

from koubou_mcp.config import make_private_dir

log = logging.getLogger(__name__)


class Listener(Protocol):
    def wait(self, timeout_s: float) -> bool:
        """Block until woken or ``timeout_s`` passes. True when woken."""
        ...

    def poke(self) -> None:
        """Wake this listener's own ``wait`` (from a signal handler or another thread)."""
        ...

    def close(self) -> None: ...


class Wakeup(Protocol):
    def notify(self) -> None:
        """Wake every listener."""
        ...

    def listen(self, name: str) -> Listener: ...


class FifoListener:
    def __init__(self, path: Path) -> None:
        self.path = path
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        os.mkfifo(path, 0o600)
        # O_RDWR: the pipe always has a writer (us), so select never reports a spurious EOF.
        self._fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)

    def fileno(self) -> int:
        return self._fd

    def wait(self, timeout_s: float) -> bool:
        try:
            ready, _, _ = select.select([self._fd], [], [], max(timeout_s, 0.0))
        except InterruptedError:
            ready = []
        if ready:
            self.drain()
            return True
        return False

    def drain(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            while os.read(self._fd, 4096):
                pass

    def poke(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._fd, b"!")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


class FifoWakeup:
    """Wake-ups through named pipes in one directory (same machine only)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def notify(self) -> None:
        try:
            entries = list(os.scandir(self.directory))
        except FileNotFoundError:
            return
        for entry in entries:
            if not entry.name.endswith(".fifo"):
                continue
            try:
                fd = os.open(entry.path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # nobody reads it: its owner is gone
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.path)
                continue
            try:
                os.write(fd, b"w")
            except BlockingIOError:
                pass  # the pipe is full of wake-ups already
            finally:
                os.close(fd)

    def listen(self, name: str) -> FifoListener:
        make_private_dir(self.directory)
        path = self.directory / f"{name}.fifo"
        if path.exists() and not stat.S_ISFIFO(path.stat().st_mode):
            raise RuntimeError(f"{path} exists and is not a pipe")
        return FifoListener(path)


class PostgresListener:
    """A dedicated connection that LISTENs; ``poke`` wakes it through a local pipe.

    The connection can be lost at any time (``pg_terminate_backend``, a restart, a failover).
    ``wait`` then never raises: it logs once, and until a reconnect succeeds (tried at most
    every ``backoff_s``, doubling up to ``max_backoff_s``) it sleeps out its timeout like the
    poll fallback, still ending early on a poke.
    """

    def __init__(self, engine: Engine, listen: str, *, backoff_s: float = 0.5,
                 max_backoff_s: float = 30.0) -> None:
        self._dsn = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        self._listen = listen
        self._backoff_s = self._first_backoff_s = backoff_s
        self._max_backoff_s = max_backoff_s
        self._retry_at = 0.0
        self._lost = False
        self._pipe_r, self._pipe_w = os.pipe()
        os.set_blocking(self._pipe_r, False)
        os.set_blocking(self._pipe_w, False)
        self._conn: Any = None
        try:
            self._conn = self._connect()
        except BaseException:
            self._close_pipe()
            raise

    def _connect(self) -> Any:
        import psycopg  # only needed with PostgreSQL

        conn = psycopg.connect(self._dsn, autocommit=True, connect_timeout=5)
        try:
            conn.execute(self._listen)
        except BaseException:
            conn.close()
            raise
        return conn

    @property
    def connected(self) -> bool:
        return self._conn is not None

    def backend_pid(self) -> int | None:
        """The server process of the listening connection (None while it is lost)."""
        return None if self._conn is None else int(self._conn.info.backend_pid)

    def wait(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + max(timeout_s, 0.0)
        if self._conn is None and time.monotonic() >= self._retry_at:
            self._reconnect()
        try:
            if self._conn is None:
                return self._sleep_on_pipe(deadline)
            return self._wait_listening(deadline)
        except Exception as exc:  # the connection broke: a wake-up is an optimisation
            self._lose(exc)
            return self._sleep_on_pipe(deadline)

    def _wait_listening(self, deadline: float) -> bool:
        conn = self._conn
        try:
            ready, _, _ = select.select([conn.pgconn.socket, self._pipe_r], [], [],
                                        max(deadline - time.monotonic(), 0.0))
        except InterruptedError:
            return False
        woken = self._pipe_r in ready and self._drain_pipe()
        if ready:
            # consume whatever notifications arrived, without blocking; a closed connection
            # shows as a readable socket and raises here
            for _ in conn.notifies(timeout=0, stop_after=1000):
                woken = True
        return woken

    def _sleep_on_pipe(self, deadline: float) -> bool:
        try:
            ready, _, _ = select.select([self._pipe_r], [], [],
                                        max(deadline - time.monotonic(), 0.0))
        except InterruptedError:
            return False
        return bool(ready) and self._drain_pipe()

    def _drain_pipe(self) -> bool:
        with contextlib.suppress(BlockingIOError):
            while os.read(self._pipe_r, 4096):
                pass
        return True

    def _lose(self, exc: BaseException) -> None:
        if not self._lost:
            log.warning("wake-up listener lost its PostgreSQL connection (%s); polling until "
                        "it is back", str(exc).strip() or type(exc).__name__)
        self._lost = True
        with contextlib.suppress(Exception):
            self._conn.close()
        self._conn = None
        self._retry_at = time.monotonic() + self._backoff_s
        self._backoff_s = min(self._backoff_s * 2, self._max_backoff_s)

    def _reconnect(self) -> None:
        try:
            self._conn = self._connect()
        except Exception as exc:
            self._lose(exc)
            return
        log.info("wake-up listener reconnected to PostgreSQL")
        self._lost = False
        self._backoff_s = self._first_backoff_s

    def poke(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._pipe_w, b"!")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            if self._conn is not None:
                self._conn.close()
        self._conn = None
        self._close_pipe()

    def _close_pipe(self) -> None:
        for fd in (self._pipe_r, self._pipe_w):
            with contextlib.suppress(OSError):
                os.close(fd)


class PostgresWakeup:
    """``notify`` runs the NOTIFY statement; each listener runs the LISTEN one on a connection
    of its own."""

    def __init__(self, engine: Engine, *, notify: Executable, listen: str) -> None:
        self.engine = engine
        self._notify = notify
        self._listen = listen

    def notify(self) -> None:
        with self.engine.connect() as conn:
            conn.execute(self._notify)
            conn.commit()

    def listen(self, name: str) -> PostgresListener:
        return PostgresListener(self.engine, self._listen)


class SelfPipe:
    """A pipe to wake one's own wait: ``poke`` is safe in a signal handler and from any thread
    (a stop request wakes a sleeping supervisor at once)."""

    def __init__(self) -> None:
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        os.set_blocking(self._w, False)
        self._closed = False

    def poke(self) -> None:
        if not self._closed:
            with contextlib.suppress(OSError):
                os.write(self._w, b"!")

    def wait(self, timeout_s: float) -> bool:
        """Block until poked or ``timeout_s`` passes. True when poked."""
        try:
            ready, _, _ = select.select([self._r], [], [], max(timeout_s, 0.0))
        except (InterruptedError, OSError):
            return False
        if ready:
            with contextlib.suppress(OSError):
                while os.read(self._r, 4096):
                    pass
        return bool(ready)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            for fd in (self._r, self._w):
                with contextlib.suppress(OSError):
                    os.close(fd)
