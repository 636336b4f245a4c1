"""Stand-ins for the outside world: an Ollama HTTP server and a ``codex`` executable.

- ``tests.fakes.ollama_server``: ``FakeOllama`` (in-process), ``FakeOllamaProcess`` (child
  process), and ``python -m tests.fakes.ollama_server`` (standalone).
- ``tests/fakes/codex``: an executable standing in for the Codex CLI (``FAKE_CODEX_PATH``);
  its behaviour is chosen with ``FAKE_CODEX_*`` environment variables (see the script).

Also small helpers for tests that use them (the synchronous ``wait_until`` and ``pid_alive``
live in ``tests.waiting``).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import anyio

FAKES_DIR = Path(__file__).resolve().parent
#: The fake Codex CLI; put ``FAKES_DIR`` first on PATH to have it found as ``codex``.
FAKE_CODEX_PATH = FAKES_DIR / "codex"


def fake_codex_env(base: Mapping[str, str] | None = None, **overrides: str) -> dict[str, str]:
    """An environment for running the fake Codex: ``base`` (default: ours) plus ``overrides``.

    The running interpreter's directory goes first on PATH, so the script's
    ``#!/usr/bin/env python3`` starts this same Python directly (no shim, fast).
    """
    env = dict(os.environ if base is None else base)
    python_dir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join(p for p in (python_dir, env.get("PATH", "")) if p)
    env.update(overrides)
    return env


async def async_wait_until(
    predicate: Callable[[], object | Awaitable[object]],
    timeout: float = 5.0,
    interval: float = 0.01,
) -> None:
    """``tests.waiting.wait_until`` for async tests (the predicate may be sync or async)."""
    deadline = anyio.current_time() + timeout
    while True:
        value = predicate()
        if isinstance(value, Awaitable):
            value = await value
        if value:
            return
        if anyio.current_time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {predicate!r}")
        await anyio.sleep(interval)


def read_pidfile(path: Path) -> dict[str, int] | None:
    """The ``{"parent": pid, "child": pid}`` the fake Codex writes in ``hang`` mode, if any."""
    try:
        data: dict[str, int] = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None
    return data


def read_records(path: Path) -> list[dict[str, Any]]:
    """The JSON lines the fake Codex appends to ``FAKE_CODEX_RECORD``, one per run."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
