"""Wake-ups: an idle waiter is woken by new work at once, on SQLite (FIFOs) and PostgreSQL."""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from collections.abc import Iterator, Sequence
from datetime import timedelta
from pathlib import Path

import pytest

from koubou_mcp import queue
from koubou_mcp.config import Settings
from koubou_mcp.models import WorkerStatus, utcnow
from koubou_mcp.store import Store, open_store
from koubou_mcp.wakeup import FifoWakeup, Listener, PostgresListener, SelfPipe
from tests.support.waiting import wait_until


def test_enqueue_wakes_a_waiting_listener(store: Store, store_settings: Settings) -> None:
    listener = store.wakeup.listen("waiter")
    try:
        assert not listener.wait(0.05), "nothing happened yet"
        woke: list[float] = []

        def wait() -> None:
            if listener.wait(10):
                woke.append(time.monotonic())

        waiter = threading.Thread(target=wait)
        waiter.start()
        sent = time.monotonic()
        queue.enqueue(store, queue.validate_request(store_settings, "wake up"), store_settings,
                      utcnow())
        waiter.join(timeout=15)
        assert woke, "the listener was not woken"
        assert woke[0] - sent < 5, "woken by the notification, not by the 10 s timeout"
    finally:
        listener.close()


def test_poke_wakes_the_listener_itself(store: Store) -> None:
    listener = store.wakeup.listen("self")
    try:
        listener.poke()
        assert listener.wait(5)
        assert not listener.wait(0.05), "a poke is consumed once"
    finally:
        listener.close()


def test_a_pipe_nobody_reads_any_more_is_removed(tmp_path: Path) -> None:
    wakeup = FifoWakeup(tmp_path / "wake")
    listener = wakeup.listen("gone")
    path = listener.path
    os.close(listener.fileno())  # its owner died without cleaning up
    assert path.exists()
    wakeup.notify()
    assert not path.exists()


def test_notify_with_no_listeners_is_harmless(tmp_path: Path) -> None:
    FifoWakeup(tmp_path / "never-created").notify()


def test_a_self_pipe_wakes_its_own_wait_and_is_harmless_once_closed() -> None:
    pipe = SelfPipe()
    assert not pipe.wait(0.01), "nothing happened yet"
    pipe.poke()
    pipe.poke()
    assert pipe.wait(5)
    assert not pipe.wait(0.01), "both pokes were consumed by one wake-up"
    threading.Timer(0.05, pipe.poke).start()
    assert pipe.wait(5)
    pipe.close()
    pipe.poke()  # after close: no error (a late signal handler)
    pipe.close()


# -- a lost PostgreSQL connection ----------------------------------------------------------

def _terminate(pg_url: str, pid: int) -> None:
    import psycopg

    plain = pg_url.split("?")[0].replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(plain, autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(%s)", (pid,))


def test_a_listener_whose_connection_is_killed_polls_then_reconnects_and_wakes_again(
    pg_url: str, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    settings = settings.with_overrides(database_url=pg_url)
    store = open_store(pg_url, settings.run_dir)
    listener = store.wakeup.listen("survivor")
    assert isinstance(listener, PostgresListener)
    try:
        first = listener.backend_pid()
        assert first is not None
        _terminate(pg_url, first)
        with caplog.at_level(logging.WARNING, logger="koubou_mcp.wakeup"):
            # the dead connection must not raise out of wait(): it returns like a poll
            wait_until(lambda: not listener.wait(0.05) and not listener.connected, timeout=10,
                       message="the listener to notice its lost connection")
            for _ in range(3):
                listener.wait(0.01)
        lost = [r for r in caplog.records if "lost its PostgreSQL connection" in r.message]
        assert len(lost) == 1, "the loss is logged once"
        listener.poke()
        assert listener.wait(5), "a poke still ends the wait while the connection is lost"
        wait_until(lambda: (listener.wait(0.05), listener.connected)[1], timeout=15,
                   message="the listener to reconnect")
        assert listener.backend_pid() != first

        woke: list[bool] = []
        waiter = threading.Thread(target=lambda: woke.append(listener.wait(10)))
        waiter.start()
        queue.enqueue(store, queue.validate_request(settings, "after the outage"), settings,
                      utcnow())
        waiter.join(timeout=15)
        assert woke == [True], "the reconnected listener is woken by new work again"
    finally:
        listener.close()
        store.close()


def _wait_all(listeners: Sequence[Listener], timeout_s: float) -> list[bool]:
    """Every listener waits once, at the same time, in a thread of its own; who woke."""
    woke = [False] * len(listeners)
    started = threading.Barrier(len(listeners) + 1)

    def wait(i: int) -> None:
        started.wait()
        woke[i] = listeners[i].wait(timeout_s)

    threads = [threading.Thread(target=wait, args=(i,)) for i in range(len(listeners))]
    for t in threads:
        t.start()
    started.wait()
    for t in threads:
        t.join(timeout=timeout_s + 10)
        assert not t.is_alive()
    return woke


def test_each_new_task_wakes_one_idle_worker_and_every_supervisor(tmp_path: Path) -> None:
    wakeup = FifoWakeup(tmp_path / "wake")
    workers = [wakeup.listen(f"w{i}", one_of_many=True) for i in range(4)]
    supervisor = wakeup.listen("supervisor")
    try:
        for count in (1, 3):
            # the notification goes out while all of them wait
            threading.Timer(0.2, wakeup.notify, args=(count,)).start()
            woke = _wait_all([*workers, supervisor], timeout_s=1.0)
            assert sum(woke[:4]) == count, woke
            assert woke[4], "the supervisor sees every notification"
    finally:
        for listener in [*workers, supervisor]:
            listener.close()


def test_a_wake_up_nobody_was_idle_for_waits_in_the_pipe_for_the_next_idle_worker(
    tmp_path: Path,
) -> None:
    wakeup = FifoWakeup(tmp_path / "wake")
    first, second = (wakeup.listen(n, one_of_many=True) for n in ("busy-1", "busy-2"))
    try:
        wakeup.notify(2)  # both busy: nobody waits right now
        assert first.wait(0) and second.wait(0), "each takes one of the two"
        assert not first.wait(0.05) and not second.wait(0.05), "and no more"
        first.poke()
        assert first.wait(1) and not second.wait(0.05), "a poke wakes only its own waiter"
    finally:
        first.close()
        second.close()
    assert sorted(p.name for p in (tmp_path / "wake").iterdir()) == ["work.pipe"]


# -- PostgreSQL: one idle worker per new task ----------------------------------------------

@pytest.fixture
def pg_store(pg_url: str, settings: Settings) -> Iterator[Store]:
    store = open_store(pg_url, settings.run_dir)
    yield store
    store.close()


def _idle_workers(store: Store, n: int) -> list[str]:
    """``n`` workers rows, idle, as workers write them (ids unique to this test: channels are
    per database, shared with every other test using the server)."""
    ids = [f"wake-{secrets.token_hex(4)}-{i}" for i in range(n)]
    for worker_id in ids:
        queue.register_worker(store, worker_id, os.getpid(), utcnow())
        queue.set_worker_status(store, worker_id, WorkerStatus.IDLE, utcnow())
    return ids


def test_on_postgres_each_new_task_wakes_one_idle_worker_and_every_supervisor(
    pg_store: Store, settings: Settings
) -> None:
    ids = _idle_workers(pg_store, 4)
    workers = [pg_store.wakeup.listen(worker_id, one_of_many=True) for worker_id in ids]
    supervisor = pg_store.wakeup.listen("supervisor")
    try:
        for count in (1, 2, 3):
            # the tasks are enqueued (in one transaction) while all of them wait
            requests = [queue.validate_request(settings, f"batch of {count}")] * count
            threading.Timer(0.2, queue.enqueue_many,
                            args=(pg_store, requests, settings, utcnow())).start()
            woke = _wait_all([*workers, supervisor], timeout_s=1.0)
            assert sum(woke[:4]) == count, woke
            assert woke[4], "the supervisor sees every notification"
    finally:
        for listener in [*workers, supervisor]:
            listener.close()


def test_on_postgres_two_tasks_in_a_row_wake_two_workers_and_busy_ones_are_not_woken(
    pg_store: Store, settings: Settings
) -> None:
    ids = _idle_workers(pg_store, 3)
    busy = ids[2]
    queue.set_worker_status(pg_store, busy, WorkerStatus.BUSY, utcnow())
    workers = [pg_store.wakeup.listen(worker_id, one_of_many=True) for worker_id in ids]

    def two_in_a_row() -> None:
        for i in range(2):
            queue.enqueue(pg_store, queue.validate_request(settings, f"in a row {i}"), settings,
                          utcnow())

    try:
        # the first woken worker has not claimed yet when the second task comes: the second
        # wakes the other idle worker, not the same one again, and never the busy one
        threading.Timer(0.2, two_in_a_row).start()
        assert _wait_all(workers, timeout_s=1.0) == [True, True, False]
        # with every worker busy nobody is woken (a busy worker looks for work before it
        # sleeps again); the next idle one is
        for worker_id in ids[:2]:
            queue.set_worker_status(pg_store, worker_id, WorkerStatus.BUSY, utcnow())
        threading.Timer(0.2, two_in_a_row).start()
        assert _wait_all(workers, timeout_s=1.0) == [False, False, False]
        queue.set_worker_status(pg_store, busy, WorkerStatus.IDLE, utcnow())
        pg_store.notify_new_work(5)  # e.g. tasks given back: more than there are idle workers
        assert _wait_all(workers, timeout_s=1.0) == [False, False, True]
    finally:
        for listener in workers:
            listener.close()


def test_on_postgres_a_new_task_wakes_the_worker_idle_most_recently(
    pg_store: Store, settings: Settings
) -> None:
    # three idle workers, idle since 30, 20 and 10 s ago
    ids = _idle_workers(pg_store, 3)
    for ago, worker_id in zip((30, 20, 10), ids, strict=True):
        queue.set_worker_status(pg_store, worker_id, WorkerStatus.IDLE,
                                utcnow() - timedelta(seconds=ago))
    workers = [pg_store.wakeup.listen(worker_id, one_of_many=True) for worker_id in ids]

    def one_task() -> None:
        queue.enqueue(pg_store, queue.validate_request(settings, "one"), settings, utcnow())

    try:
        threading.Timer(0.2, one_task).start()
        assert _wait_all(workers, timeout_s=1.0) == [False, False, True]
        # it claims (the claim clears its woken mark), finishes (idle again, the most
        # recent): the next task is its too, and the others sleep on
        assert queue.claim_next(pg_store, ids[2], utcnow(), 30.0) is not None
        queue.set_worker_status(pg_store, ids[2], WorkerStatus.IDLE, utcnow())
        threading.Timer(0.2, one_task).start()
        assert _wait_all(workers, timeout_s=1.0) == [False, False, True]
        # woken but not claimed yet: the next task passes it over for the next most recent
        threading.Timer(0.2, one_task).start()
        assert _wait_all(workers, timeout_s=1.0) == [False, True, False]
    finally:
        for listener in workers:
            listener.close()
