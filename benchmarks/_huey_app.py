"""The huey side of the throughput benchmark: a SqliteHuey and one task doing our backend call.

The consumer is started as ``python -m huey.bin.huey_consumer benchmarks._huey_app.huey ...``
with ``KOUBOU_BENCH_HUEY_DB`` naming the database file; the benchmark process calls
``create(path)`` to enqueue into the same file. Both register the task under the same name.

Fairness: huey's SQLite storage uses WAL by default but leaves ``synchronous`` at SQLite's FULL
(an fsync per commit); ours runs WAL with ``synchronous=NORMAL``. The storage here sets NORMAL
too, so both pay the same durability price. The task makes the same request the koubou-mcp
Ollama backend makes (``POST /api/chat``, not streamed) with httpx, reusing one client per
worker process, and returns the reply's text (which huey stores as the result).
"""

from __future__ import annotations

import os
from typing import Any

import httpx
from huey import SqliteHuey
from huey.storage import SqliteStorage

_client: httpx.Client | None = None


class NormalSyncSqliteStorage(SqliteStorage):
    """huey's SQLite storage with ``PRAGMA synchronous=NORMAL``, as koubou-mcp runs SQLite."""

    def _create_connection(self) -> Any:
        conn = super()._create_connection()
        conn.execute("pragma synchronous=NORMAL")
        return conn


class BenchHuey(SqliteHuey):
    storage_class = NormalSyncSqliteStorage


def chat(url: str, model: str, prompt: str) -> str:
    """One non-streamed chat turn, as ``OllamaBackend.run`` sends it."""
    global _client
    if _client is None:  # one per process, created after huey forked it
        _client = httpx.Client(timeout=httpx.Timeout(60.0, connect=5.0))
    response = _client.post(f"{url}/api/chat", json={
        "model": model, "messages": [{"role": "user", "content": prompt}], "stream": False})
    response.raise_for_status()
    return str(response.json()["message"]["content"])


def create(filename: str) -> tuple[BenchHuey, Any]:
    """A huey on ``filename`` and its registered ``chat`` task."""
    app = BenchHuey("koubou-bench", filename=filename)
    task = app.task(name="chat")(chat)
    return app, task


_db = os.environ.get("KOUBOU_BENCH_HUEY_DB", "")
huey, chat_task = create(_db) if _db else (None, None)
