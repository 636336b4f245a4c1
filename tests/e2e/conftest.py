"""Fixtures for end-to-end tests: the real ``koubou-mcp`` command against the stand-in Ollama
and the stand-in Codex CLI.

Every process a test starts is stopped at teardown even when the test fails: a server still
alive gets its session killed, and every pool process of the test's home (the background pool
outlives its server) and every worker process is killed.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from mcp import StdioServerParameters

from koubou_mcp.config import Settings
from tests.fakes.ollama_server import FakeOllama
from tests.support.env import child_env
from tests.support.paths import FAKE_CODEX_PATH
from tests.support.processes import koubou_command
from tests.support.procfs import kill_pools_and_workers, pid_alive


@pytest.fixture
def e2e_settings(settings: Settings, fake_ollama: FakeOllama, tmp_path: Path) -> Settings:
    """A small pool with quick heartbeats, on the stand-ins."""
    workdir = tmp_path / "work"
    workdir.mkdir()
    return settings.with_overrides(
        ollama_url=fake_ollama.url, codex_bin=str(FAKE_CODEX_PATH), workdir=workdir, min_workers=1,
        max_workers=2, idle_timeout_s=30.0, heartbeat_s=0.2, lease_s=3.0, drain_grace_s=10.0,
    )


def server_params(settings: Settings, *args: str) -> StdioServerParameters:
    return StdioServerParameters(command=koubou_command(), args=list(args),
                                 env=child_env(settings), cwd=str(settings.workdir))


class Leftovers:
    """Pids a test learns about (servers, workers); killed at teardown if still alive, with
    every pool and worker process of the home."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.pids: set[int] = set()

    def add(self, pid: int) -> None:
        self.pids.add(pid)

    def kill_all(self) -> None:
        for pid in self.pids:
            if pid_alive(pid):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
        kill_pools_and_workers(self.home)


@pytest.fixture
def leftovers(e2e_settings: Settings) -> Iterator[Leftovers]:
    registry = Leftovers(e2e_settings.home)
    try:
        yield registry
    finally:
        registry.kill_all()
