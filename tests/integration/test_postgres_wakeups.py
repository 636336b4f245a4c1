"""Worker processes on PostgreSQL: a new task wakes one idle worker, not all of them.

Which workers a notification woke is read from outside, in /proc: an idle worker sleeps in
its wait (here a long one: ``poll_s`` and ``heartbeat_s`` far beyond the test) and is not
scheduled at all until something wakes it. Every worker's id is unique to the test (the
channels are per database, shared with every other test using the server).
"""

from __future__ import annotations

import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from koubou_mcp import queue
from koubou_mcp.config import Settings
from koubou_mcp.models import TaskStatus, WorkerStatus, utcnow
from koubou_mcp.store import Store, open_store
from tests.fakes.ollama_server import FakeOllama
from tests.support.processes import Processes, processes
from tests.support.procfs import times_scheduled
from tests.support.tasks import ended
from tests.support.waiting import wait_until

pytestmark = pytest.mark.postgres

#: how long an idle worker sleeps before it looks anyway (and heartbeats): longer than a test
QUIET_S = 60.0


class Pool:
    """Worker processes on one store, and which of them ran since the last ``settle``."""

    def __init__(self, store: Store, settings: Settings, procs: Processes, n: int) -> None:
        self.store = store
        self.settings = settings
        tag = secrets.token_hex(3)
        self.ids = [f"wake-{tag}-{i}" for i in range(n)]
        self.procs: dict[str, subprocess.Popen[bytes]] = {
            worker_id: procs.worker(settings, worker_id) for worker_id in self.ids}
        self._seen: dict[str, int] = {}

    def _sample(self) -> dict[str, int]:
        return {worker_id: times_scheduled(p.pid) for worker_id, p in self.procs.items()}

    def settle(self) -> None:
        """Wait until every worker is idle and asleep (none scheduled over 0.3 s)."""
        last: list[dict[str, int]] = [{}]

        def asleep() -> bool:
            for worker_id, p in self.procs.items():
                assert p.poll() is None, f"worker {worker_id} exited"
            idle = {w.worker_id for w in queue.list_workers(self.store)
                    if w.status == WorkerStatus.IDLE.value}
            now, before = self._sample(), last[0]
            last[0] = now
            return idle >= set(self.ids) and now == before

        wait_until(asleep, timeout=30, interval=0.3, message="every worker idle and asleep")
        self._seen = last[0]

    def woken(self) -> set[str]:
        """The workers that ran since the last ``settle`` (call ``settle`` first again)."""
        before = self._seen
        self.settle()
        return {w for w, n in self._seen.items() if n != before[w]}


@pytest.fixture
def procs() -> Iterator[Processes]:
    with processes() as p:
        yield p


@pytest.fixture
def tagged(pg_url: str) -> tuple[str, str]:
    """The test's URL with an application name of its own (to find its connections)."""
    app = f"koubou_t_{secrets.token_hex(4)}"
    return f"{pg_url}&application_name={app}", app


@pytest.fixture
def quiet(settings: Settings, tagged: tuple[str, str], tmp_path: Path) -> Iterator[Settings]:
    """Settings whose idle workers sleep for ``QUIET_S`` unless woken, on a stand-in Ollama
    that takes 0.3 s a request (so that the tasks of one batch run side by side)."""
    with FakeOllama(models=["gpt-oss:20b"], latency_s=0.3) as fake:
        yield settings.with_overrides(
            database_url=tagged[0], ollama_url=fake.url, workdir=tmp_path, poll_s=QUIET_S,
            heartbeat_s=QUIET_S, lease_s=3 * QUIET_S, ollama_parallel=8)


@pytest.fixture
def store(quiet: Settings) -> Iterator[Store]:
    store = open_store(quiet.database_url, quiet.run_dir)
    yield store
    store.close()


def _submit(store: Store, settings: Settings, n: int, label: str) -> list[str]:
    """``n`` tasks in one transaction; their ids."""
    requests = [queue.validate_request(settings, f"{label} {i}") for i in range(n)]
    return [e.task.task_id for e in queue.enqueue_many(store, requests, settings, utcnow())]


def _completed_by(store: Store, task_ids: list[str]) -> set[str]:
    done = [wait_until(lambda t=t: ended(store, t), timeout=30,  # type: ignore[misc]
                       message=f"{t} to end") for t in task_ids]
    assert [d.status for d in done] == [TaskStatus.COMPLETED.value] * len(done)
    return {d.worker_id for d in done if d.worker_id is not None}


def test_one_new_task_wakes_one_of_four_idle_workers_and_a_batch_of_k_wakes_k(
    quiet: Settings, store: Store, procs: Processes
) -> None:
    pool = Pool(store, quiet, procs, 4)
    pool.settle()
    for k in (1, 1, 2, 3):
        ran = _completed_by(store, _submit(store, quiet, k, f"batch of {k}"))
        woken = pool.woken()
        assert len(woken) == k, f"{k} new task(s) woke {sorted(woken)}"
        assert ran == woken, "each woken worker ran one of the tasks"


def test_a_task_enqueued_while_every_worker_is_busy_is_run_when_one_finishes(
    quiet: Settings, store: Store, procs: Processes
) -> None:
    pool = Pool(store, quiet, procs, 2)
    pool.settle()
    first = _submit(store, quiet, 2, "keeps both busy")
    wait_until(lambda: all(w.status == WorkerStatus.BUSY.value
                           for w in queue.list_workers(store)), timeout=10,
               message="both workers busy")
    late = _submit(store, quiet, 1, "while both are busy")
    # nobody was idle to be woken: the worker that finishes first looks for work before it
    # sleeps, long before anyone polls (QUIET_S)
    assert len(_completed_by(store, first + late)) == 2


def _listener_pids(url: str, app: str) -> list[int]:
    import psycopg

    admin = url.split("?")[0].replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(admin, autocommit=True) as conn:
        rows = conn.execute("SELECT pid FROM pg_stat_activity WHERE application_name = %s "
                            "AND query LIKE 'LISTEN%%'", (app,)).fetchall()
    return [int(r[0]) for r in rows]


def test_workers_whose_listener_connections_are_killed_run_new_work_without_waiting_to_poll(
    quiet: Settings, store: Store, procs: Processes, tagged: tuple[str, str]
) -> None:
    import psycopg

    url, app = tagged
    pool = Pool(store, quiet, procs, 2)
    pool.settle()
    killed = wait_until(lambda: len(pids := _listener_pids(url, app)) == 2 and pids,
                        timeout=10, message="both workers' LISTEN connections")
    admin = url.split("?")[0].replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(admin, autocommit=True) as conn:
        for pid in killed:
            conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
    # the notification goes to a worker that is not listening: it is lost, but the worker
    # reconnects within a second and looks for work then (the test fails if it waits for
    # its poll, QUIET_S)
    _completed_by(store, _submit(store, quiet, 1, "while nobody listens"))
    wait_until(lambda: len(pids := _listener_pids(url, app)) == 2 and not set(pids) & set(killed),
               timeout=10, message="both listeners to reconnect")
    pool.settle()
    for k in (1, 2):
        ran = _completed_by(store, _submit(store, quiet, k, f"after the outage, {k}"))
        assert pool.woken() == ran and len(ran) == k, "each new task wakes one worker again"
