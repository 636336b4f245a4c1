"""``koubou-mcp serve --transport streamable-http`` as a user runs it: a real server process, real
HTTP (httpx), the SDK's Streamable HTTP client, Prometheus' own parser, and ``load-test``, with
the stand-in Ollama and the stand-in Codex CLI behind a real pool."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import httpx2
import pytest
from mcp import Client, MCPError
from mcp.client.streamable_http import streamable_http_client
from prometheus_client.parser import text_string_to_metric_families

from koubou_mcp.config import Settings
from tests.e2e.conftest import Leftovers
from tests.fakes.ollama_server import FakeOllama
from tests.support.env import child_env
from tests.support.processes import koubou_command
from tests.support.procfs import pool_processes, worker_processes
from tests.support.waiting import wait_until

TOKEN = "t0ken-" + secrets.token_urlsafe(24)
RECORD_KEYS = {"task_id", "type", "status", "priority", "result", "error", "error_kind",
               "attempts", "max_attempts", "worker_id", "created_at", "finished_at",
               "duration_s"}
DELEGATE_KEYS = {"task_id", "status", "type", "priority", "created", "result", "error",
                 "worker_id", "attempts", "duration_s", "waited_s", "next_step"}


# -- a server process -----------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


@dataclass
class HttpServer:
    proc: subprocess.Popen[bytes]
    url: str
    log: Path

    def client(self, token: str | None = None, **kwargs: Any) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60, **kwargs)

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")


def _start(settings: Settings, args: list[str], env: Mapping[str, str], port: int,
           log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(
            [koubou_command(), "serve", "--transport", "streamable-http", "--port", str(port),
             *args], env={**child_env(settings), **env}, stdin=subprocess.DEVNULL,
            stdout=out, stderr=out, cwd=str(settings.workdir), start_new_session=True)


def _answers(url: str) -> bool:
    try:
        httpx.get(f"{url}/tasks?limit=1", timeout=2)  # any answer (even 401) means it is up
    except httpx.TransportError:
        return False
    return True


@contextlib.contextmanager
def http_server(settings: Settings, leftovers: Leftovers, *args: str,
                env: Mapping[str, str] | None = None, clean_exit: bool = True,
                ) -> Iterator[HttpServer]:
    """A running server, stopped with SIGTERM at the end (SIGKILL if it hangs; its workers by
    the ``leftovers`` fixture). With ``clean_exit``, the SIGTERM must end it with code 0."""
    log = settings.home / f"http-server-{secrets.token_hex(3)}.log"
    for _ in range(3):  # a port picked free may be taken by the time the server binds it
        port = free_port()
        proc = _start(settings, list(args), env or {}, port, log)
        leftovers.add(proc.pid)
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda p=proc, u=url: p.poll() is not None or _answers(u),  # type: ignore[misc]
                   timeout=30, message=f"the server on port {port} to answer")
        if proc.poll() is None:
            break
        assert "cannot listen" in log.read_text(), log.read_text()
    else:
        pytest.fail("no free port after three tries")
    server = HttpServer(proc, url, log)
    try:
        yield server
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
            raise AssertionError("the server did not stop within 20 s of SIGTERM") from None
    if clean_exit:
        assert code == 0, f"exit {code}\n{server.stderr()}"


def koubou(settings: Settings, *args: str, env: Mapping[str, str] | None = None,
           timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([koubou_command(), *args], env={**child_env(settings), **(env or {})},
                          capture_output=True, text=True, timeout=timeout, check=False,
                          stdin=subprocess.DEVNULL)


@pytest.fixture
def small(e2e_settings: Settings) -> Settings:
    """Short prompts only, so that the body limit is small: 6 x 1000 + 64 KiB bytes."""
    return e2e_settings.with_overrides(max_prompt_chars=1000)


def metric_values(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus exposition, by name and sorted labels."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


# -- the REST API ---------------------------------------------------------------------------

def test_the_rest_api_delegates_reports_lists_and_cancels_in_the_seeds_shapes(
    small: Settings, leftovers: Leftovers
) -> None:
    with http_server(small, leftovers, "--no-pool") as server, server.client() as http:
        reply = http.post("/task/delegate", json={"type": "code", "prompt": "write fizzbuzz",
                                                  "priority": 8, "sync": False})
        assert reply.status_code == 200, reply.text
        first = reply.json()
        assert DELEGATE_KEYS <= set(first)
        assert (first["status"], first["type"], first["priority"], first["created"]) == \
            ("pending", "code", 8, True)

        keyed = {"prompt": "summarise", "idempotency_key": "k-1"}
        again = [http.post("/task/delegate", json=keyed).json() for _ in range(2)]
        assert again[0]["task_id"] == again[1]["task_id"]
        assert (again[0]["created"], again[1]["created"]) == (True, False)
        assert (again[0]["type"], again[0]["priority"]) == ("general", 5)  # the defaults

        waited = http.post("/task/delegate", json={"prompt": "nobody runs this", "sync": True,
                                                   "wait_s": 0.3}).json()
        assert waited["status"] == "pending" and waited["waited_s"] >= 0.3
        assert "get_status" in waited["next_step"]

        status = http.get(f"/task/{first['task_id']}/status")
        assert status.status_code == 200
        assert RECORD_KEYS <= set(status.json()) and "prompt" not in status.json()
        with_prompt = http.get(f"/task/{first['task_id']}/status",
                               params={"include_prompt": "true"}).json()
        assert with_prompt["prompt"] == "write fizzbuzz"

        listing = http.get("/tasks", params={"status": "pending", "limit": 2}).json()
        assert len(listing["tasks"]) == 2
        assert listing["tasks"][0]["task_id"] == waited["task_id"]  # newest first
        assert listing["counts"]["pending"] == 3
        assert {"prompt_preview", "has_result"} <= set(listing["tasks"][0])
        assert len(http.get("/tasks").json()["tasks"]) == 3

        cancelled = http.post(f"/task/{first['task_id']}/cancel")
        assert (cancelled.status_code, cancelled.json()["status"]) == (200, "cancelled")
        assert http.post(f"/task/{first['task_id']}/cancel").json()["status"] == "cancelled"
        assert http.get("/tasks", params={"status": "cancelled"}).json()["counts"] == \
            {"pending": 2, "in_progress": 0, "completed": 0, "failed": 0, "cancelled": 1}

        workers = http.get("/workers").json()
        assert workers == {"live": 0, "by_status": {"starting": 0, "idle": 0, "busy": 0,
                                                    "stopping": 0},
                           "by_host": {}, "workers": []}
        health = http.get("/health")
        assert health.status_code == 200  # degraded (no workers, no pool), not down
        assert health.json()["status"] == "degraded"
        assert health.json()["server"]["pool"] == "not started (--no-pool)"
        assert health.json()["queue"]["depth"] == 2


INVALID_FIELDS: list[tuple[dict[str, Any], str, str]] = [
    ({"type": "general"}, "prompt", "prompt is required"),
    ({"prompt": "   "}, "prompt", "prompt must not be empty"),
    ({"prompt": 42}, "prompt", "prompt must be a string"),
    ({"prompt": "x" * 1001}, "prompt", "the limit is 1000 (KOUBOU_MAX_PROMPT_CHARS)"),
    ({"prompt": "a\u0000b"}, "prompt", "prompt contains a NUL character"),
    ({"prompt": "x", "type": "music"}, "type", "type must be one of general, code"),
    ({"prompt": "x", "priority": 11}, "priority", "priority must be from 1 (lowest) to 10"),
    ({"prompt": "x", "priority": "high"}, "priority", "priority must be an integer"),
    ({"prompt": "x", "priority": True}, "priority", "priority must be an integer"),
    ({"prompt": "x", "timeout_s": -1}, "timeout_s", "timeout_s must be more than 0"),
    ({"prompt": "x", "idempotency_key": ""}, "idempotency_key", "non-empty string"),
    ({"prompt": "x", "sync": "yes"}, "sync", "sync must be true or false"),
    ({"prompt": "x", "sync": True, "wait_s": 1000}, "wait_s", "wait_s must be a number"),
    ({"prompt": "x", "priorty": 3}, "priorty", "unknown field(s) priorty"),
]


def test_an_invalid_field_gets_422_naming_it_and_nothing_is_queued(
    shared_server: HttpServer,
) -> None:
    with shared_server.client() as http:
        for body, field, says in INVALID_FIELDS:
            reply = http.post("/task/delegate", json=body)
            assert reply.status_code == 422, (body, reply.text)
            assert reply.json()["field"] == field, body
            assert says in reply.json()["error"], (body, reply.json())
        assert sum(http.get("/tasks").json()["counts"].values()) == 0


@pytest.fixture
def shared_server(small: Settings, leftovers: Leftovers) -> Iterator[HttpServer]:
    """A front-end-only server (no pool: tasks stay pending) with short prompts."""
    with http_server(small, leftovers, "--no-pool") as server:
        yield server


def test_malformed_bodies_get_400_unknown_things_404_and_a_wrong_method_405(
    shared_server: HttpServer,
) -> None:
    with shared_server.client() as http:
        for raw in (b"{not json", b"", b"[1, 2]", b'"text"', b'{"prompt": NaN}', b"\xff\xfe{"):
            reply = http.post("/task/delegate", content=raw,
                              headers={"Content-Type": "application/json"})
            assert reply.status_code == 400, (raw, reply.text)
            assert reply.json()["error"].startswith("the body ")

        missing = http.get("/task/task_20990101_000000_deadbeef/status")
        assert missing.status_code == 404
        assert missing.json() == {"error": missing.json()["error"],
                                  "task_id": "task_20990101_000000_deadbeef"}
        assert "no task with id" in missing.json()["error"]
        assert http.post("/task/nope/cancel").status_code == 404
        assert http.get("/nowhere").status_code == 404
        assert "no route /nowhere" in http.get("/nowhere").json()["error"]
        wrong = http.get("/task/delegate")
        assert wrong.status_code == 405 and "GET is not allowed" in wrong.json()["error"]

        for params, field in (({"status": "done"}, "status"), ({"limit": 0}, "limit"),
                              ({"limit": "ten"}, "limit"), ({"limit": 201}, "limit"),
                              ({"state": "pending"}, "state")):
            reply = http.get("/tasks", params=params)
            assert (reply.status_code, reply.json()["field"]) == (422, field), reply.text
        assert http.get("/task/x/status", params={"include_prompt": "maybe"}).status_code == 422


def test_bodies_over_the_limit_get_413_declared_or_chunked(shared_server: HttpServer) -> None:
    limit = 6 * 1000 + 64 * 1024
    big = b'{"prompt": "' + b"x" * limit + b'"}'
    with shared_server.client() as http:
        declared = http.post("/task/delegate", content=big)
        assert declared.status_code == 413
        assert declared.json()["limit_bytes"] == limit

        def chunks() -> Iterator[bytes]:  # no Content-Length: sent chunked
            for start in range(0, len(big), 8192):
                yield big[start:start + 8192]

        chunked = http.post("/task/delegate", content=chunks())
        assert chunked.status_code == 413

        def small_chunks() -> Iterator[bytes]:
            yield b'{"prompt": '
            yield b'"chunked but small"}'

        fine = http.post("/task/delegate", content=small_chunks())
        assert fine.status_code == 200, fine.text
        assert http.get("/tasks").json()["counts"]["pending"] == 1


def test_without_a_token_only_loopback_names_and_origins_are_answered(
    shared_server: HttpServer,
) -> None:
    with shared_server.client() as http:
        assert http.get("/tasks", headers={"Host": "evil.example:8765"}).status_code == 421
        assert http.get("/tasks", headers={"Host": "localhost"}).status_code == 200
        cross = http.post("/task/delegate", json={"prompt": "x"},
                          headers={"Origin": "https://evil.example"})
        assert cross.status_code == 403
        assert http.get("/tasks", headers={"Origin": "http://localhost:3000"}).status_code == 200
        assert http.get("/tasks").json()["counts"]["pending"] == 0


# -- the token ------------------------------------------------------------------------------

def test_binding_beyond_loopback_without_a_token_is_refused_before_anything_starts(
    e2e_settings: Settings,
) -> None:
    port = str(free_port())
    for args, env in ((["--host", "0.0.0.0"], {}),  # noqa: S104
                      ([], {"KOUBOU_HTTP_HOST": "0.0.0.0"})):  # noqa: S104
        refused = koubou(e2e_settings, "serve", "--transport", "streamable-http", "--port",
                         port, *args, env=env, timeout=30)
        assert refused.returncode == 2, refused.stderr
        assert "not a loopback address" in refused.stderr
        assert "KOUBOU_HTTP_TOKEN" in refused.stderr and "Traceback" not in refused.stderr
    short = koubou(e2e_settings, "serve", "--transport", "streamable-http", "--host", "0.0.0.0",  # noqa: S104
                   "--port", port, env={"KOUBOU_HTTP_TOKEN": "tiny-secret"}, timeout=30)
    assert short.returncode == 2
    assert "KOUBOU_HTTP_TOKEN must be at least 16" in short.stderr
    assert "tiny-secret" not in short.stderr  # a secret is never echoed
    bad_port = koubou(e2e_settings, "serve", "--transport", "streamable-http", "--port",
                      "70000", timeout=30)
    assert bad_port.returncode == 2 and "KOUBOU_HTTP_PORT (--port)" in bad_port.stderr
    assert not (e2e_settings.home / "db").exists()  # nothing was started or opened


async def _mcp_tools(url: str, token: str | None) -> list[str]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with httpx2.AsyncClient(headers=headers, timeout=30) as http:
        async with Client(streamable_http_client(url, http_client=http)) as client:
            return [t.name for t in (await client.list_tools()).tools]


@pytest.mark.anyio
async def test_with_a_token_every_route_and_mcp_need_it(
    e2e_settings: Settings, leftovers: Leftovers
) -> None:
    env = {"KOUBOU_HTTP_TOKEN": TOKEN, "KOUBOU_HTTP_HOST": "0.0.0.0"}  # noqa: S104
    with http_server(e2e_settings, leftovers, "--no-pool", env=env) as server:
        with server.client() as anonymous:
            for method, path in (("GET", "/health"), ("GET", "/tasks"), ("GET", "/metrics"),
                                 ("GET", "/workers"), ("POST", "/task/delegate"),
                                 ("GET", "/task/x/status"), ("POST", "/mcp"),
                                 ("GET", "/nowhere")):
                reply = anonymous.request(method, path, json={"prompt": "x"})
                assert reply.status_code == 401, (method, path, reply.text)
                assert reply.headers["www-authenticate"].startswith("Bearer")
            refused = anonymous.get("/tasks")
            assert "Authorization: Bearer <token>" in refused.json()["fix"], refused.text
            # no OAuth discovery: a client must not start an OAuth flow it cannot finish
            for path in ("/.well-known/oauth-protected-resource",
                         "/.well-known/oauth-protected-resource/mcp",
                         "/.well-known/oauth-authorization-server",
                         "/.well-known/openid-configuration"):
                reply = anonymous.get(path)
                assert reply.status_code == 404, (path, reply.text)
                assert "bearer token" in reply.json()["error"], reply.text
            for header in (f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}", f"Basic {TOKEN}",
                           TOKEN, "Bearer"):
                reply = anonymous.get("/tasks", headers={"Authorization": header})
                assert reply.status_code == 401, header
        with server.client(TOKEN) as http:
            # with a token, Host is not checked (a reverse proxy may name the server anything)
            assert http.get("/tasks", headers={"Host": "koubou.example"}).status_code == 200
            assert http.post("/task/delegate", json={"prompt": "x"}).status_code == 200
            assert http.get("/metrics").status_code == 200
        assert "delegate_task" in await _mcp_tools(f"{server.url}/mcp", TOKEN)
        with anyio.fail_after(30), pytest.RaisesGroup(MCPError, flatten_subgroups=True):
            await _mcp_tools(f"{server.url}/mcp", None)  # the SDK's client sees the 401


# -- MCP, metrics and the load test with a real pool -------------------------------------------

@pytest.mark.anyio
async def test_an_mcp_client_over_streamable_http_delegates_and_gets_the_result(
    e2e_settings: Settings, leftovers: Leftovers
) -> None:
    with http_server(e2e_settings, leftovers) as server:
        async with Client(f"{server.url}/mcp") as client:
            result = await client.call_tool("delegate_task", {
                "prompt": "summarise: koubou", "sync": True, "wait_s": 30})
            assert not result.is_error, result.content
            done = result.structured_content
            assert done is not None
            assert (done["status"], done["result"]) == ("completed", "echo: summarise: koubou")
            health = await client.read_resource("koubou://health")
            assert json.loads(health.contents[0].text)["status"] == "ok"  # type: ignore[union-attr]
        with server.client() as http:  # the same store behind both
            record = http.get(f"/task/{done['task_id']}/status").json()
            assert record["result"] == "echo: summarise: koubou"
            assert http.get("/health").json()["status"] == "ok"
            assert worker_processes(e2e_settings.home)
    # SIGTERM stopped the server (exit 0, checked by http_server); the background pool stays
    # (until idle with no server for KOUBOU_POOL_LINGER) and is stopped by the leftovers
    assert pool_processes(e2e_settings.home)


def test_metrics_parse_and_move_when_tasks_run(
    e2e_settings: Settings, fake_ollama: FakeOllama, leftovers: Leftovers
) -> None:
    settings = e2e_settings.with_overrides(max_attempts=1)
    with http_server(settings, leftovers) as server, server.client() as http:
        wait_until(lambda: http.get("/workers").json()["live"] >= 1, timeout=30,
                   message="the pool's first worker")
        before = metric_values(http.get("/metrics").text)
        assert before[("koubou_store_up", ())] == 1
        # the pool runs in a background process of its own, not in the server; its scaling
        # counters come from what it publishes
        assert before[("koubou_pool_leader", ())] == 0
        assert before[("koubou_pool_scale_events_total", (("direction", "up"),))] >= 1
        assert before[("koubou_tasks", (("status", "completed"),))] == 0
        assert ("koubou_task_duration_seconds_count",
                (("status", "completed"), ("type", "general"))) not in before

        for prompt in ("one", "two"):
            done = http.post("/task/delegate", json={"prompt": prompt, "sync": True,
                                                     "wait_s": 30}).json()
            assert done["status"] == "completed", done
        code = http.post("/task/delegate", json={"prompt": "fizzbuzz", "type": "code",
                                                 "sync": True, "wait_s": 30}).json()
        assert code["status"] == "completed", code
        fake_ollama.configure(mode="error500")
        failed = http.post("/task/delegate", json={"prompt": "three", "sync": True,
                                                   "wait_s": 30}).json()
        assert failed["status"] == "failed", failed
        fake_ollama.configure(mode="ok")

        reply = http.get("/metrics")
        assert reply.headers["content-type"].startswith("text/plain")
        after = metric_values(reply.text)
        assert after[("koubou_tasks", (("status", "completed"),))] == 3
        assert after[("koubou_tasks", (("status", "failed"),))] == 1
        assert after[("koubou_queue_depth", ())] == 0
        assert after[("koubou_task_duration_seconds_count",
                      (("status", "completed"), ("type", "general")))] == 2
        assert after[("koubou_task_duration_seconds_count",
                      (("status", "completed"), ("type", "code")))] == 1
        assert after[("koubou_task_duration_seconds_bucket",
                      (("le", "+Inf"), ("status", "failed"), ("type", "general")))] == 1
        assert after[("koubou_task_wait_seconds_count", (("type", "general"),))] == 3
        assert after[("koubou_task_duration_seconds_sum",
                      (("status", "completed"), ("type", "general")))] > 0
        assert after[("koubou_task_errors_total",
                      (("kind", "server_error"), ("type", "general")))] == 1
        workers = {labels: v for (name, labels), v in after.items() if name == "koubou_workers"}
        assert sum(workers.values()) >= 1
        assert all(dict(labels)["host"] == settings.hostname for labels in workers)

        again = metric_values(http.get("/metrics").text)  # counted once, not per scrape
        assert again[("koubou_task_wait_seconds_count", (("type", "general"),))] == 3

        openmetrics = http.get("/metrics", headers={"Accept": "application/openmetrics-text"})
        assert openmetrics.headers["content-type"].startswith("application/openmetrics-text")
        assert openmetrics.text.rstrip().endswith("# EOF")


def test_load_test_runs_through_the_store_and_through_the_rest_api(
    e2e_settings: Settings, leftovers: Leftovers
) -> None:
    with http_server(e2e_settings, leftovers) as server:
        for extra in ([], ["--url", server.url]):
            run = koubou(e2e_settings, "load-test", "-n", "6", "--seed", "7", "--json",
                         "--timeout", "90", *extra)
            assert run.returncode == 0, run.stderr
            summary = json.loads(run.stdout)
            assert summary["submitted"] == 6 and summary["finished"] is True
            assert summary["statuses"] == {"completed": 6}
            assert summary["peak_workers"] >= 1
            assert summary["run_s"]["p50"] is not None
            assert "done | workers" in run.stderr  # the live progress line
        plain = koubou(e2e_settings, "load-test", "-n", "2", "--url", server.url,
                       "--timeout", "90")
        assert plain.returncode == 0, plain.stderr
        assert "Load test summary" in plain.stdout and "throughput" in plain.stdout


def test_load_test_with_a_token_sends_it_and_fails_clearly_without(
    e2e_settings: Settings, leftovers: Leftovers
) -> None:
    with http_server(e2e_settings, leftovers, env={"KOUBOU_HTTP_TOKEN": TOKEN}) as server:
        refused = koubou(e2e_settings, "load-test", "-n", "1", "--url", server.url,
                         "--timeout", "30", env={"KOUBOU_HTTP_TOKEN": ""})
        assert refused.returncode == 1 and "401" in refused.stderr
        assert "Traceback" not in refused.stderr
        ok = koubou(e2e_settings, "load-test", "-n", "2", "--url", server.url, "--timeout",
                    "60", env={"KOUBOU_HTTP_TOKEN": TOKEN})
        assert ok.returncode == 0, ok.stderr


# -- delegation: files, batches, waits --------------------------------------------------------

def test_the_rest_api_fans_out_a_batch_with_files_and_waits_for_all_of_it(
    e2e_settings: Settings, leftovers: Leftovers, fake_ollama: FakeOllama,
) -> None:
    (e2e_settings.workdir / "notes.txt").write_text("remember the milk\n")
    schema = {"type": "object", "properties": {"item": {"type": "string"}}, "required": ["item"]}
    with http_server(e2e_settings, leftovers) as server, server.client() as http:
        reply = http.post("/tasks/delegate", json={"tasks": [
            {"prompt": "what to buy?", "files": ["notes.txt"]},
            {"prompt": "as data", "output_schema": schema, "options": {"seed": 1}},
        ]})
        assert reply.status_code == 200, reply.text
        ids = reply.json()["task_ids"]
        assert [t["workdir"] for t in reply.json()["tasks"]] == [
            str(e2e_settings.workdir.resolve())] * 2
        waited = http.post("/tasks/wait", json={"task_ids": ids, "mode": "all", "wait_s": 30})
        assert waited.status_code == 200, waited.text
        out = waited.json()
        assert out["done"] and out["ended"] == ids
        first, second = out["tasks"]
        assert "remember the milk" in first["result"] and first["files"] == ["notes.txt"]
        assert second["result_json"] == {"item": "echo: as data"}
        single = http.post("/task/delegate", json={"prompt": "one", "sync": True, "wait_s": 30,
                                                   "files": ["notes.txt"]}).json()
        assert single["status"] == "completed" and "remember the milk" in single["result"]
    assert any(c["format"] == schema for c in fake_ollama.stats()["calls"])


def test_bad_batches_and_waits_get_422_or_404_and_nothing_is_queued(
    shared_server: HttpServer,
) -> None:
    with shared_server.client() as http:
        cases: list[tuple[str, dict[str, Any], int, str, str]] = [
            ("/tasks/delegate", {"tasks": [{"prompt": "ok"}, {"prompt": "x", "files": ["/etc/passwd"]}]},
             422, "tasks[1].files", "outside the task's workdir"),
            ("/tasks/delegate", {"tasks": [{"prompt": "ok"}, {"prompt": "x", "model": "nope"}]},
             422, "tasks[1].model", "the models that work: gpt-oss:20b"),
            ("/tasks/delegate", {"tasks": []}, 422, "tasks", "non-empty list"),
            ("/tasks/delegate", {}, 422, "tasks", "tasks is required"),
            ("/tasks/delegate", {"tasks": [{"prompt": "x"}], "sync": True}, 422, "sync",
             "unknown field(s) sync"),
            ("/task/delegate", {"prompt": "x", "workdir": "rel"}, 422, "workdir", "absolute path"),
            ("/task/delegate", {"prompt": "x", "options": {"mirostat": 2}}, 422, "options",
             "unknown key(s) mirostat"),
            ("/tasks/wait", {"task_ids": ["task_nope"]}, 404, "", "no task with id 'task_nope'"),
            ("/tasks/wait", {"task_ids": ["t"], "mode": "most"}, 422, "mode", 'mode must be "all"'),
            ("/tasks/wait", {"mode": "all"}, 422, "task_ids", "task_ids is required"),
        ]
        for path, body, status, field, says in cases:
            reply = http.post(path, json=body)
            assert reply.status_code == status, (path, body, reply.text)
            assert says in reply.json()["error"], (body, reply.json())
            assert reply.json().get("field", "") == field, (body, reply.json())
        bad = http.post("/tasks/delegate", json={"tasks": [{"prompt": "a"}, {"prompt": ""}]})
        assert bad.json()["index"] == 1
        assert sum(http.get("/tasks").json()["counts"].values()) == 0
