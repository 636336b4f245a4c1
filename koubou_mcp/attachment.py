"""Servers attached to the background pool of a home, and when that pool may leave.

The pool of a home runs in a process of its own (``koubou-mcp pool --detached``), which the
first server for the home starts and later servers attach to; it outlives any session. So that
the pool knows whether anyone still uses it, each attached server keeps a marker file
``run/servers/<pid>`` and renews its modification time every ``ATTACH_BEAT_S``. A server is
attached while its marker is fresh and its pid lives: one killed with SIGKILL leaves a marker
naming a dead pid, which counts for nothing (and is swept away).

``Linger`` is the rule of a background pool's exit, pure (``now`` in, a verdict out): no task
pending or running and no server attached, for ``KOUBOU_POOL_LINGER`` seconds. ``PoolLink`` is
a server's side: the marker, and "a pool runs for this home" (start one when nobody holds the
leader lock). ``koubou-mcp stop`` leaves ``run/pool.stopped`` behind, so that attached servers
do not start the pool again at once; the next task delegated through a server does.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from koubou_mcp.config import Settings
from koubou_mcp.home import is_own_marker, open_private
from koubou_mcp.leader import lock_is_held, read_holder, read_state
from koubou_mcp.processes import describe_exit, launch_pool, process_alive

log = logging.getLogger("koubou_mcp.attachment")

SERVERS_DIR = "servers"
STOPPED_MARKER = "pool.stopped"
#: how often an attached server renews its marker (and checks that a pool runs), s
ATTACH_BEAT_S = 2.0
#: a marker not renewed for this long counts for nothing, even if its pid lives (reused), s
ATTACH_STALE_S = 30.0
#: the longest wait between two starts of a pool that keeps failing, s
RELAUNCH_BACKOFF_MAX_S = 300.0


# -- the markers --------------------------------------------------------------------------

def servers_dir(run_dir: Path) -> Path:
    return run_dir / SERVERS_DIR


def mark_attached(run_dir: Path, pid: int | None = None) -> Path:
    """Create or renew the marker of server ``pid`` (default: this process). Raises OSError
    (an unsafe file too) when it cannot."""
    path = servers_dir(run_dir) / str(pid or os.getpid())
    fd = open_private(path, os.O_WRONLY | os.O_CREAT)
    try:
        os.utime(fd)  # the modification time is the heartbeat
    finally:
        os.close(fd)
    return path


def unmark_attached(run_dir: Path, pid: int | None = None) -> None:
    with contextlib.suppress(FileNotFoundError):
        (servers_dir(run_dir) / str(pid or os.getpid())).unlink()


def attached_servers(run_dir: Path, now_s: float, *, stale_s: float = ATTACH_STALE_S,
                     sweep: bool = False) -> list[int]:
    """The pids of the servers attached now (``now_s``: seconds since the epoch, the clock of
    file times). With ``sweep``, markers of dead servers are removed."""
    try:
        entries = list(servers_dir(run_dir).iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []
    attached = []
    for entry in entries:
        # only our own regular files: a link or another user's file names no server of ours
        if not entry.name.isdigit() or not is_own_marker(entry):
            continue
        pid = int(entry.name)
        try:
            age_s = now_s - entry.lstat().st_mtime
        except OSError:
            continue
        if process_alive(pid) and age_s <= stale_s:
            attached.append(pid)
        elif sweep and not process_alive(pid):
            with contextlib.suppress(OSError):
                entry.unlink()
    return sorted(attached)


def mark_stopped(run_dir: Path) -> None:
    """``koubou-mcp stop`` was asked: attached servers leave the pool stopped (best effort)."""
    with contextlib.suppress(OSError):
        os.close(open_private(run_dir / STOPPED_MARKER, os.O_WRONLY | os.O_CREAT))


def stopped_by_user(run_dir: Path) -> bool:
    return is_own_marker(run_dir / STOPPED_MARKER)


def clear_stopped(run_dir: Path) -> None:
    with contextlib.suppress(OSError):
        (run_dir / STOPPED_MARKER).unlink()


# -- where the pool runs, in words ---------------------------------------------------------

def describe_holder(role: str | None, pid: int | None) -> str:
    """Where the pool of a home runs, from its leader record (``leader.Holder``)."""
    if role == "detached":
        return f"a background pool, pid {pid} (detached: its own session, outlives servers)"
    if role == "pool":
        return f"`koubou-mcp pool`, pid {pid} (run by hand or by a service manager)"
    if role == "server":
        return f"inside a koubou-mcp server, pid {pid}"
    return f"pid {pid}" if pid else "another process"


def pool_summary(run_dir: Path, now_s: float) -> str:
    """One line for ``top``: where the pool runs and how many servers are attached."""
    if lock_is_held(run_dir):
        holder = read_holder(run_dir)
        where = describe_holder(holder.role if holder else None, holder.pid if holder else None)
    elif stopped_by_user(run_dir):
        where = "none (stopped with `koubou-mcp stop`; the next task starts it)"
    else:
        where = "none runs for this home"
    servers = len(attached_servers(run_dir, now_s))
    return f"pool: {where}; {servers} server{'' if servers == 1 else 's'} attached"


# -- the background pool's exit -----------------------------------------------------------

@dataclass
class Linger:
    """When a background pool may exit: after ``linger_s`` with no work and no server
    attached. Pure: the caller observes and passes ``now``."""

    linger_s: float
    idle_since: datetime | None = None

    def observe(self, now: datetime, *, work: bool, attached: int) -> bool:
        """Record what is seen at ``now``; True once the pool has idled alone long enough."""
        if work or attached:
            self.idle_since = None
            return False
        if self.idle_since is None:
            self.idle_since = now
        return (now - self.idle_since).total_seconds() >= self.linger_s


# -- a server's side ----------------------------------------------------------------------

class PoolProcess(Protocol):
    """A started pool process, as a server keeps it (``subprocess.Popen``)."""

    @property
    def pid(self) -> int: ...

    def poll(self) -> int | None: ...


class PoolLink:
    """A server attached to the pool of its home.

    ``start`` writes the marker, makes sure a pool runs and starts a daemon thread that renews
    the marker every ``beat_s`` and starts the pool again should it be gone (unless a user
    stopped it). ``ensure`` (before each new task) starts a pool when none runs, even after
    ``koubou-mcp stop``. ``detach`` removes the marker and leaves the pool running: it exits by
    itself once idle with no server attached (``Linger``). Never writes to stdout.
    """

    def __init__(self, settings: Settings, *,
                 launcher: Callable[[Settings], PoolProcess] = launch_pool,
                 beat_s: float = ATTACH_BEAT_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.run_dir = settings.run_dir
        self.launcher = launcher
        self.beat_s = beat_s
        self.clock = clock
        self._launched: PoolProcess | None = None
        self._launched_at = 0.0
        self._failures = 0
        self._next_launch = 0.0
        self._last_failure: str | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Attach: the marker, a pool, the beat. Raises OSError when the marker cannot be
        written or the pool cannot be started."""
        mark_attached(self.run_dir)
        try:
            self.ensure(explicit=True)
        except OSError as exc:  # health says so; the beat and the next task try again
            log.error("cannot start the background pool: %s", exc)
        self._thread = threading.Thread(target=self._beat, name="koubou-pool-link", daemon=True)
        self._thread.start()

    def ensure(self, *, explicit: bool = True) -> None:
        """Start the pool when none runs for this home (nobody holds the leader lock and the
        one this server started is not still on its way). ``explicit``: new work needs it, so
        a stop by the user is overridden; otherwise that stop is respected, and a pool that
        keeps failing to start is retried with a growing delay."""
        with self._lock:
            self._reap()
            if explicit:
                clear_stopped(self.run_dir)
            elif stopped_by_user(self.run_dir) or self.clock() < self._next_launch:
                return
            if lock_is_held(self.run_dir):
                return
            if self._launched is not None:
                return  # ours is starting: it leads, or exits when another pool does
            try:
                self._launched = self.launcher(self.settings)
            except OSError as exc:
                self._failed(f"cannot start the background pool: {exc}")
                raise
            self._launched_at = self.clock()
            log.info("started the background pool for %s (pid %d)", self.settings.home,
                     self._launched.pid)

    def _reap(self) -> None:
        """Forget the pool this server started once it exited (reaping it); a quick failure
        delays the next start."""
        launched = self._launched
        if launched is None:
            return
        code = launched.poll()
        if code is None:
            return
        self._launched = None
        if code == 0:
            self._failures = 0  # it led and left, or found another pool leading
            return
        self._failed(f"the background pool (pid {launched.pid}) {describe_exit(code)}; see "
                     f"{self.settings.pool_log}")

    def _failed(self, message: str) -> None:
        self._failures += 1
        self._last_failure = message
        delay = min(RELAUNCH_BACKOFF_MAX_S, self.beat_s * 2 ** self._failures)
        self._next_launch = self.clock() + delay
        log.warning("%s; trying again in %gs at the latest", message, delay)

    def _beat(self) -> None:
        while not self._stop.wait(self.beat_s):
            try:
                mark_attached(self.run_dir)
                self.ensure(explicit=False)
            except Exception:  # the next beat may succeed; the pool goes on meanwhile
                log.exception("keeping this server attached to the pool failed")

    def detach(self) -> None:
        """Leave the pool (it goes on, and exits by itself once idle with no server)."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(5.0)
        unmark_attached(self.run_dir)

    def health(self) -> dict[str, Any]:
        """Where the pool runs (pid, role, detached or not), whether it is starting, and the
        servers attached."""
        with self._lock:
            self._reap()
            launched = self._launched
        data: dict[str, Any] = {
            "hosting": "attached", "leader": False,
            "attached_servers": attached_servers(self.run_dir, time.time()),
            "stopped_by_user": stopped_by_user(self.run_dir),
            "last_failure": self._last_failure,
        }
        if lock_is_held(self.run_dir):
            holder = read_holder(self.run_dir)
            state = read_state(self.run_dir, holder.pid) if holder else None
            # what the pool said last: its workers, start-up failures, decisions, errors
            data.update({k: v for k, v in (state or {}).items()
                         if k in ("workers", "managed", "crash_loop", "last_decision",
                                  "last_change", "scaling", "last_tick", "last_error",
                                  "stopping")})
            data.update(running=True, pid=holder.pid if holder else None,
                        role=holder.role if holder else None,
                        detached=holder is not None and holder.role == "detached")
        elif launched is not None:
            data.update(running=True, starting=True, pid=launched.pid, role="detached",
                        detached=True)
        else:
            data.update(running=False, pid=None)
        return data


def attach(settings: Settings) -> PoolLink:
    """Attach this server to the pool of its home, starting the pool when none runs."""
    link = PoolLink(settings)
    link.start()
    return link


__all__ = [
    "ATTACH_BEAT_S", "ATTACH_STALE_S", "SERVERS_DIR", "STOPPED_MARKER", "Linger", "PoolLink",
    "PoolProcess", "attach", "attached_servers", "clear_stopped", "describe_holder",
    "mark_attached", "mark_stopped", "pool_summary", "servers_dir", "stopped_by_user",
    "unmark_attached",
]
