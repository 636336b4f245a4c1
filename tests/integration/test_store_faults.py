"""Real worker processes whose store fails under them: a SQLite database locked past the busy
timeout while a task runs, PostgreSQL connections killed (``pg_terminate_backend``) over and over
while a queue drains, and a SQLite file deleted under a running worker. The worker logs the
outage once, backs off, goes on, and no task loses an attempt to it."""

from __future__ import annotations

import os
import secrets
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from koubou_mcp import queue
from koubou_mcp.config import Settings
from koubou_mcp.models import TaskStatus, utcnow
from koubou_mcp.store import Store, open_store
from tests.fakes.ollama_server import FakeOllama
from tests.support.processes import Processes, processes, wait_exit
from tests.support.tasks import ended
from tests.support.waiting import wait_until


@pytest.fixture
def procs() -> Iterator[Processes]:
    with processes() as p:
        yield p


def _submit(store: Store, settings: Settings, prompt: str) -> str:
    request = queue.validate_request(settings, prompt)
    return queue.enqueue(store, request, settings, utcnow()).task.task_id


def _log(settings: Settings, worker_id: str) -> str:
    path = settings.home / f"{worker_id}.stderr"
    return path.read_text(errors="replace") if path.exists() else ""


def test_a_worker_outlives_a_database_locked_past_the_busy_timeout_mid_task(
    settings: Settings, fake_ollama: FakeOllama, procs: Processes, tmp_path: Path,
) -> None:
    s = settings.with_overrides(ollama_url=fake_ollama.url, workdir=tmp_path,
                                sqlite_busy_timeout_s=0.2, lease_s=30.0)
    store = open_store(s.database_url, s.run_dir)
    try:
        worker = procs.worker(s, "w-lock")
        fake_ollama.configure(mode="hang")
        task_id = _submit(store, s, "held while the database is locked")
        wait_until(lambda: queue.get_task(store, task_id).status == TaskStatus.IN_PROGRESS,
                   timeout=15, message="the task to start")
        db = sqlite3.connect(str(s.database_url.removeprefix("sqlite:///")), timeout=10,
                             isolation_level=None)
        try:
            db.execute("BEGIN EXCLUSIVE")  # every write now fails after 0.2 s
            wait_until(lambda: "the task store failed" in _log(s, "w-lock"), timeout=15,
                       message="a heartbeat to fail on the lock")
            fake_ollama.release()  # the answer comes while the lock is still held
            fake_ollama.configure(mode="ok")
            wait_until(lambda: _log(s, "w-lock").count("the task store failed") >= 1
                       and worker.poll() is None, timeout=5)
        finally:
            db.execute("ROLLBACK")
            db.close()
        done = wait_until(lambda: ended(store, task_id), timeout=20, message="the task to end")
        assert (done.status, done.attempts) == ("completed", 1), done
        assert worker.poll() is None, "the worker survived the lock"
        # logged just after the call that succeeded, so perhaps a moment after the task ended
        wait_until(lambda: "answers again" in _log(s, "w-lock"), timeout=10,
                   message="the worker to note that the store is back")
        assert _log(s, "w-lock").count("the task store failed") == 1, "logged once per outage"
        after = _submit(store, s, "and the next one")
        assert wait_until(lambda: ended(store, after), timeout=20).status == "completed"
    finally:
        store.close()


def test_a_supervised_worker_stops_when_its_sqlite_file_is_deleted_and_makes_no_new_one(
    settings: Settings, fake_ollama: FakeOllama, procs: Processes, tmp_path: Path,
) -> None:
    s = settings.with_overrides(ollama_url=fake_ollama.url, workdir=tmp_path)
    store = open_store(s.database_url, s.run_dir)
    path = Path(s.database_url.removeprefix("sqlite:///"))
    try:
        # as if supervised by this process (its parent): such a worker's store must exist
        worker = procs.worker(s, "w-del", {"KOUBOU_SUPERVISOR_PID": str(os.getpid())})
        wait_until(lambda: any(w.worker_id == "w-del" for w in queue.list_workers(store)),
                   timeout=15, message="the worker to register")
    finally:
        store.close()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    wait_exit(worker, timeout=15)
    assert "was deleted while in use" in _log(s, "w-del")
    assert not path.exists(), "the worker did not quietly start an empty database"


# -- PostgreSQL -------------------------------------------------------------------------------

def _admin(pg_url: str) -> str:
    return pg_url.split("?")[0].replace("postgresql+psycopg://", "postgresql://")


def _backends(pg_url: str, app: str) -> list[int]:
    import psycopg

    with psycopg.connect(_admin(pg_url), autocommit=True) as conn:
        rows = conn.execute("SELECT pid FROM pg_stat_activity WHERE application_name = %s",
                            (app,)).fetchall()
    return [int(r[0]) for r in rows]


def _kill_backends(pg_url: str, app: str) -> int:
    import psycopg

    with psycopg.connect(_admin(pg_url), autocommit=True) as conn:
        rows = conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                            "WHERE application_name = %s", (app,)).fetchall()
    return sum(1 for r in rows if r[0])


TASKS = 60
KILL_ROUNDS = 8


@pytest.mark.postgres
def test_chaos_postgres_connections_killed_mid_drain_lose_nothing(
    settings: Settings, pg_url: str, procs: Processes, tmp_path: Path,
) -> None:
    """Two workers drain a queue while every connection they hold is killed, round after
    round: every task completes once, on its first attempt, and both workers live on."""
    app = f"koubou_chaos_{secrets.token_hex(4)}"
    url = f"{pg_url}&application_name={app}"
    with FakeOllama(models=["gpt-oss:20b"]) as fake:
        fake.configure(latency_s=0.05, jitter_s=0.1)
        s = settings.with_overrides(database_url=url, ollama_url=fake.url, workdir=tmp_path,
                                    lease_s=30.0, ollama_parallel=4)
        store = open_store(pg_url, s.run_dir)  # the test's own connections are not killed
        try:
            workers = [procs.worker(s, f"pg-chaos-{i}") for i in range(2)]
            # idle, not just connected: a worker whose connection is killed while it starts
            # (opening the store, registering) exits with an error, and the supervisor that
            # would start it again is not part of this test
            wait_until(lambda: {w.worker_id for w in queue.list_workers(store)
                                if w.status == "idle"} >= {"pg-chaos-0", "pg-chaos-1"},
                       timeout=30, message="both workers to be idle")
            assert len(_backends(url, app)) >= 2
            ids = [_submit(store, s, f"task {i}") for i in range(TASKS)]
            kills, rounds = 0, 0

            def remaining() -> int:
                return sum(1 for t in ids if ended(store, t) is None)

            while rounds < KILL_ROUNDS and remaining() > 0:
                before = TASKS - remaining()
                # wait for some progress between kills (not a sleep: the queue must move)
                wait_until(lambda b=before: TASKS - remaining() > b or remaining() == 0,  # type: ignore[misc]
                           timeout=60, message="the queue to move between kills")
                kills += _kill_backends(url, app)
                rounds += 1
            done = [wait_until(lambda t=t: ended(store, t), timeout=120,  # type: ignore[misc]
                               message=f"{t} to end") for t in ids]
            assert rounds >= 3 and kills >= rounds, f"{rounds} rounds, {kills} connections"
            assert [d.status for d in done] == ["completed"] * TASKS
            assert [d.attempts for d in done] == [1] * TASKS, "no attempt lost to the store"
            assert all(d.result == f"echo: task {i}" for i, d in enumerate(done))
            assert [w.poll() for w in workers] == [None, None], "both workers live on"
            calls = len(fake.stats()["calls"])
            print(f"postgres chaos: {TASKS} tasks, {rounds} kill rounds, {kills} connections "
                  f"killed, {calls} model calls")
        finally:
            store.close()
