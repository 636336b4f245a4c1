"""The HTTP transport's limits, against a real server process over real sockets: one body limit
whatever the framing, deadlines for half-open connections, a connection cap, a cap on MCP
sessions per client, and sync waits that end when their client leaves."""

from __future__ import annotations

import contextlib
import json
import socket
from collections.abc import Iterator

import httpx
import pytest

from koubou_mcp.config import Settings
from tests.e2e.conftest import Leftovers
from tests.e2e.test_http import HttpServer, http_server
from tests.support.waiting import wait_until

INITIALIZE = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
    "protocolVersion": "2025-06-18", "capabilities": {},
    "clientInfo": {"name": "limits-test", "version": "0"}}}
MCP_HEADERS = {"Accept": "application/json, text/event-stream"}


@pytest.fixture
def limited(e2e_settings: Settings, leftovers: Leftovers) -> Iterator[HttpServer]:
    """A front end only (tasks stay pending) with short prompts and tight limits."""
    settings = e2e_settings.with_overrides(
        max_prompt_chars=1000, http_header_timeout_s=2.0, http_max_connections=6,
        http_sessions_per_client=2, http_session_idle_s=600.0)
    with http_server(settings, leftovers, "--no-pool") as server:
        yield server


def _address(server: HttpServer) -> tuple[str, int]:
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


@contextlib.contextmanager
def _connection(server: HttpServer) -> Iterator[socket.socket]:
    sock = socket.create_connection(_address(server), timeout=10)
    try:
        yield sock
    finally:
        sock.close()


def _read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (or 10 s pass)."""
    data = b""
    with contextlib.suppress(TimeoutError, ConnectionResetError):
        while chunk := sock.recv(65536):
            data += chunk
    return data


def test_a_content_length_beside_chunked_framing_does_not_bypass_the_body_limit(
    limited: HttpServer,
) -> None:
    limit = 6 * 1000 + 64 * 1024
    body = b'{"prompt": "' + b"x" * (limit + 10) + b'"}'
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 4096]), body[i:i + 4096])
                       for i in range(0, len(body), 4096)) + b"0\r\n\r\n"
    head = (b"POST /task/delegate HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nContent-Length: 20\r\n"
            b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
    with _connection(limited) as sock:
        sock.sendall(head)
        with contextlib.suppress(OSError):  # the server may answer and close mid-body
            sock.sendall(chunked)
        reply = _read_all(sock)
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    with limited.client() as http:
        assert http.get("/tasks").json()["counts"]["pending"] == 0


def _closed_by_server(sock: socket.socket) -> bool:
    """Whether the server closes ``sock`` without a word within 10 s (the deadline is 2 s)."""
    try:
        return sock.recv(65536) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_a_connection_that_never_finishes_its_headers_is_closed(limited: HttpServer) -> None:
    with _connection(limited) as silent, _connection(limited) as slow:
        slow.sendall(b"GET /tasks HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and never the end
        assert _closed_by_server(silent)
        assert _closed_by_server(slow)


def test_a_body_that_never_arrives_gets_408(limited: HttpServer) -> None:
    with _connection(limited) as sock:
        sock.sendall(b"POST /task/delegate HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Length: 100\r\n\r\n{\"prompt\"")
        assert _read_all(sock).startswith(b"HTTP/1.1 408")


def test_past_the_connection_cap_a_new_connection_gets_503_until_one_closes(
    limited: HttpServer,
) -> None:
    with contextlib.ExitStack() as held:
        for _ in range(6):
            sock = held.enter_context(_connection(limited))
            sock.sendall(b"GET /tasks HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            sock.recv(65536)  # answered, kept open (keep-alive)
        with _connection(limited) as extra:
            extra.sendall(b"GET /tasks HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert _read_all(extra).startswith(b"HTTP/1.1 503")
    wait_until(lambda: _answered(limited), timeout=10, message="a connection once others closed")


def _answered(server: HttpServer) -> bool:
    try:
        return httpx.get(f"{server.url}/tasks", timeout=5).status_code == 200
    except httpx.TransportError:
        return False


def test_one_client_cannot_open_more_mcp_sessions_than_its_share(limited: HttpServer) -> None:
    with limited.client() as http:
        opened = []
        for _ in range(2):
            reply = http.post("/mcp", json=INITIALIZE, headers=MCP_HEADERS)
            assert reply.status_code == 200, reply.text
            opened.append(reply.headers["mcp-session-id"])
        refused = http.post("/mcp", json=INITIALIZE, headers=MCP_HEADERS)
        assert refused.status_code == 429
        assert "2 open MCP sessions" in refused.json()["error"]
        ended = http.delete("/mcp", headers={**MCP_HEADERS, "mcp-session-id": opened[0]})
        assert ended.status_code in (200, 204), ended.text
        again = http.post("/mcp", json=INITIALIZE, headers=MCP_HEADERS)
        assert again.status_code == 200, again.text


def test_a_sync_wait_ends_when_its_client_goes_away(limited: HttpServer) -> None:
    body = b'{"prompt": "nobody runs this", "sync": true, "wait_s": 90}'
    with _connection(limited) as sock:
        sock.sendall(b"POST /task/delegate HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                     % (len(body), body))
        with limited.client() as http:
            wait_until(lambda: http.get("/tasks").json()["counts"]["pending"] == 1, timeout=10,
                       message="the task to be queued")
    wait_until(lambda: "stopped waiting" in limited.stderr(), timeout=10,
               message="the server to stop waiting for a client that left")


def _mcp_session(http: httpx.Client) -> dict[str, str]:
    """The headers of a new MCP session (2025-06-18, the era Claude Code speaks), initialized."""
    reply = http.post("/mcp", json=INITIALIZE, headers=MCP_HEADERS)
    assert reply.status_code == 200, reply.text
    headers = {**MCP_HEADERS, "mcp-session-id": reply.headers["mcp-session-id"],
               "mcp-protocol-version": "2025-06-18"}
    done = http.post("/mcp", json={"jsonrpc": "2.0", "method": "notifications/initialized"},
                     headers=headers)
    assert done.status_code == 202, done.text
    return headers


@pytest.mark.parametrize("tool", ["delegate_task", "wait_tasks"])
def test_an_mcp_sync_wait_ends_when_its_client_goes_away(limited: HttpServer, tool: str) -> None:
    """The tool call runs in the MCP session, not in the request that carried it: the server
    must notice that request's connection closing and stop polling the store at once, not
    after wait_s (90 s here)."""
    with limited.client() as http:
        headers = _mcp_session(http)
        if tool == "delegate_task":
            arguments: dict[str, object] = {"prompt": "nobody runs this", "sync": True,
                                            "wait_s": 90}
        else:
            queued = http.post("/task/delegate", json={"prompt": "nobody runs this either"})
            assert queued.status_code == 200, queued.text
            arguments = {"task_ids": [queued.json()["task_id"]], "wait_s": 90}
        body = json.dumps({"jsonrpc": "2.0", "id": 7, "method": "tools/call",
                           "params": {"name": tool, "arguments": arguments}}).encode()
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        with _connection(limited) as sock:
            sock.sendall(b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                         b"application/json\r\n%sContent-Length: %d\r\n\r\n%s"
                         % (head.encode(), len(body), body))
            started = sock.recv(65536)  # the SSE stream opens once the call is dispatched
            assert started.startswith(b"HTTP/1.1 200"), started
            wait_until(lambda: http.get("/tasks").json()["counts"]["pending"] == 1,
                       timeout=10, message="the task to be queued")
            assert f"left during {tool}" not in limited.stderr()
        wait_until(lambda: f"the MCP client left during {tool}" in limited.stderr(), timeout=5,
                   message=f"the server to stop {tool}'s wait for a client that left")
        # the session itself goes on
        listed = http.post("/mcp", headers=headers, json={
            "jsonrpc": "2.0", "id": 8, "method": "tools/call",
            "params": {"name": "list_tasks", "arguments": {}}})
        assert listed.status_code == 200 and "nobody runs this" in listed.text, listed.text
