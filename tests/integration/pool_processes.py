"""Finding and stopping the processes of the supervisor tests (used by conftest and tests)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from koubou_mcp.config import Settings
from tests.procs import kill_workers, parent_pid, worker_processes

__all__ = ["PoolProcesses", "kill_workers", "parent_pid", "worker_processes"]

REPO_ROOT = Path(__file__).resolve().parents[2]


class PoolProcesses:
    """``koubou-mcp pool`` processes started by a test (``python -m koubou_mcp pool``)."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.started: list[subprocess.Popen[bytes]] = []

    def start(self, settings: Settings, *args: str) -> subprocess.Popen[bytes]:
        env = dict(os.environ)
        env.update(settings.to_env())
        n = len(self.started)
        out = open(self.tmp_path / f"pool{n}.stdout", "wb")  # noqa: SIM115 - closed below
        err = open(self.tmp_path / f"pool{n}.stderr", "wb")  # noqa: SIM115
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", "koubou_mcp", "pool", *args], cwd=REPO_ROOT, env=env,
                stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True,
            )
        finally:
            out.close()
            err.close()
        self.started.append(process)
        return process

    def stderr(self, process: subprocess.Popen[bytes]) -> str:
        return (self.tmp_path / f"pool{self.started.index(process)}.stderr").read_text()

    def stdout(self, process: subprocess.Popen[bytes]) -> str:
        return (self.tmp_path / f"pool{self.started.index(process)}.stdout").read_text()

    def stop_all(self) -> None:
        for process in self.started:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        for process in self.started:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(5)


