"""The server over stdio, started as Claude Code starts it: the SDK's client runs ``koubou-mcp``
as a subprocess, with the stand-in Ollama and the stand-in Codex CLI behind a real pool."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from contextlib import AsyncExitStack, closing
from pathlib import Path
from typing import Any

import pytest
from mcp import Client

from koubou_mcp import queue
from koubou_mcp.config import Settings
from koubou_mcp.store import open_store
from tests.e2e.conftest import Leftovers, server_params
from tests.fakes.ollama_server import FakeOllama
from tests.support.env import child_env
from tests.support.jsonrpc import rpc_line
from tests.support.processes import koubou_command, run_cli
from tests.support.procfs import pid_alive, pool_processes, worker_processes
from tests.support.tasks import ended
from tests.support.waiting import async_wait_until, wait_until

pytestmark = pytest.mark.anyio


async def call(client: Client, tool: str, **arguments: Any) -> dict[str, Any]:
    result = await client.call_tool(tool, arguments)
    assert not result.is_error, result.content
    assert result.structured_content is not None
    return result.structured_content


async def read_json(client: Client, uri: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((await client.read_resource(uri)).contents[0].text)  # type: ignore[union-attr]
    return data


async def status_of(client: Client, task_id: str) -> str:
    return str((await call(client, "get_status", task_id=task_id))["status"])


async def test_a_client_lists_reads_health_delegates_polls_lists_and_cancels(
    e2e_settings: Settings, fake_ollama: FakeOllama, leftovers: Leftovers
) -> None:
    garbage: list[Exception] = []

    async def on_message(message: Any) -> None:
        if isinstance(message, Exception):  # a line on stdout that is not JSON-RPC
            garbage.append(message)

    async with Client(server_params(e2e_settings), message_handler=on_message) as client:
        names = {t.name for t in (await client.list_tools()).tools}
        assert names == {"delegate_task", "delegate_tasks", "wait_tasks", "get_status",
                         "list_tasks", "cancel_task"}

        health = await read_json(client, "koubou://health")
        leftovers.add(health["server"]["pid"])
        assert health["status"] == "ok", health["problems"]
        assert health["backends"]["codex"]["version"] == "codex-cli 0.0.0-fake"

        done = await call(client, "delegate_task", prompt="summarise: koubou", sync=True,
                          wait_s=30)
        assert (done["status"], done["result"]) == ("completed", "echo: summarise: koubou")
        assert done["worker_id"]

        code = await call(client, "delegate_task", prompt="write fizzbuzz", type="code")
        assert code["status"] == "pending"
        await async_wait_until(lambda: _is(client, code["task_id"], "completed"), timeout=15,
                               message="the code task")
        record = await call(client, "get_status", task_id=code["task_id"])
        assert record["result"] == "codex: write fizzbuzz"

        listed = await call(client, "list_tasks")
        assert [t["task_id"] for t in listed["tasks"]] == [code["task_id"], done["task_id"]]
        assert listed["counts"]["completed"] == 2

        fake_ollama.configure(mode="hang")
        stuck = await call(client, "delegate_task", prompt="never answered")
        await async_wait_until(lambda: _is(client, stuck["task_id"], "in_progress"), timeout=15,
                               message="the claim")
        cancelled = await call(client, "cancel_task", task_id=stuck["task_id"])
        assert cancelled["cancel_requested"] is True
        await async_wait_until(lambda: _is(client, stuck["task_id"], "cancelled"), timeout=15,
                               message="the worker to stop the cancelled task")
        fake_ollama.configure(mode="ok")
        fake_ollama.release()
    assert not garbage, f"stdout carried something that is not JSON-RPC: {garbage}"


async def _is(client: Client, task_id: str, status: str) -> bool:
    return await status_of(client, task_id) == status


async def test_closing_the_client_stops_the_server_at_once_and_the_background_pool_finishes_the_task(
    e2e_settings: Settings, fake_ollama: FakeOllama, leftovers: Leftovers
) -> None:
    fake_ollama.configure(latency_s=4.0)
    async with AsyncExitStack() as stack:
        client = await stack.enter_async_context(Client(server_params(e2e_settings)))
        server_pid = (await read_json(client, "koubou://health"))["server"]["pid"]
        leftovers.add(server_pid)
        task_id = (await call(client, "delegate_task", prompt="finish me"))["task_id"]
        await async_wait_until(lambda: _is(client, task_id, "in_progress"), timeout=15,
                               message="the claim")
        workers = (await read_json(client, "koubou://health"))["workers"]["list"]
        busy_pid = next(w["pid"] for w in workers if w["current_task"] == task_id)
        for w in workers:
            leftovers.add(w["pid"])

        death: dict[str, object] = {}

        def watch() -> None:  # a thread: the client must be closed by the task that opened it
            start = time.monotonic()
            wait_until(lambda: not pid_alive(server_pid), timeout=15.0, interval=0.005,
                       message="the server to exit")
            death["after_s"] = time.monotonic() - start
            # "at once" = without waiting for the busy worker's task (a 4 s generation)
            with closing(open_store(e2e_settings.database_url, e2e_settings.run_dir)) as s:
                death["task_was"] = queue.get_task(s, task_id).status

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        await stack.aclose()  # closes the server's stdin, as Claude Code does
        watcher.join(timeout=20)
    assert "after_s" in death, "the server did not exit"
    assert death["task_was"] == "in_progress", "the server waited for the worker's task"
    log = (e2e_settings.logs_dir / "mcp_server.log").read_text()
    assert "koubou-mcp server stopped" in log, "it shut down cleanly, it was not killed"

    store = open_store(e2e_settings.database_url, e2e_settings.run_dir)
    try:
        done = wait_until(lambda: ended(store, task_id), timeout=15,
                          message="the in-flight task to finish after the server left")
        assert (done.status, done.result) == ("completed", "echo: finish me")
    finally:
        store.close()
    # the pool is not the server's: it stays (until idle with no server for a while)
    assert pid_alive(busy_pid) and pool_processes(e2e_settings.home)
    stopped = run_cli(e2e_settings, "stop", "--timeout", "30")
    assert stopped.returncode == 0, stopped.stderr
    wait_until(lambda: not worker_processes(e2e_settings.home), timeout=10,
               message="every worker to be gone")


def _start_raw(settings: Settings, tmp_path: Path) -> subprocess.Popen[bytes]:
    stderr = open(tmp_path / "server.stderr", "wb")  # noqa: SIM115 - closed below
    try:
        return subprocess.Popen(
            [koubou_command()], env=child_env(settings), cwd=settings.workdir,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr,
            start_new_session=True,
        )
    finally:
        stderr.close()


def test_stdout_carries_only_json_rpc_even_while_workers_run_tasks(
    e2e_settings: Settings, leftovers: Leftovers, tmp_path: Path
) -> None:
    server = _start_raw(e2e_settings, tmp_path)
    leftovers.add(server.pid)
    assert server.stdin is not None
    server.stdin.write(rpc_line(1, "initialize", {
        "protocolVersion": "2025-06-18", "capabilities": {},
        "clientInfo": {"name": "raw-test", "version": "0"}}))
    server.stdin.write(rpc_line(None, "notifications/initialized"))
    server.stdin.write(rpc_line(2, "tools/list"))
    server.stdin.write(rpc_line(3, "tools/call", {"name": "delegate_task", "arguments": {
        "prompt": "print('to stdout?')", "sync": True, "wait_s": 30}}))
    server.stdin.write(rpc_line(4, "tools/call", {"name": "delegate_task", "arguments": {
        "prompt": "and a code task", "type": "code", "sync": True, "wait_s": 30}}))
    server.stdin.write(rpc_line(5, "resources/read", {"uri": "koubou://health"}))
    server.stdin.flush()
    lines: list[bytes] = []
    assert server.stdout is not None
    while len(lines) < 5:
        line = server.stdout.readline()
        assert line, f"the server closed stdout early; stderr: {(tmp_path / 'server.stderr').read_text()}"
        lines.append(line)
    server.stdin.close()
    lines += server.stdout.read().splitlines(keepends=True)
    assert server.wait(timeout=5) == 0
    messages = [json.loads(line) for line in lines]  # every line is JSON …
    assert all(m.get("jsonrpc") == "2.0" for m in messages)  # … and JSON-RPC
    by_id = {m["id"]: m for m in messages if "id" in m}
    assert set(by_id) == {1, 2, 3, 4, 5}
    assert by_id[3]["result"]["structuredContent"]["result"] == "echo: print('to stdout?')"
    assert by_id[4]["result"]["structuredContent"]["result"] == "codex: and a code task"
    health = json.loads(by_id[5]["result"]["contents"][0]["text"])
    for worker in health["workers"]["list"]:
        leftovers.add(worker["pid"])
        log = e2e_settings.worker_logs_dir / f"{worker['worker_id']}.log"
        assert log.exists(), "worker output goes to its own log file"


def test_sigterm_stops_the_server_cleanly_even_with_stdin_open(
    e2e_settings: Settings, leftovers: Leftovers, tmp_path: Path
) -> None:
    server = _start_raw(e2e_settings, tmp_path)
    leftovers.add(server.pid)
    assert server.stdin is not None
    _handshake(server)
    wait_until(lambda: worker_processes(e2e_settings.home), message="the pool's first worker")
    os.kill(server.pid, signal.SIGTERM)
    try:
        assert server.wait(timeout=3) == 0
    finally:
        server.stdin.close()
    log = (e2e_settings.logs_dir / "mcp_server.log").read_text()
    assert "received SIGTERM" in log and "koubou-mcp server stopped" in log
    # the background pool and its idle worker stay (the leftovers stop them)
    assert worker_processes(e2e_settings.home) and pool_processes(e2e_settings.home)


def _handshake(server: subprocess.Popen[bytes]) -> None:
    assert server.stdin is not None and server.stdout is not None
    server.stdin.write(rpc_line(1, "initialize", {
        "protocolVersion": "2025-06-18", "capabilities": {},
        "clientInfo": {"name": "raw-test", "version": "0"}}))
    server.stdin.flush()
    assert json.loads(server.stdout.readline())["id"] == 1


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_a_client_fans_out_with_files_and_waits_for_all_over_stdio(
    e2e_settings: Settings, fake_ollama: FakeOllama, leftovers: Leftovers, mode: str,
) -> None:
    (e2e_settings.workdir / "a.txt").write_text("alpha\n")
    async with Client(server_params(e2e_settings), mode=mode) as client:  # type: ignore[arg-type]
        batch = await call(client, "delegate_tasks", tasks=[
            {"prompt": "first", "files": ["a.txt"]}, {"prompt": "second", "priority": 9}])
        ids = batch["task_ids"]
        waited = await call(client, "wait_tasks", task_ids=ids, wait_s=60)
        health = await read_json(client, "koubou://health")
    for worker in health["workers"]["list"]:
        leftovers.add(worker["pid"])
    assert waited["done"] and waited["ended"] == ids
    first, second = waited["tasks"]
    assert "===== file: a.txt (6 bytes) =====\nalpha" in first["result"]
    assert first["workdir"] == str(e2e_settings.workdir.resolve())
    assert second["result"] == "echo: second"
