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


def worker_processes(home: Path) -> list[int]:
    """Pids of live ``koubou_mcp worker`` processes whose KOUBOU_HOME is ``home``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"koubou_mcp" in argv and b"worker" in argv:
            pid = int(entry.name)
            if pid_alive(pid) and _env_home(pid) == str(home):
                pids.append(pid)
    return pids


def kill_workers(home: Path) -> None:
    """SIGKILL every worker process of ``home`` with its process group (teardown)."""
    for pid in worker_processes(home):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
