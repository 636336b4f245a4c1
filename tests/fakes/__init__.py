"""Stand-ins for the outside world: an Ollama HTTP server and a ``codex`` executable.

- ``tests.fakes.ollama_server``: ``FakeOllama`` (in-process), ``FakeOllamaProcess`` (child
  process), and ``python -m tests.fakes.ollama_server`` (standalone).
- ``tests/fakes/codex``: an executable standing in for the Codex CLI
  (``tests.support.paths.FAKE_CODEX_PATH``; run it with ``tests.support.env.fake_codex_env``);
  its behaviour is chosen with ``FAKE_CODEX_*`` environment variables (see the script).

Also the readers of what the fake Codex writes. Waiting, paths and environments live in
``tests.support``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


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
