"""The stdio server as Claude Code starts it (a session of its own, spoken to line by line over
raw pipes), and the background pool it starts: shared by the end-to-end tests of the pool that
outlives sessions."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from koubou_mcp.config import Settings
from koubou_mcp.leader import Holder, lock_is_held, read_holder
from tests.e2e.conftest import Leftovers
from tests.support.env import child_env
from tests.support.jsonrpc import rpc_line
from tests.support.processes import koubou_command, run_cli
from tests.support.procfs import pool_processes, worker_processes
from tests.support.waiting import wait_until


class RawServer:
    """``koubou-mcp`` on stdio in a session of its own (its pid is its process group), spoken
    to line by line."""

    def __init__(self, settings: Settings, tmp_path: Path, leftovers: Leftovers,
                 name: str = "server", *, env: Mapping[str, str] | None = None,
                 cwd: Path | None = None) -> None:
        """Start it with ``settings`` in its environment and ``settings.workdir`` as its
        directory, unless ``env`` (the whole environment) or ``cwd`` say otherwise."""
        self.stderr_path = tmp_path / f"{name}.stderr"
        with open(self.stderr_path, "wb") as stderr:
            self.proc = subprocess.Popen(
                [koubou_command()], env=dict(env) if env is not None else child_env(settings),
                cwd=cwd or settings.workdir,
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr,
                start_new_session=True,
            )
        leftovers.add(self.proc.pid)
        self._next_id = 1
        self.call("initialize", {"protocolVersion": "2025-06-18", "capabilities": {},
                                 "clientInfo": {"name": "raw-test", "version": "0"}})
        self.send(None, "notifications/initialized")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def send(self, id_: int | None, method: str, params: dict[str, Any] | None = None) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(rpc_line(id_, method, params))
        self.proc.stdin.flush()

    def call(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        id_, self._next_id = self._next_id, self._next_id + 1
        self.send(id_, method, params)
        assert self.proc.stdout is not None
        while True:
            line = self.proc.stdout.readline()
            assert line, f"the server closed stdout; stderr: {self.stderr_path.read_text()}"
            message: dict[str, Any] = json.loads(line)
            if message.get("id") == id_:
                assert "error" not in message, message
                return dict(message["result"])

    def tool(self, name: str, **arguments: Any) -> dict[str, Any]:
        result = self.call("tools/call", {"name": name, "arguments": arguments})
        assert not result.get("isError"), result
        return dict(result["structuredContent"])

    def delegate(self, prompt: str, **arguments: Any) -> dict[str, Any]:
        return self.tool("delegate_task", prompt=prompt, **arguments)

    def health(self) -> dict[str, Any]:
        result = self.call("resources/read", {"uri": "koubou://health"})
        return dict(json.loads(result["contents"][0]["text"]))


def pool_holder(settings: Settings) -> Holder | None:
    return read_holder(settings.run_dir) if lock_is_held(settings.run_dir) else None


def background_pool(settings: Settings) -> Holder:
    holder: Holder = wait_until(lambda: pool_holder(settings), timeout=20,
                                message="the background pool to lead the home")
    assert holder.role == "detached"
    return holder


def stop_pool(settings: Settings) -> None:
    done = run_cli(settings, "stop", "--timeout", "30")
    assert done.returncode == 0, done.stderr
    wait_until(lambda: not pool_processes(settings.home) and
               not worker_processes(settings.home), timeout=20,
               message="the pool and its workers to be gone")
