"""Operating-system processes of the pool: starting workers, asking /proc about a pid, and the
ledger of the process groups a worker's Codex children run in.

Nothing here knows about the queue or the scaling policy; the supervisor decides, this module
starts, signals and finds processes.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Protocol

from koubou_mcp.config import Settings, child_environment
from koubou_mcp.home import is_own_marker, open_private
from koubou_mcp.models import WorkerStatus

# -- worker processes ---------------------------------------------------------------------

class WorkerProcess(Protocol):
    """A started worker process, as the supervisor handles it."""

    @property
    def pid(self) -> int: ...

    def poll(self) -> int | None:
        """Its exit code once it exited (reaping it), else None."""
        ...

    def terminate(self) -> None:
        """SIGTERM: the first one makes the worker finish its task and exit; a second, give
        the task back and exit."""
        ...

    def kill(self) -> None:
        """SIGKILL its whole process group."""
        ...


#: starts the worker of the given id
Launcher = Callable[[str], WorkerProcess]


class PopenWorker:
    """A worker started with ``subprocess.Popen`` in its own session (so its own group)."""

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self.popen = popen

    @property
    def pid(self) -> int:
        return self.popen.pid

    def poll(self) -> int | None:
        return self.popen.poll()

    def terminate(self) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        # Until we reap it, its pid (= its process group id) cannot be reused, so this reaches
        # only the worker and whatever it started in its group.
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.popen.pid, signal.SIGKILL)


class Phase(StrEnum):
    """Where a managed worker is in its life, from the supervisor's side."""

    RUNNING = "running"  # serving tasks (or starting to)
    RETIRING = "retiring"  # sent SIGTERM because it idled too long
    STOPPING = "stopping"  # sent SIGTERM because the pool stops
    KILLED = "killed"  # sent SIGKILL; waiting to reap it


@dataclass
class Managed:
    """A worker process a supervisor started, and what it has been told to do."""

    worker_id: str
    process: WorkerProcess
    started_at: datetime
    phase: Phase = Phase.RUNNING
    #: the status its row showed at the last tick (``starting`` until it registered)
    status: str = WorkerStatus.STARTING.value
    #: seen idle or busy at least once: it started fine
    ready: bool = False
    signalled_at: datetime | None = None

    def terminate(self, phase: Phase, now: datetime) -> None:
        """SIGTERM it (retiring or stopping: ``phase`` says which)."""
        self.process.terminate()
        self.phase, self.signalled_at = phase, now

    def kill(self, now: datetime) -> None:
        """SIGKILL its process group; it stays managed until reaped."""
        self.process.kill()
        self.phase, self.signalled_at = Phase.KILLED, now

    @property
    def state(self) -> str:
        """Its row's status while it runs (``starting``, ``idle``, ``busy``), else its phase."""
        return self.status if self.phase == Phase.RUNNING else self.phase.value


class ManagedWorkers(dict[str, Managed]):
    """The worker processes one supervisor started, by worker id, until reaped."""

    STATES = ("starting", "idle", "busy", "retiring", "stopping", "killed")

    def running(self) -> list[Managed]:
        """Those serving tasks or starting to (not on their way out)."""
        return [m for m in self.values() if m.phase == Phase.RUNNING]

    @property
    def probing(self) -> bool:
        """Some running worker was not seen ready yet."""
        return any(not m.ready for m in self.running())

    def by_state(self) -> dict[str, int]:
        counts = dict.fromkeys(self.STATES, 0)
        for m in self.values():
            if m.state in counts:
                counts[m.state] += 1
        return counts

    def exited(self) -> list[tuple[Managed, int]]:
        """Poll each (reaping it): those that exited, with their exit codes, are removed."""
        gone = [(m, code) for m in list(self.values()) if (code := m.process.poll()) is not None]
        for m, _ in gone:
            del self[m.worker_id]
        return gone

    def terminate_running(self, phase: Phase, now: datetime) -> None:
        for m in self.running():
            m.terminate(phase, now)

    def terminate_again(self) -> None:
        """A second SIGTERM to all not killed yet (a worker gives its task back at once)."""
        for m in self.values():
            if m.phase != Phase.KILLED:
                m.process.terminate()

    def kill_all(self, now: datetime) -> None:
        for m in self.values():
            m.kill(now)


def worker_command() -> list[str]:
    """How a worker is started: this interpreter, this package."""
    return [sys.executable, "-m", "koubou_mcp", "worker"]


class ProcessLauncher:
    """Starts ``koubou-mcp worker`` processes for a supervisor.

    Each worker runs in its own session, reads nothing from stdin, and writes stdout and stderr
    to ``$KOUBOU_HOME/logs/workers/<id>.log`` (mode 0600), never to the supervisor's stdout,
    which carries the MCP protocol when the server hosts the pool.
    """

    def __init__(self, settings: Settings, command: list[str] | None = None) -> None:
        self.settings = settings
        self.command = command or worker_command()

    def environment(self, worker_id: str) -> dict[str, str]:
        return child_environment(self.settings, WORKER_ID=worker_id,
                                 KOUBOU_SUPERVISOR_PID=str(os.getpid()))

    def log_path(self, worker_id: str) -> Path:
        return self.settings.worker_log(worker_id)

    def __call__(self, worker_id: str) -> PopenWorker:
        fd = open_private(self.log_path(worker_id), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:
            popen = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
                self.command, stdin=subprocess.DEVNULL, stdout=fd, stderr=fd,
                env=self.environment(worker_id), start_new_session=True, close_fds=True,
            )
        finally:
            os.close(fd)
        return PopenWorker(popen)


# -- the background pool -------------------------------------------------------------------

def pool_command() -> list[str]:
    """How a server starts the background pool of its home: this interpreter, this package."""
    return [sys.executable, "-m", "koubou_mcp", "pool", "--detached"]


def launch_pool(settings: Settings, command: list[str] | None = None) -> subprocess.Popen[bytes]:
    """Start ``koubou-mcp pool --detached`` for ``settings``' home, and do not wait for it.

    It gets a session (so a process group) of its own: whoever kills the server's group, as a
    client ending its session may, does not reach it. It reads nothing; its stdout goes to
    /dev/null and its stderr to ``logs/worker_pool.log`` (where it logs anyway), never to the
    server's stdout, which carries the MCP protocol. It works in the home, not in the
    directory the server started in, which it may outlive.
    """
    env = child_environment(settings)
    fd = open_private(settings.pool_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        return subprocess.Popen(  # noqa: S603 - fixed argv, no shell
            command or pool_command(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=fd, env=env, cwd=settings.home, start_new_session=True, close_fds=True,
        )
    finally:
        os.close(fd)


def describe_exit(code: int) -> str:
    """A process's exit code in words: "exited with code 1", "was killed by SIGKILL"."""
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name}"
    return f"exited with code {code}"


# -- any process, by pid -------------------------------------------------------------------

def process_cmdline(pid: int) -> list[str] | None:
    """The argv of ``pid`` from /proc, or None where /proc cannot tell."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def process_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
    except (OSError, IndexError):
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def wait_gone(pid: int, timeout_s: float) -> bool:
    """Wait up to ``timeout_s`` for ``pid`` (not our child) to be gone; True once it is."""
    deadline = time.monotonic() + timeout_s
    while process_alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)  # another process: nothing to wait on but its disappearance
    return True


# -- descendants that left the process group -----------------------------------------------

_PR_SET_CHILD_SUBREAPER = 36
_PR_GET_CHILD_SUBREAPER = 37


def _prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    return getattr(libc, "prctl", None)


def become_subreaper() -> bool:
    """Make this process the reaper of its orphaned descendants (Linux ``prctl``).

    A Codex run is killed by its process group; a descendant that called ``setsid()`` left the
    group, and once its parent dies it would go to init and run on unseen. As a subreaper the
    worker adopts it instead, and ``kill_adopted`` finds it among its own children. Returns
    False where the system does not offer it (then only the group is killed).
    """
    prctl = _prctl()
    return prctl is not None and prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


def is_subreaper() -> bool:
    """Whether this process adopts its orphaned descendants (``become_subreaper``)."""
    prctl = _prctl()
    if prctl is None:
        return False
    flag = ctypes.c_int(0)
    return prctl(_PR_GET_CHILD_SUBREAPER, ctypes.byref(flag), 0, 0, 0) == 0 and flag.value != 0


def children_of(pid: int) -> list[int]:
    """The pids whose parent is ``pid`` now, from /proc (empty where /proc cannot tell)."""
    found = []
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue  # gone meanwhile
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def kill_adopted(keep: Collection[int], timeout_s: float = 5.0) -> list[int]:
    """SIGKILL and reap every child of this subreaper that it did not start (not in ``keep``).

    Such children are orphans it adopted: descendants of a finished Codex run that left its
    process group. Each one reaped hands its own children to us in turn, so this goes on until
    a pass finds none (or ``timeout_s`` passes). Only a subreaper may call it: any other
    process's unknown children are its own business. Returns the pids killed.
    """
    me, killed = os.getpid(), []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        adopted = [pid for pid in children_of(me) if pid not in keep]
        if not adopted:
            break
        for pid in adopted:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for pid in adopted:
            # reaped one by one by pid (never waitpid(-1), which could take the exit status
            # of a child someone else waits for); its children are ours by the time it is
            while time.monotonic() < deadline:
                try:
                    if os.waitpid(pid, os.WNOHANG)[0] != 0:
                        break
                except ChildProcessError:
                    break
                time.sleep(0.01)
            killed.append(pid)
    return killed


# -- the Codex process groups of a worker ---------------------------------------------------

class GroupLedger:
    """The process groups one worker's Codex children run in, noted on disk.

    A Codex run gets a session of its own, so that stopping it reaches its whole tree; but then
    a SIGKILL of its worker does not reach it, and the run would outlive the worker. So the
    worker notes each running group here, as an empty file named by the group id in its own
    directory (``Settings.child_groups_dir``: ``run/children/<worker id>/``), and forgets it
    when the run ends; whoever reaps a dead worker kills what is still noted (``kill_all``).
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def record(self, pgid: int) -> bool:
        """Note a running group. Best effort: False when it could not be noted."""
        try:
            os.close(open_private(self.directory / str(pgid), os.O_CREAT | os.O_WRONLY))
        except OSError:  # an unsafe directory or file too (home.UnsafeHome)
            return False
        return True

    def forget(self, pgid: int) -> None:
        """The group's run ended: nothing to kill any more."""
        with contextlib.suppress(FileNotFoundError):
            (self.directory / str(pgid)).unlink()

    def groups(self) -> list[int]:
        """The groups noted now, in no particular order."""
        try:
            return [int(e.name) for e in self.directory.iterdir() if e.name.isdigit()]
        except FileNotFoundError:
            return []

    def kill_all(self) -> list[int]:
        """SIGKILL every noted group, then remove the notes and the directory. Returns the
        groups that were still there to kill (one already gone is fine, and left out)."""
        killed: list[int] = []
        try:
            entries = list(self.directory.iterdir())
        except FileNotFoundError:
            return killed
        for entry in entries:
            # only our own notes: a link or another user's file names no group of ours
            if entry.name.isdigit() and is_own_marker(entry):
                try:
                    os.killpg(int(entry.name), signal.SIGKILL)
                    killed.append(int(entry.name))
                except (ProcessLookupError, PermissionError):
                    pass  # already gone
            with contextlib.suppress(OSError):
                entry.unlink()
        with contextlib.suppress(OSError):
            self.directory.rmdir()
        return killed


__all__ = [
    "GroupLedger", "Launcher", "Managed", "ManagedWorkers", "Phase", "PopenWorker",
    "ProcessLauncher", "WorkerProcess",
    "become_subreaper", "children_of", "describe_exit", "is_subreaper", "kill_adopted",
    "launch_pool", "pool_command", "process_alive", "process_cmdline", "wait_gone",
    "worker_command",
]
