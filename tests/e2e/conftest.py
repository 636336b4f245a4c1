"""Fixtures for end-to-end tests: the real ``koubou-mcp`` command against the stand-in Ollama
and the stand-in Codex CLI.

Every process a test starts is stopped at teardown even when the test fails: a server still
alive gets its session killed, and every worker process of the test's home is killed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import StdioServerParameters

from koubou_mcp.config import Settings
from tests.fakes.ollama_server import FakeOllama
from tests.procs import FAKE_CODEX, child_env
from tests.procs import worker_processes as worker_pids
from tests.waiting import pid_alive


def koubou_command() -> str:
    """The installed ``koubou-mcp`` console script (what Claude Code runs)."""
    beside = Path(sys.executable).parent / "koubou-mcp"
    found = str(beside) if beside.exists() else shutil.which("koubou-mcp")
    assert found, "the koubou-mcp command is not installed (pip install -e .)"
    return found


@pytest.fixture
def ollama() -> Iterator[FakeOllama]:
    with FakeOllama(models=["gpt-oss:20b"]) as fake:
        yield fake


@pytest.fixture
def e2e_settings(settings: Settings, ollama: FakeOllama, tmp_path: Path) -> Settings:
    """A small pool with quick heartbeats, on the stand-ins."""
    workdir = tmp_path / "work"
    workdir.mkdir()
    return settings.with_overrides(
        ollama_url=ollama.url, codex_bin=str(FAKE_CODEX), workdir=workdir, min_workers=1,
        max_workers=2, idle_timeout_s=30.0, heartbeat_s=0.2, lease_s=3.0, drain_grace_s=10.0,
    )


def server_env(settings: Settings) -> dict[str, str]:
    return child_env(settings)


def server_params(settings: Settings, *args: str) -> StdioServerParameters:
    return StdioServerParameters(command=koubou_command(), args=list(args),
                                 env=server_env(settings), cwd=str(settings.workdir))


class Leftovers:
    """Pids a test learns about (servers, workers); killed at teardown if still alive."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.pids: set[int] = set()

    def add(self, pid: int) -> None:
        self.pids.add(pid)

    def kill_all(self) -> None:
        for pid in {*self.pids, *worker_pids(self.home)}:
            if pid_alive(pid):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)


@pytest.fixture
def leftovers(e2e_settings: Settings) -> Iterator[Leftovers]:
    registry = Leftovers(e2e_settings.home)
    try:
        yield registry
    finally:
        registry.kill_all()


async def until(predicate: Callable[[], Any], timeout: float = 15.0,
                message: str = "condition") -> Any:
    """The async twin of ``tests.waiting.wait_until`` (awaits an async predicate too)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if hasattr(value, "__await__"):
            value = await value
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        await anyio.sleep(0.05)
