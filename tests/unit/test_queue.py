"""The queue's contract, run unchanged against SQLite and PostgreSQL (the ``store`` fixture).

Time is an argument of every queue operation, so leases and backoff are driven by a fake clock.
"""

from __future__ import annotations

import math
import multiprocessing
import threading
from datetime import datetime, timedelta
from typing import Any

import pytest

from koubou_mcp import queue
from koubou_mcp.config import Settings
from koubou_mcp.models import TaskStatus, WorkerStatus
from koubou_mcp.store import Store, open_store

T0 = datetime(2026, 11, 28, 12, 0, 0)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def submit(store: Store, settings: Settings, prompt: str = "hello", now: datetime = T0,
           **fields: Any) -> queue.TaskSnapshot:
    request = queue.validate_request(settings, prompt, **fields)
    return queue.enqueue(store, request, settings, now).task


def test_enqueue_stores_a_pending_task_with_defaults(store: Store, store_settings: Settings) -> None:
    task = submit(store, store_settings, "write a haiku")
    stored = queue.get_task(store, task.task_id)
    assert stored.status == TaskStatus.PENDING
    assert (stored.type, stored.priority, stored.attempts) == ("general", 5, 0)
    assert stored.timeout_s == store_settings.general_timeout_s
    assert stored.max_attempts == store_settings.max_attempts
    assert stored.prompt == "write a haiku"
    assert stored.created_at == T0


def test_code_tasks_get_the_code_timeout_by_default(store: Store, store_settings: Settings) -> None:
    task = submit(store, store_settings, type="code")
    assert task.timeout_s == store_settings.code_timeout_s


BAD_REQUESTS = [
    ({"prompt": ""}, "empty"),
    ({"prompt": "   \n\t"}, "empty"),
    ({"prompt": None}, "string"),
    ({"prompt": 42}, "string"),
    ({"prompt": "x" * 200_001}, "limit"),
    ({"prompt": "a\x00b"}, "NUL"),
    ({"prompt": "bad \udc80 surrogate"}, "Unicode"),
    ({"type": "poem"}, "general, code"),
    ({"type": None}, "general, code"),
    ({"priority": 0}, "1 (lowest) to 10"),
    ({"priority": 11}, "1 (lowest) to 10"),
    ({"priority": -3}, "1 (lowest) to 10"),
    ({"priority": 2.5}, "integer"),
    ({"priority": "high"}, "integer"),
    ({"priority": True}, "integer"),
    ({"timeout_s": -1}, "more than 0"),
    ({"timeout_s": 0}, "more than 0"),
    ({"timeout_s": math.nan}, "more than 0"),
    ({"timeout_s": math.inf}, "more than 0"),
    ({"timeout_s": 10**9}, "at most"),
    ({"timeout_s": "60"}, "number"),
    ({"idempotency_key": ""}, "non-empty"),
    ({"idempotency_key": "k" * 201}, "at most 200"),
    ({"idempotency_key": 7}, "non-empty string"),
    ({"idempotency_key": "a\nb"}, "printable"),
]


@pytest.mark.parametrize(("fields", "says"), BAD_REQUESTS)
def test_bad_requests_are_refused_with_a_clear_message_and_store_nothing(
    store: Store, store_settings: Settings, fields: dict[str, Any], says: str
) -> None:
    args: dict[str, Any] = {"prompt": "fine"} | fields
    with pytest.raises(queue.InvalidTask, match=None) as info:
        queue.validate_request(store_settings, **args)
    assert says in str(info.value)
    assert info.value.field == next(iter(fields))  # the field the message is about
    assert sum(queue.counts_by_status(store).values()) == 0


def test_claims_take_the_highest_priority_first_then_the_oldest(
    store: Store, store_settings: Settings
) -> None:
    low = submit(store, store_settings, "low", at(0), priority=2)
    first_high = submit(store, store_settings, "high-1", at(1), priority=9)
    second_high = submit(store, store_settings, "high-2", at(2), priority=9)
    middle = submit(store, store_settings, "mid", at(3), priority=5)
    order = []
    while (task := queue.claim_next(store, "w", at(10), 30)) is not None:
        order.append(task.task_id)
    assert order == [first_high.task_id, second_high.task_id, middle.task_id, low.task_id]


def test_a_claim_takes_a_lease_and_counts_an_attempt(store: Store, store_settings: Settings) -> None:
    queue.register_worker(store, "w1", 123, T0)
    submit(store, store_settings)
    task = queue.claim_next(store, "w1", at(5), 30)
    assert task is not None
    assert task.status == TaskStatus.IN_PROGRESS
    assert (task.worker_id, task.attempts) == ("w1", 1)
    assert task.lease_expires_at == at(35)
    worker = queue.list_workers(store)[0]
    assert (worker.status, worker.current_task) == (WorkerStatus.BUSY, task.task_id)


def test_heartbeats_extend_the_lease_only_for_the_holder(store: Store, store_settings: Settings) -> None:
    submit(store, store_settings)
    task = queue.claim_next(store, "w1", T0, 30)
    assert task is not None
    assert queue.heartbeat(store, "w1", task.task_id, at(20), 30) == queue.Beat.OK
    assert queue.get_task(store, task.task_id).lease_expires_at == at(50)
    assert queue.heartbeat(store, "intruder", task.task_id, at(21), 30) == queue.Beat.LOST
    assert queue.get_task(store, task.task_id).lease_expires_at == at(50)


def test_completing_records_the_result_and_the_workers_counter(
    store: Store, store_settings: Settings
) -> None:
    queue.register_worker(store, "w1", 1, T0)
    submit(store, store_settings)
    task = queue.claim_next(store, "w1", at(1), 30)
    assert task is not None
    assert queue.complete(store, task.task_id, "w1", "the answer", at(3))
    done = queue.get_task(store, task.task_id)
    assert (done.status, done.result, done.finished_at) == (TaskStatus.COMPLETED, "the answer", at(3))
    assert not queue.complete(store, task.task_id, "w1", "again", at(4)), "one final result only"
    assert queue.get_task(store, task.task_id).result == "the answer"
    worker = queue.list_workers(store)[0]
    assert (worker.status, worker.tasks_completed, worker.tasks_failed) == ("idle", 1, 0)


def test_an_expired_lease_puts_the_task_back_and_it_runs_again(
    store: Store, store_settings: Settings
) -> None:
    submit(store, store_settings)
    task = queue.claim_next(store, "dead", T0, 30)
    assert task is not None
    assert queue.requeue_expired(store, at(29)) == [], "the lease still holds"
    recovered = queue.requeue_expired(store, at(31))
    assert recovered == [queue.Recovered(task.task_id, TaskStatus.PENDING)]
    again = queue.claim_next(store, "alive", at(32), 30)
    assert again is not None and again.task_id == task.task_id
    assert again.attempts == 2
    assert queue.heartbeat(store, "dead", task.task_id, at(33), 30) == queue.Beat.LOST


def test_a_task_whose_workers_keep_dying_fails_as_worker_lost_after_its_attempts(
    store: Store, store_settings: Settings
) -> None:
    task = submit(store, store_settings)
    now = T0
    for attempt in range(1, store_settings.max_attempts + 1):
        claimed = queue.claim_next(store, f"w{attempt}", now, 30)
        assert claimed is not None and claimed.attempts == attempt
        now += timedelta(seconds=31)
        queue.requeue_expired(store, now)
    final = queue.get_task(store, task.task_id)
    assert final.status == TaskStatus.FAILED
    assert final.error_kind == "worker_lost"
    assert "worker lost" in (final.error or "")
    assert queue.claim_next(store, "w", now, 30) is None


def test_requeue_worker_gives_back_a_dead_workers_task_at_once(
    store: Store, store_settings: Settings
) -> None:
    queue.register_worker(store, "w1", 1, T0)
    submit(store, store_settings)
    task = queue.claim_next(store, "w1", T0, 300)
    assert task is not None
    recovered = queue.requeue_worker(store, "w1", at(1), "worker exited")
    assert recovered == [queue.Recovered(task.task_id, TaskStatus.PENDING)]
    assert queue.list_workers(store) == []
    assert queue.list_workers(store, include_offline=True)[0].status == "offline"


def test_transient_failures_retry_with_growing_backoff_then_give_up(
    store: Store, store_settings: Settings
) -> None:
    task = submit(store, store_settings)
    now = T0
    delays = []
    for _ in range(store_settings.max_attempts - 1):
        claimed = queue.claim_next(store, "w", now, 30)
        assert claimed is not None
        after = queue.fail(store, task.task_id, "w", "busy", now, kind="busy", retry=True,
                           backoff=(2.0, 60.0), jitter=1.0)
        assert after is not None and after.status == TaskStatus.PENDING
        assert after.not_before is not None
        delays.append((after.not_before - now).total_seconds())
        assert queue.claim_next(store, "w", after.not_before - timedelta(seconds=0.5), 30) is None
        now = after.not_before
    assert delays == [2.0, 4.0]
    claimed = queue.claim_next(store, "w", now, 30)
    assert claimed is not None
    final = queue.fail(store, task.task_id, "w", "busy", now, kind="busy", retry=True)
    assert final is not None and final.status == TaskStatus.FAILED
    assert "gave up after 3 attempts" in (final.error or "")


def test_backoff_jitter_shortens_the_delay_by_at_most_half(
    store: Store, store_settings: Settings
) -> None:
    task = submit(store, store_settings)
    queue.claim_next(store, "w", T0, 30)
    after = queue.fail(store, task.task_id, "w", "x", T0, retry=True, backoff=(10.0, 60.0),
                       jitter=0.1)
    assert after is not None and after.not_before == at(5.0)


def test_permanent_failures_end_the_task_at_once(store: Store, store_settings: Settings) -> None:
    queue.register_worker(store, "w", 1, T0)
    task = submit(store, store_settings)
    queue.claim_next(store, "w", T0, 30)
    after = queue.fail(store, task.task_id, "w", "model missing: ollama pull x", at(1),
                       kind="model_not_found", retry=False)
    assert after is not None
    assert (after.status, after.error_kind, after.attempts) == ("failed", "model_not_found", 1)
    assert queue.list_workers(store)[0].tasks_failed == 1


def test_a_failure_reported_by_a_worker_that_lost_the_task_changes_nothing(
    store: Store, store_settings: Settings
) -> None:
    task = submit(store, store_settings)
    queue.claim_next(store, "old", T0, 30)
    queue.requeue_expired(store, at(31))
    queue.claim_next(store, "new", at(32), 30)
    assert queue.fail(store, task.task_id, "old", "late", at(33), retry=False) is None
    assert queue.get_task(store, task.task_id).status == TaskStatus.IN_PROGRESS


def test_cancelling_a_pending_task_ends_it_at_once(store: Store, store_settings: Settings) -> None:
    task = submit(store, store_settings)
    cancelled = queue.cancel(store, task.task_id, at(1))
    assert cancelled.status == TaskStatus.CANCELLED
    assert queue.claim_next(store, "w", at(2), 30) is None
    assert queue.cancel(store, task.task_id, at(3)).status == TaskStatus.CANCELLED


def test_cancelling_a_running_task_asks_its_worker_through_the_heartbeat(
    store: Store, store_settings: Settings
) -> None:
    task = submit(store, store_settings)
    queue.claim_next(store, "w", T0, 30)
    requested = queue.cancel(store, task.task_id, at(1))
    assert requested.status == TaskStatus.IN_PROGRESS and requested.cancel_requested
    assert queue.heartbeat(store, "w", task.task_id, at(2), 30) == queue.Beat.CANCEL
    assert queue.mark_cancelled(store, task.task_id, "w", at(3))
    assert queue.get_task(store, task.task_id).status == TaskStatus.CANCELLED


def test_a_running_task_cancelled_whose_worker_died_ends_cancelled(
    store: Store, store_settings: Settings
) -> None:
    task = submit(store, store_settings)
    queue.claim_next(store, "w", T0, 30)
    queue.cancel(store, task.task_id, at(1))
    assert queue.requeue_expired(store, at(40)) == [
        queue.Recovered(task.task_id, TaskStatus.CANCELLED)]


def test_finished_or_unknown_tasks_cannot_be_cancelled(store: Store, store_settings: Settings) -> None:
    task = submit(store, store_settings)
    queue.claim_next(store, "w", T0, 30)
    queue.complete(store, task.task_id, "w", "ok", at(1))
    with pytest.raises(queue.TaskStateError, match="already completed"):
        queue.cancel(store, task.task_id, at(2))
    with pytest.raises(queue.TaskNotFound, match="no task with id"):
        queue.cancel(store, "task_nope", at(2))
    with pytest.raises(queue.TaskNotFound):
        queue.get_task(store, "task_nope")


def test_releasing_a_task_does_not_count_the_interrupted_run(
    store: Store, store_settings: Settings
) -> None:
    task = submit(store, store_settings)
    queue.claim_next(store, "w", T0, 30)
    assert queue.release(store, task.task_id, "w", at(1))
    back = queue.get_task(store, task.task_id)
    assert (back.status, back.attempts) == (TaskStatus.PENDING, 0)


def test_a_repeated_idempotency_key_returns_the_unfinished_task(
    store: Store, store_settings: Settings
) -> None:
    first = queue.enqueue(store, queue.validate_request(store_settings, "p", idempotency_key="k1"),
                          store_settings, T0)
    again = queue.enqueue(store, queue.validate_request(store_settings, "p", idempotency_key="k1"),
                          store_settings, at(1))
    assert first.created and not again.created
    assert again.task.task_id == first.task.task_id
    queue.claim_next(store, "w", at(2), 30)
    queue.complete(store, first.task.task_id, "w", "done", at(3))
    later = queue.enqueue(store, queue.validate_request(store_settings, "p", idempotency_key="k1"),
                          store_settings, at(4))
    assert later.created and later.task.task_id != first.task.task_id


def test_list_tasks_is_newest_first_and_filters_by_status(
    store: Store, store_settings: Settings
) -> None:
    ids = [submit(store, store_settings, f"p{i}", at(i)).task_id for i in range(5)]
    queue.cancel(store, ids[0], at(10))
    assert [t.task_id for t in queue.list_tasks(store, limit=3)] == ids[:1:-1][:3]
    assert [t.task_id for t in queue.list_tasks(store, status="cancelled")] == [ids[0]]
    counts = queue.counts_by_status(store)
    assert counts == {"pending": 4, "in_progress": 0, "completed": 0, "failed": 0, "cancelled": 1}


def test_ready_pending_excludes_tasks_waiting_out_a_backoff(
    store: Store, store_settings: Settings
) -> None:
    submit(store, store_settings, "first", T0)
    submit(store, store_settings, "second", at(0.5))
    task = queue.claim_next(store, "w", at(0.5), 30)
    assert task is not None and task.prompt == "first"
    queue.fail(store, task.task_id, "w", "busy", T0, retry=True, backoff=(10.0, 10.0))
    assert queue.ready_pending_count(store, at(1)) == 1
    assert queue.ready_pending_count(store, at(11)) == 2


def test_stats_report_counts_workers_and_average_times(store: Store, store_settings: Settings) -> None:
    queue.register_worker(store, "w1", 1, T0)
    submit(store, store_settings)
    task = queue.claim_next(store, "w1", at(2), 30)
    assert task is not None
    queue.complete(store, task.task_id, "w1", "ok", at(5))
    stats = queue.stats(store)
    assert stats.counts["completed"] == 1
    assert stats.avg_duration_s == pytest.approx(3.0)
    assert stats.avg_wait_s == pytest.approx(2.0)
    data = stats.as_dict()
    assert data["workers"][0]["success_rate"] == 100.0


def test_each_task_is_claimed_by_exactly_one_of_many_threads(
    store: Store, store_settings: Settings
) -> None:
    for i in range(60):
        submit(store, store_settings, f"p{i}", at(i))
    threads, claimed, lock = 8, [], threading.Lock()
    barrier = threading.Barrier(threads)
    concurrent_claimers = set()

    def claimer(n: int) -> None:
        barrier.wait()  # every thread starts claiming at the same moment
        while (task := queue.claim_next(store, f"w{n}", at(100), 30)) is not None:
            with lock:
                claimed.append(task.task_id)
                concurrent_claimers.add(n)

    pool = [threading.Thread(target=claimer, args=(n,)) for n in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(timeout=60)
    assert len(claimed) == 60
    assert len(set(claimed)) == 60, "a task was claimed twice"
    assert len(concurrent_claimers) > 1, "the claims did not interleave"


def _claim_all(url: str, run_dir: str, name: str, barrier: Any, out: Any) -> None:
    from pathlib import Path

    store = open_store(url, Path(run_dir))
    barrier.wait()
    mine = []
    while (task := queue.claim_next(store, name, at(100), 30)) is not None:
        mine.append(task.task_id)
    out.put((name, mine))
    store.close()


def test_each_task_is_claimed_by_exactly_one_of_many_processes(
    store: Store, store_settings: Settings
) -> None:
    for i in range(120):
        submit(store, store_settings, f"p{i}", at(i))
    ctx = multiprocessing.get_context("fork")
    procs_n = 4
    barrier, out = ctx.Barrier(procs_n), ctx.Queue()
    procs = [ctx.Process(target=_claim_all, args=(store_settings.database_url,
                                                  str(store_settings.run_dir), f"p{n}", barrier, out))
             for n in range(procs_n)]
    for p in procs:
        p.start()
    results = dict(out.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    everything = [tid for ids in results.values() for tid in ids]
    assert len(everything) == 120
    assert len(set(everything)) == 120, "a task was claimed by two processes"
    assert sum(1 for ids in results.values() if ids) > 1, "one process took everything"


def test_next_ready_in_says_when_a_task_waiting_out_its_backoff_becomes_ready(
        store: Store, store_settings: Settings) -> None:
    assert queue.next_ready_in(store, T0) is None  # nothing waits
    task = submit(store, store_settings, "x")
    assert queue.next_ready_in(store, T0) is None  # ready at once: nothing to wait for
    queue.register_worker(store, "w1", 1, T0)
    assert queue.claim_next(store, "w1", T0, 30) is not None
    failed = queue.fail(store, task.task_id, "w1", "reset", T0, retry=True, backoff=(5.0, 5.0),
                        jitter=1.0)
    assert failed is not None and failed.status == TaskStatus.PENDING.value
    assert queue.next_ready_in(store, T0) == pytest.approx(5.0, abs=0.01)
    assert queue.next_ready_in(store, at(4)) == pytest.approx(1.0, abs=0.01)
    assert queue.next_ready_in(store, at(6)) is None  # ready by then
