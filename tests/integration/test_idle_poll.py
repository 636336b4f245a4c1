"""An idle worker's safety-net poll grows while nothing happens (``KOUBOU_POLL`` up to
``KOUBOU_POLL_MAX``) without making it late for what no wake-up announces: a task waiting out
a retry backoff is claimed when its wait ends, and a task enqueued with no wake-up at all by
the next poll."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from koubou_mcp import queue
from koubou_mcp.config import Settings
from koubou_mcp.models import TaskStatus, utcnow
from koubou_mcp.store import Store, open_store
from koubou_mcp.worker import IdleWait
from tests.fakes.ollama_server import FakeOllama
from tests.support.processes import Processes, processes
from tests.support.tasks import ended
from tests.support.waiting import wait_until


@pytest.fixture
def procs() -> Iterator[Processes]:
    with processes() as p:
        yield p


def test_the_idle_wait_doubles_up_to_its_cap_and_starts_over_after_work() -> None:
    wait = IdleWait(0.5, 3.0)
    seen = []
    for _ in range(5):
        seen.append(wait.wait_s)
        wait.waited(woken=False)
    assert seen == [0.5, 1.0, 2.0, 3.0, 3.0]
    wait.waited(woken=True)
    assert wait.wait_s == 0.5
    wait.waited(woken=False)
    wait.reset()
    assert wait.wait_s == 0.5
    assert IdleWait(2.0, 1.0).poll_max_s == 2.0  # never below KOUBOU_POLL


def _idle_worker(settings: Settings, store: Store, procs: Processes) -> None:
    procs.worker(settings, "w1")
    wait_until(lambda: any(w.status == "idle" for w in queue.list_workers(store)),
               timeout=20, message="the worker idle")


def test_a_task_waiting_out_a_backoff_is_claimed_when_its_wait_ends(
        store_settings: Settings, fake_ollama: FakeOllama, tmp_path: Path,
        procs: Processes) -> None:
    # a poll that grows to a minute: without its alarm the worker would sleep through the end
    # of the backoff (0.2 + 0.4 + ... passes 7 s only at 12.6 s)
    slow = store_settings.with_overrides(ollama_url=fake_ollama.url, workdir=tmp_path, poll_s=0.2,
                                   poll_max_s=60.0, lease_s=60.0)
    store = open_store(slow.database_url, slow.run_dir)
    try:
        queue.register_worker(store, "gone", 1, utcnow())
        task = queue.enqueue(store, queue.validate_request(slow, "after a while"), slow,
                             utcnow()).task
        assert queue.claim_next(store, "gone", utcnow(), 60.0) is not None
        _idle_worker(slow, store, procs)
        # the other worker failed transiently: the task waits 7 s, and the failure's wake-up
        # finds nothing ready
        failed = queue.fail(store, task.task_id, "gone", "connection reset", utcnow(),
                            retry=True, backoff=(7.0, 7.0), jitter=1.0)
        assert failed is not None and failed.status == TaskStatus.PENDING.value
        ready_at = failed.not_before
        assert ready_at is not None
        done = wait_until(lambda: ended(store, task.task_id), timeout=30,
                          message="the task after its backoff")
        assert done.status == "completed" and done.started_at is not None
        late = done.started_at - ready_at
        assert late < timedelta(seconds=3), f"claimed {late} after its backoff ended"
    finally:
        store.close()


def test_a_task_no_wake_up_announced_is_claimed_by_the_grown_poll(
        store_settings: Settings, fake_ollama: FakeOllama, tmp_path: Path,
        procs: Processes) -> None:
    quick = store_settings.with_overrides(ollama_url=fake_ollama.url, workdir=tmp_path, poll_s=0.1,
                                    poll_max_s=0.8)
    store = open_store(quick.database_url, quick.run_dir)
    # the same database, its wake-ups sent where no worker listens
    silent = open_store(quick.database_url, tmp_path / "elsewhere")
    try:
        _idle_worker(quick, store, procs)
        request = queue.validate_request(quick, "unannounced")
        task = queue.enqueue(silent, request, quick, utcnow()).task
        done = wait_until(lambda: ended(store, task.task_id), timeout=15,
                          message="the unannounced task")
        assert done.status == "completed"
    finally:
        silent.close()
        store.close()
