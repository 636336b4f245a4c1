"""The single-supervisor rule: one leader lock per ``KOUBOU_HOME``, and the record of who holds it.

The leader holds an exclusive ``flock`` on ``run/supervisor.lock`` (the kernel releases it when
the process dies, however it dies) and names itself in ``run/supervisor.pid``: its pid and its
role (``pool`` for ``koubou-mcp pool``, ``detached`` for the background pool a server starts,
``server`` for a pool hosted in a thread); in ``run/supervisor.json`` it publishes its health
for the servers attached to it, which run in other processes. Anyone
may ask whether the lock is held and by whom without taking it; health checks and
``koubou-mcp stop`` do, which is why this module stays light (no store, no supervisor).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from koubou_mcp.home import UnsafeHome, open_private

LOCK_FILE = "supervisor.lock"
PID_FILE = "supervisor.pid"
#: what the leading supervisor last said about itself (its health), for other processes
STATE_FILE = "supervisor.json"


@dataclass(frozen=True)
class Holder:
    """What ``run/supervisor.pid`` says about the supervisor holding the lock."""

    pid: int
    role: str


class LeaderLock:
    """An exclusive ``flock`` on ``run/supervisor.lock`` plus the pid file naming its holder.

    ``flock`` locks belong to an open file description, so the lock conflicts even between two
    supervisors in one process, and the kernel drops it when the holder dies. The descriptor is
    not inherited by workers (opened close-on-exec; Popen closes the rest).
    """

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.path = run_dir / LOCK_FILE
        self.pid_path = run_dir / PID_FILE
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, role: str) -> bool:
        """Take the lock without waiting; True when this object now holds it."""
        if self._fd is not None:
            return True
        fd = open_private(self.path, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        try:
            self._write_holder(role)
        except BaseException:
            self.release()
            raise
        return True

    def _write_holder(self, role: str) -> None:
        # written aside and renamed: a reader never sees half a record
        tmp = self.run_dir / f".{PID_FILE}.{os.getpid()}.tmp"
        tmp_fd = open_private(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        with os.fdopen(tmp_fd, "w") as f:
            f.write(f"{os.getpid()}\n{role}\n")
        os.replace(tmp, self.pid_path)

    def publish(self, state: dict[str, Any]) -> None:
        """Record ``state`` (JSON-able: the supervisor's health) for servers attached to this
        pool, which run in other processes. Leader only; written aside and renamed."""
        if self._fd is None:
            return
        tmp = self.run_dir / f".{STATE_FILE}.{os.getpid()}.tmp"
        tmp_fd = open_private(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        with os.fdopen(tmp_fd, "w") as f:
            json.dump(state, f, default=str)
        os.replace(tmp, self.run_dir / STATE_FILE)

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        # remove the pid file first: once unlocked, a successor may write its own
        holder = read_holder(self.run_dir)
        if holder is not None and holder.pid == os.getpid():
            with contextlib.suppress(FileNotFoundError):
                self.pid_path.unlink()
            with contextlib.suppress(FileNotFoundError):
                (self.run_dir / STATE_FILE).unlink()
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def read_holder(run_dir: Path) -> Holder | None:
    """The pid and role in ``run/supervisor.pid``, or None when absent or unreadable, or when
    it is not a regular file of this user (a pid we would signal must come from us)."""
    try:
        with os.fdopen(open_private(run_dir / PID_FILE, os.O_RDONLY)) as f:
            lines = f.read(4096).split()
        return Holder(int(lines[0]), lines[1] if len(lines) > 1 else "pool")
    except (OSError, ValueError, IndexError):  # UnsafeHome is an OSError
        return None


def read_state(run_dir: Path, pid: int) -> dict[str, Any] | None:
    """What the supervisor ``pid`` last published (``LeaderLock.publish``), or None when
    there is no such record of ours, or it is another supervisor's (an older one's)."""
    try:
        with os.fdopen(open_private(run_dir / STATE_FILE, os.O_RDONLY)) as f:
            state = json.loads(f.read(1_000_000))
    except (OSError, ValueError):  # UnsafeHome is an OSError
        return None
    if not isinstance(state, dict) or state.get("pid") != pid:
        return None
    return state


def lock_is_held(run_dir: Path) -> bool:
    """Whether some supervisor (in any process, this one included) holds the pool lock."""
    try:
        fd = open_private(run_dir / LOCK_FILE, os.O_RDONLY)
    except (FileNotFoundError, UnsafeHome):  # not a lock of ours: no pool of ours holds it
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops the probe's own lock, if it got one
    return False


__all__ = ["LOCK_FILE", "PID_FILE", "STATE_FILE", "Holder", "LeaderLock", "lock_is_held",
           "read_holder", "read_state"]
