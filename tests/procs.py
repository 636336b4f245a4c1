"""Starting and always stopping the real processes tests use (workers, the CLI)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

from koubou_mcp.config import Settings
from tests.waiting import pid_alive, wait_until

REPO_ROOT = Path(__file__).resolve().parent.parent
FAKE_CODEX = REPO_ROOT / "tests" / "fakes" / "codex"


def child_env(settings: Settings, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """An environment that makes a child see ``settings`` (and nothing from the outer env)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KOUBOU_", "FAKE_CODEX"))}
    env.update(settings.to_env())
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    if extra:
        env.update(extra)
    return env


class Processes:
    """Every process a test starts, killed (with its process group) when the test ends."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen[bytes]] = []

    def worker(self, settings: Settings, worker_id: str, extra_env: Mapping[str, str] | None = None,
               log: Path | None = None) -> subprocess.Popen[bytes]:
        env = child_env(settings, {"WORKER_ID": worker_id, **(extra_env or {})})
        out = open(log or settings.home / f"{worker_id}.stderr", "ab")  # noqa: SIM115
        with out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "koubou_mcp", "worker"], env=env, stdin=subprocess.DEVNULL,
                stdout=out, stderr=out, start_new_session=True,
            )
        self.started.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in self.started:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)


def run_cli(settings: Settings, *args: str, input: str | bytes | None = None,
            extra_env: Mapping[str, str] | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``koubou-mcp ARGS`` as a user would, to completion."""
    raw = subprocess.run(
        [sys.executable, "-m", "koubou_mcp", *args], env=child_env(settings, extra_env),
        input=input.encode() if isinstance(input, str) else input, capture_output=True,
        timeout=timeout, check=False,
    )
    return subprocess.CompletedProcess(raw.args, raw.returncode,
                                       raw.stdout.decode(errors="replace"),
                                       raw.stderr.decode(errors="replace"))


@contextlib.contextmanager
def processes() -> Iterator[Processes]:
    procs = Processes()
    try:
        yield procs
    finally:
        procs.stop_all()


def wait_exit(proc: subprocess.Popen[bytes], timeout: float = 15) -> int:
    wait_until(lambda: proc.poll() is not None, timeout=timeout, message=f"pid {proc.pid} to exit")
    code = proc.returncode
    assert code is not None
    return code


def wait_dead(pid: int, timeout: float = 10) -> None:
    wait_until(lambda: not pid_alive(pid), timeout=timeout, message=f"pid {pid} to be gone")


# -- finding worker processes by their home, in /proc --------------------------------------

def _worker_env_home(pid: int) -> str | None:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return None
    for item in raw.split(b"\0"):
        if item.startswith(b"KOUBOU_HOME="):
            return item.split(b"=", 1)[1].decode(errors="replace")
    return None


def worker_processes(home: Path) -> list[int]:
    """Pids of live ``koubou_mcp worker`` processes whose KOUBOU_HOME is ``home``, found in
    /proc (so also those that never got to register a row)."""
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
            if pid_alive(pid) and _worker_env_home(pid) == str(home):
                pids.append(pid)
    return pids


def parent_pid(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def kill_workers(home: Path) -> None:
    for pid in worker_processes(home):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
