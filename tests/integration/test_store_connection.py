"""A standalone worker on PostgreSQL whose wake-up listener's connection is killed by the
server (``pg_terminate_backend``, as in a restart or a failover) keeps serving tasks."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from koubou_mcp import queue
from koubou_mcp.config import Settings
from koubou_mcp.models import utcnow
from koubou_mcp.store import Store, open_store
from tests.fakes.ollama_server import FakeOllama
from tests.support.processes import Processes, processes
from tests.support.tasks import ended
from tests.support.waiting import wait_until

pytestmark = pytest.mark.postgres


def _admin(pg_url: str) -> str:
    return pg_url.split("?")[0].replace("postgresql+psycopg://", "postgresql://")


def _listener_pids(pg_url: str, app: str) -> list[int]:
    import psycopg

    with psycopg.connect(_admin(pg_url), autocommit=True) as conn:
        rows = conn.execute("SELECT pid FROM pg_stat_activity WHERE application_name = %s "
                            "AND query LIKE 'LISTEN%%'", (app,)).fetchall()
    return [int(r[0]) for r in rows]


@pytest.fixture
def procs() -> Iterator[Processes]:
    with processes() as p:
        yield p


@pytest.fixture
def tagged(pg_url: str) -> tuple[str, str]:
    """The test's URL with an application name of its own, so that only this test's
    connections are found (and killed) among those of everything else using the server."""
    app = f"koubou_t_{secrets.token_hex(4)}"
    return f"{pg_url}&application_name={app}", app


def test_a_worker_whose_listener_connection_is_killed_keeps_serving_tasks(
    settings: Settings, tagged: tuple[str, str], procs: Processes, tmp_path: Path
) -> None:
    url, app = tagged
    with FakeOllama(models=["gpt-oss:20b"]) as fake:
        s = settings.with_overrides(database_url=url, ollama_url=fake.url, workdir=tmp_path)
        store: Store = open_store(url, s.run_dir)
        try:
            worker = procs.worker(s, "pg-w1")
            pids = wait_until(lambda: _listener_pids(url, app), timeout=30,
                              message="the worker's LISTEN connection")
            first = queue.enqueue(store, queue.validate_request(s, "before"), s, utcnow())
            wait_until(lambda: ended(store, first.task.task_id), timeout=30, message="task 1")

            import psycopg
            with psycopg.connect(_admin(url), autocommit=True) as conn:
                for pid in pids:
                    conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
            wait_until(lambda: not set(_listener_pids(url, app)) & set(pids), timeout=10,
                       message="the listener's backend to be gone")

            ids = [queue.enqueue(store, queue.validate_request(s, f"after {i}"), s,
                                 utcnow()).task.task_id for i in range(3)]
            done = [wait_until(lambda t=t: ended(store, t), timeout=30,  # type: ignore[misc]
                               message=f"{t} to end") for t in ids]
            assert [d.status for d in done] == ["completed"] * 3
            assert worker.poll() is None, "the worker is still running"
            wait_until(lambda: _listener_pids(url, app), timeout=30,
                       message="the listener to reconnect")
            log = (s.home / "pg-w1.stderr").read_text()
            assert log.count("lost its PostgreSQL connection") == 1
        finally:
            store.close()
