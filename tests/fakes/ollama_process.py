"""The stand-in Ollama as a child process, and driving any running stand-in over HTTP.

``FakeOllamaProcess(models, **config)`` starts ``python -m tests.fakes.ollama_server`` with
the flags for ``config`` (any ``FakeConfig`` key) and waits for its ``READY <url>`` line.
"""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from types import TracebackType
from typing import Any

from tests.fakes.ollama_state import DEFAULT_MODELS, FakeConfig
from tests.support.env import plain_env
from tests.support.paths import REPO_ROOT

#: The command-line flag of each setting a process can start with (``FakeConfig`` keys).
FLAGS = {
    "latency_s": "--latency",
    "jitter_s": "--latency-jitter",
    "slots": "--slots",
    "max_queue": "--max-queue",
    "load_s": "--load",
    "keep_alive_s": "--keep-alive",
    "ttft_s": "--ttft",
    "tokens_per_s": "--tokens-per-s",
    "reply_tokens": "--reply-tokens",
    "mode": "--mode",
    "huge_chars": "--huge-chars",
}


def _post_json(url: str, data: dict[str, Any], timeout_s: float = 5.0) -> dict[str, Any]:
    request = urllib.request.Request(
        url,
        data=json.dumps(data).encode("utf-8"),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        result: dict[str, Any] = json.loads(response.read())
        return result


def configure_remote(url: str, **changes: Any) -> dict[str, Any]:
    """``POST {url}/_fake/config``."""
    return _post_json(f"{url}/_fake/config", changes)


def remote_stats(url: str) -> dict[str, Any]:
    """``GET {url}/_fake/stats``."""
    with urllib.request.urlopen(f"{url}/_fake/stats", timeout=5.0) as response:
        result: dict[str, Any] = json.loads(response.read())
        return result


class FakeOllamaProcess:
    """The fake server as a child process (``python -m tests.fakes.ollama_server``)."""

    def __init__(
        self,
        models: Sequence[str] = DEFAULT_MODELS,
        *,
        python: str = sys.executable,
        start_timeout_s: float = 15.0,
        **config: Any,
    ) -> None:
        unknown = sorted(set(config) - set(FLAGS))
        if unknown:
            raise ValueError(f"settings a process cannot start with: {', '.join(unknown)}")
        FakeConfig().update(config)  # a bad value fails here, not as a child that never starts
        self.argv = [python, "-m", "tests.fakes.ollama_server", "--port", "0", "--models", *models]
        for name, value in config.items():
            self.argv += [FLAGS[name], str(value)]
        self.start_timeout_s = start_timeout_s
        self.process: subprocess.Popen[bytes] | None = None
        self._url: str | None = None

    @property
    def url(self) -> str:
        if self._url is None:
            raise RuntimeError("FakeOllamaProcess is not started")
        return self._url

    def start(self) -> FakeOllamaProcess:
        self.process = subprocess.Popen(
            self.argv, cwd=REPO_ROOT, env=plain_env(), stdout=subprocess.PIPE, stdin=subprocess.DEVNULL
        )
        try:
            self._url = self._read_ready_line()
        except BaseException:
            self.stop()
            raise
        return self

    def _read_ready_line(self) -> str:
        assert self.process is not None and self.process.stdout is not None
        deadline = time.monotonic() + self.start_timeout_s
        buffer = b""
        with selectors.DefaultSelector() as selector:
            selector.register(self.process.stdout, selectors.EVENT_READ)
            while b"\n" not in buffer:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError("fake Ollama did not print READY in time")
                if not selector.select(remaining):
                    continue
                data = os.read(self.process.stdout.fileno(), 4096)
                if not data:
                    raise RuntimeError(f"fake Ollama exited before READY (code {self.process.poll()})")
                buffer += data
        line = buffer.split(b"\n", 1)[0].decode()
        if not line.startswith("READY "):
            raise RuntimeError(f"unexpected first line from fake Ollama: {line!r}")
        return line.split(" ", 1)[1].strip()

    def stop(self, timeout_s: float = 5.0) -> None:
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout_s)
        if process.stdout is not None:
            process.stdout.close()
        self.process = None

    def __enter__(self) -> FakeOllamaProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def configure(self, **changes: Any) -> dict[str, Any]:
        return configure_remote(self.url, **changes)

    def stats(self) -> dict[str, Any]:
        return remote_stats(self.url)

    def reset_stats(self) -> None:
        _post_json(f"{self.url}/_fake/reset", {})

    def release(self) -> None:
        _post_json(f"{self.url}/_fake/release", {})
