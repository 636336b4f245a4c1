"""Waking idle workers when work arrives, without busy polling.

Polling the database every few milliseconds would make dispatch fast but burn CPU while idle;
polling every second keeps the CPU quiet but adds up to a second of latency. Instead each idle
waiter blocks on a wake-up channel and polls only as a safety net (wake-ups can be lost):

* SQLite (one machine), under ``$KOUBOU_HOME/run/wake/``: workers share one named pipe,
  ``work.pipe``, and ``notify(count)`` writes ``count`` bytes into it. Each byte is read by
  exactly one idle worker (a non-blocking one-byte read; the others find the pipe empty and
  go back to sleep), so a new task wakes one worker, not all of them, and each woken worker
  runs a claim that can succeed. A byte nobody was idle to read stays in the pipe and costs a
  later idle worker one claim. Waiters that must see every notification (the supervisor,
  which scales on new work) own a pipe each (``<name>.fifo``) and get one byte per notify; a
  pipe nobody reads any more is removed. Pokes (stop, cancel) go to a waiter's own pipe.
* PostgreSQL (many machines): ``LISTEN``/``NOTIFY``. Each worker listens on a channel of its
  own; ``notify(count)`` picks up to ``count`` idle workers from the ``workers`` table (the
  one idle most recently among those not woken since their last task, see
  ``store.WAKE_IDLE_WORKERS``; ``SKIP LOCKED``, so two enqueues at once pick two different
  ones), marks them woken and notifies their channels, in the enqueue's own transaction when
  it can (``queue.submit``). So a new task wakes one idle worker, not all of them.
  Supervisors share one channel that every notify reaches. When no worker is idle nobody is
  woken: a busy worker looks for work again before it sleeps, and every worker polls every
  ``poll_s`` anyway. The statements come from ``store`` (only the store and the queue write
  SQL); this module only runs them.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import stat
import time
from collections.abc import Callable
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
    def notify(self, count: int = 1) -> None:
        """Wake ``count`` of the listeners that share the work (``one_of_many``) and every
        other listener."""
        ...

    def listen(self, name: str, *, one_of_many: bool = False) -> Listener:
        """A listener. With ``one_of_many`` it shares the wake-ups with the other such
        listeners (each notification wakes one of them) where the store can do that. On
        PostgreSQL such a ``name`` is a worker id: its ``workers`` row says when it is idle."""
        ...


def _open_fifo(path: Path) -> int:
    """A named pipe at ``path`` (made if missing), opened for reading without blocking."""
    try:
        os.mkfifo(path, 0o600)
    except FileExistsError:
        if not stat.S_ISFIFO(os.lstat(path).st_mode):
            raise RuntimeError(f"{path} exists and is not a pipe") from None
    # O_RDWR: the pipe always has a writer (us), so select never reports a spurious EOF.
    return os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_NOFOLLOW)


class FifoListener:
    """One waiter: its own pipe (a named one under ``path``, or with ``shared`` an anonymous
    one, for pokes only) and, with ``shared``, the pipe it shares with the other workers."""

    def __init__(self, path: Path, shared: Path | None = None) -> None:
        self.path = path
        self._shared_fd: int | None = None
        self._poke_w: int | None = None
        if shared is None:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            self._fd = _open_fifo(path)
        else:
            self._fd, self._poke_w = os.pipe()
            os.set_blocking(self._fd, False)
            os.set_blocking(self._poke_w, False)
            self._shared_fd = _open_fifo(shared)

    def fileno(self) -> int:
        return self._fd

    def wait(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + max(timeout_s, 0.0)
        fds = [self._fd] if self._shared_fd is None else [self._fd, self._shared_fd]
        while True:
            try:
                ready, _, _ = select.select(fds, [], [], max(deadline - time.monotonic(), 0.0))
            except InterruptedError:
                return False
            if not ready:
                return False
            if self._fd in ready:
                self.drain()
                return True
            if self._take_one():
                return True
            # another worker took that wake-up first: sleep on

    def _take_one(self) -> bool:
        """Read one byte of the shared pipe: this worker takes one notification."""
        assert self._shared_fd is not None
        try:
            return bool(os.read(self._shared_fd, 1))
        except (BlockingIOError, InterruptedError):
            return False

    def drain(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            while os.read(self._fd, 4096):
                pass

    def poke(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._fd if self._poke_w is None else self._poke_w, b"!")

    def close(self) -> None:
        for fd in (self._fd, self._poke_w, self._shared_fd):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        if self._shared_fd is None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()


class FifoWakeup:
    """Wake-ups through named pipes in one directory (same machine only)."""

    #: the pipe the workers share (not ``*.fifo``: it gets ``count`` bytes, not one)
    SHARED = "work.pipe"

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def notify(self, count: int = 1) -> None:
        try:
            entries = list(os.scandir(self.directory))
        except FileNotFoundError:
            return
        for entry in entries:
            if entry.name == self.SHARED:
                self._write(entry.path, b"w" * max(count, 1), remove_unread=False)
            elif entry.name.endswith(".fifo"):
                self._write(entry.path, b"w", remove_unread=True)

    @staticmethod
    def _write(path: str, data: bytes, *, remove_unread: bool) -> None:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
        except OSError as exc:
            # ENXIO: nobody reads it. A waiter's own pipe then belongs to a dead owner; the
            # shared one just has no worker right now (the next one opens it again).
            if exc.errno == errno.ENXIO and remove_unread:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            return
        try:
            os.write(fd, data)
        except BlockingIOError:
            pass  # the pipe is full of wake-ups already
        finally:
            os.close(fd)

    def listen(self, name: str, *, one_of_many: bool = False) -> FifoListener:
        make_private_dir(self.directory)
        path = self.directory / f"{name}.fifo"
        return FifoListener(path, self.directory / self.SHARED if one_of_many else None)


class PostgresListener:
    """A dedicated connection that LISTENs; ``poke`` wakes it through a local pipe.

    The connection can be lost at any time (``pg_terminate_backend``, a restart, a failover).
    ``wait`` then never raises: it logs once and sleeps like the poll fallback, still ending
    early on a poke, and tries to reconnect every ``backoff_s`` (doubling up to
    ``max_backoff_s``). A wait that reconnects returns True at once: whatever was notified
    while nobody listened is gone, so the caller should look for work now rather than at its
    next poll.
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
        while True:
            if self._conn is not None:
                try:
                    return self._wait_listening(deadline)
                except Exception as exc:  # the connection broke: a wake-up is an optimisation
                    self._lose(exc)
            if time.monotonic() >= self._retry_at and self._reconnect():
                return True
            if self._sleep_on_pipe(min(deadline, self._retry_at)):
                return True
            if time.monotonic() >= deadline:
                return False

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

    def _sleep_on_pipe(self, until: float) -> bool:
        try:
            ready, _, _ = select.select([self._pipe_r], [], [],
                                        max(until - time.monotonic(), 0.0))
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

    def _reconnect(self) -> bool:
        try:
            self._conn = self._connect()
        except Exception as exc:
            self._lose(exc)
            return False
        log.info("wake-up listener reconnected to PostgreSQL")
        self._lost = False
        self._backoff_s = self._first_backoff_s
        return True

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
    """``notify`` runs the store's wake-up statement (idle workers' channels and the shared
    one); each listener runs the LISTEN statement of its channel on a connection of its own:
    a worker's (``one_of_many``) or, for the others, the shared one."""

    def __init__(self, engine: Engine, *, notify: Executable,
                 listen: Callable[[str | None], str]) -> None:
        self.engine = engine
        self._notify = notify
        self._listen = listen

    def notify(self, count: int = 1) -> None:
        with self.engine.connect() as conn:
            conn.execute(self._notify, {"n": max(count, 1)})
            conn.commit()

    def listen(self, name: str, *, one_of_many: bool = False) -> PostgresListener:
        return PostgresListener(self.engine, self._listen(name if one_of_many else None))


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
