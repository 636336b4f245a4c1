"""The status page at ``/`` of the HTTP server, in a real headless browser (Debian's
chromium): it shows the pool as ``top`` does, escapes what models wrote, reloads itself, and
renders to a screenshot that is not blank."""

from __future__ import annotations

import shutil
import struct
import subprocess
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from koubou_mcp.config import Settings
from tests.e2e.conftest import Leftovers
from tests.e2e.test_http import HttpServer, http_server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Hostile model output: it must reach the page as text, never as markup.
MARKUP = "<script>document.title='owned'</script><b>bold</b>"


@pytest.fixture
def server(e2e_settings: Settings, leftovers: Leftovers) -> Iterator[HttpServer]:
    with http_server(e2e_settings, leftovers) as running:
        yield running


def chromium(*args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM, "this test needs Debian's chromium (.ci/run installs it)"
    profile = tempfile.mkdtemp(prefix="koubou-chromium-")
    try:
        # The flags keep a headless Chromium off the network it would otherwise try to reach
        # at start (updates, sync): this machine's network is closed.
        return subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", f"--user-data-dir={profile}", *args],
            capture_output=True, text=True, timeout=timeout, check=False)
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def png_pixels(path: Path) -> tuple[int, int, bytes]:
    """Width, height and the inflated scanlines of a PNG (enough to see it is not blank)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, width, height = 8, b"", 0, 0
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunk = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height = struct.unpack(">II", chunk[:8])
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + length
    return width, height, zlib.decompress(idat)


def test_the_status_page_shows_the_pool_in_a_real_browser(server: HttpServer,
                                                          tmp_path: Path) -> None:
    with server.client() as http:
        done = http.post("/task/delegate", json={"prompt": MARKUP, "sync": True, "wait_s": 30})
        assert done.status_code == 200 and done.json()["status"] == "completed", done.text
        page = http.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<meta http-equiv="refresh" content="2">' in page.text
    assert "<script>" not in page.text and "&lt;script&gt;" in page.text

    dom = chromium("--dump-dom", f"{server.url}/")
    assert dom.returncode == 0, dom.stderr[-2000:]
    for text in ("koubou-mcp", "Workers", "Queue by priority", "Model-server slots",
                 "Recent results", "echo: &lt;script&gt;"):
        assert text in dom.stdout, (text, dom.stdout[-3000:])
    assert "<title>koubou-mcp status</title>" in dom.stdout, "the model's script ran"

    shot = tmp_path / "status.png"
    taken = chromium(f"--screenshot={shot}", "--window-size=1280,900", f"{server.url}/")
    assert taken.returncode == 0 and shot.exists(), taken.stderr[-2000:]
    width, height, pixels = png_pixels(shot)
    assert (width, height) == (1280, 900)
    assert len(set(pixels)) > 16, "the screenshot is blank"


def test_the_status_page_takes_no_parameters_and_is_only_read(server: HttpServer) -> None:
    with server.client() as http:
        assert http.get("/", params={"x": "1"}).status_code == 422
        assert http.post("/").status_code == 405
