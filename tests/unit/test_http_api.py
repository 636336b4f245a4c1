"""The HTTP settings and the rules of the HTTP front end that need no server: which binds need
a token, the body limit, reading Host headers."""

from __future__ import annotations

import socket

import httpx
import pytest
from starlette.types import Receive, Scope, Send

from koubou_mcp.config import KNOBS, ConfigError, Settings
from koubou_mcp.http_api import Guard, _hostname, check_bind, is_loopback, max_body_bytes
from koubou_mcp.http_sessions import SessionLimiter
from koubou_mcp.serve import listen

TOKEN = "s3cret-token-0123456789"


@pytest.mark.parametrize("host", ["127.0.0.1", "127.8.9.10", "::1", "[::1]", "localhost",
                                  "LOCALHOST"])
def test_loopback_addresses_need_no_token(host: str) -> None:
    assert is_loopback(host)
    check_bind(host, "")


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20", "10.0.0.1",  # noqa: S104
                                  "koubou.example", "localhost.example"])
def test_every_other_bind_needs_a_token_and_the_refusal_says_how(host: str) -> None:
    assert not is_loopback(host)
    with pytest.raises(ConfigError) as refused:
        check_bind(host, "")
    message = str(refused.value)
    assert f"refusing to serve HTTP on {host}" in message
    assert "KOUBOU_HTTP_TOKEN" in message and "Authorization: Bearer" in message
    check_bind(host, TOKEN)


def test_the_body_limit_leaves_room_for_the_longest_prompt_escaped() -> None:
    assert max_body_bytes(Settings.from_env({}, max_prompt_chars=1000)) == 6000 + 65536
    assert max_body_bytes(Settings.from_env({})) == 6 * 200_000 + 65536


@pytest.mark.parametrize(("header", "name"), [
    ("127.0.0.1:8765", "127.0.0.1"), ("LocalHost", "localhost"), ("[::1]:8765", "::1"),
    ("[::1]", "::1"), ("evil.example:80", "evil.example"), ("user@localhost:1", "localhost"),
    ("", ""),
])
def test_host_headers_and_origins_are_read_without_port_or_brackets(header: str,
                                                                    name: str) -> None:
    assert _hostname(header) == name


def test_the_http_knobs_have_env_vars_defaults_and_flags() -> None:
    s = Settings.from_env({})
    assert (s.transport, s.http_host, s.http_port, s.http_token, s.no_pool) == \
        ("stdio", "127.0.0.1", 8765, "", False)
    assert {KNOBS[k].env for k in ("transport", "http_host", "http_port", "http_token",
                                   "no_pool")} == {
        "KOUBOU_TRANSPORT", "KOUBOU_HTTP_HOST", "KOUBOU_HTTP_PORT", "KOUBOU_HTTP_TOKEN",
        "KOUBOU_NO_POOL"}
    s = Settings.from_env({"KOUBOU_TRANSPORT": "streamable-http", "KOUBOU_HTTP_HOST": "::1",
                           "KOUBOU_HTTP_PORT": "9000", "KOUBOU_HTTP_TOKEN": TOKEN,
                           "KOUBOU_NO_POOL": "yes"})
    assert (s.transport, s.http_host, s.http_port, s.http_token, s.no_pool) == \
        ("streamable-http", "::1", 9000, TOKEN, True)
    assert TOKEN not in repr(s)
    assert Settings.from_env(s.to_env()) == s
    assert Settings.from_env({"KOUBOU_NO_POOL": "0"}, no_pool=True).no_pool is True


@pytest.mark.parametrize(("env", "says"), [
    ({"KOUBOU_TRANSPORT": "sse"}, "KOUBOU_TRANSPORT (--transport) must be stdio or "
                                  "streamable-http"),
    ({"KOUBOU_HTTP_PORT": "0"}, "KOUBOU_HTTP_PORT (--port) must be an integer from 1 to 65535"),
    ({"KOUBOU_HTTP_PORT": "65536"}, "from 1 to 65535"),
    ({"KOUBOU_HTTP_PORT": "http"}, "KOUBOU_HTTP_PORT (--port) must be an integer"),
    ({"KOUBOU_HTTP_HOST": "local host"}, "KOUBOU_HTTP_HOST (--host) must be a host name"),
    ({"KOUBOU_NO_POOL": "maybe"}, "KOUBOU_NO_POOL (--no-pool) must be true or false"),
    ({"KOUBOU_HTTP_TOKEN": "short"}, "KOUBOU_HTTP_TOKEN must be at least 16 printable ASCII"),
    ({"KOUBOU_HTTP_TOKEN": "sixteen chars with spaces"}, "without spaces"),
    ({"KOUBOU_HTTP_TOKEN": "ünïcödé-ünïcödé-ünïcödé"}, "printable ASCII"),
])
def test_bad_http_settings_are_refused_naming_the_variable(env: dict[str, str],
                                                            says: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env(env)
    assert says in str(info.value)
    token = env.get("KOUBOU_HTTP_TOKEN")
    if token:
        assert token not in str(info.value)  # a secret, even a bad one, is not echoed


def test_a_port_in_use_is_reported_before_anything_starts() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError) as refused:
            listen("127.0.0.1", port)
    assert f"cannot listen on 127.0.0.1:{port}" in str(refused.value)
    assert "--port (KOUBOU_HTTP_PORT)" in str(refused.value)
    sock = listen("127.0.0.1", port)  # free again
    sock.close()


async def _ok(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


@pytest.mark.anyio
@pytest.mark.parametrize("host", ["127.0.0.2", "127.8.9.10", "localhost", "[::1]"])
async def test_every_loopback_address_check_bind_allows_without_a_token_is_answered(
    host: str,
) -> None:
    check_bind(host.strip("[]"), "")
    guard = Guard(_ok, token="", max_body=1000)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=guard),
                                 base_url=f"http://{host}:8765") as client:
        assert (await client.get("/tasks")).status_code == 200
        refused = await client.get("/tasks", headers={"Host": "evil.example"})
        assert refused.status_code == 421


def test_a_client_gets_its_share_of_sessions_and_idle_ones_expire() -> None:
    limiter = SessionLimiter(per_client=2, idle_s=10.0)
    assert limiter.admit("10.0.0.1", 0.0) and limiter.admit("10.0.0.1", 0.0)
    assert not limiter.admit("10.0.0.1", 0.0), "two opening already"
    limiter.opened("10.0.0.1", "a", 0.0)
    limiter.abandoned("10.0.0.1")  # the second never opened one
    assert limiter.admit("10.0.0.1", 1.0)
    limiter.opened("10.0.0.1", "b", 1.0)
    assert not limiter.admit("10.0.0.1", 2.0)
    assert limiter.admit("10.0.0.2", 2.0), "another client has its own share"
    limiter.begin("10.0.0.1", "a")  # a long request keeps "a" open past the idle time
    assert limiter.open_count("10.0.0.1", 50.0) == 1, "b expired, a is in use"
    limiter.end("10.0.0.1", "a", 50.0, closed=False)
    assert limiter.open_count("10.0.0.1", 59.0) == 1
    assert limiter.open_count("10.0.0.1", 60.0) == 0
    limiter.opened("10.0.0.1", "c", 61.0)
    limiter.end("10.0.0.1", "c", 62.0, closed=True)  # DELETE
    assert limiter.open_count("10.0.0.1", 62.0) == 0
