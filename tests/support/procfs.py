"""Reading /proc: whether a process lives, and finding the worker processes of a home (also
those that never got to register a row)."""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path


def pid_alive(pid: int) -> bool:
    """True while a process with ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def parent_pid(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _env_home(pid: int) -> str | None:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return None
    for item in raw.split(b"\0"):
        if item.startswith(b"KOUBOU_HOME="):
            return item.split(b"=", 1)[1].decode(errors="replace")
    return None


def _koubou_processes(command: bytes) -> list[tuple[int, str | None]]:
    """Live ``koubou_mcp COMMAND`` processes, with the KOUBOU_HOME of each."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"koubou_mcp" in argv and command in argv:
            pid = int(entry.name)
            if pid_alive(pid):
                found.append((pid, _env_home(pid)))
    return found


def worker_processes(home: Path) -> list[int]:
    """Pids of live ``koubou_mcp worker`` processes whose KOUBOU_HOME is ``home``."""
    return [pid for pid, where in _koubou_processes(b"worker") if where == str(home)]


def pool_processes(home: Path) -> list[int]:
    """Pids of live ``koubou_mcp pool`` processes (in the foreground or in the background)
    whose KOUBOU_HOME is ``home``."""
    return [pid for pid, where in _koubou_processes(b"pool") if where == str(home)]


def koubou_processes_under(base: Path) -> list[tuple[int, str]]:
    """Live pool and worker processes whose KOUBOU_HOME lies under ``base``, pools first."""
    inside = []
    for command in (b"pool", b"worker"):
        for pid, where in _koubou_processes(command):
            if where is not None and Path(where).is_relative_to(base):
                inside.append((pid, where))
    return inside


def kill_workers(home: Path) -> None:
    """SIGKILL every worker process of ``home`` with its process group (teardown)."""
    for pid in worker_processes(home):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)


def kill_pools_and_workers(home: Path) -> list[int]:
    """SIGKILL every pool process of ``home``, then every worker, each with its process group
    (teardown: a background pool outlives the server that started it). Returns the pids."""
    pools = pool_processes(home)
    for pid in pools:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    workers = worker_processes(home)
    kill_workers(home)
    return pools + workers


def times_scheduled(pid: int) -> int:
    """How many times the threads of ``pid`` have been switched off a CPU (voluntarily or
    not), summed. A process asleep in its waits keeps the same number; any wake-up raises it:
    the way to see from outside which idle workers a notification woke."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):  # a thread that just ended
            for line in (task / "status").read_text().splitlines():
                if line.startswith(("voluntary_ctxt_switches:", "nonvoluntary_ctxt_switches:")):
                    total += int(line.split()[1])
    return total
