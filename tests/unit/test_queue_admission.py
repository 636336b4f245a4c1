"""Admission per model server, in the store: slots are in-progress tasks bound to a server.

Run unchanged against SQLite and PostgreSQL (the ``store`` fixture), with a fake clock.
"""

from __future__ import annotations

import threading
from datetime import datetime, timedelta

from koubou_mcp import queue
from koubou_mcp.admission import Observation
from koubou_mcp.config import Settings
from koubou_mcp.models import TaskStatus
from koubou_mcp.store import Store, open_store

T0 = datetime(2026, 12, 1, 12, 0, 0)
URL = "http://127.0.0.1:11434"
OTHER = "http://10.0.0.2:11434"


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def submit(store: Store, settings: Settings, n: int = 1) -> list[str]:
    ids = []
    for i in range(n):
        request = queue.validate_request(settings, f"task {i}")
        ids.append(queue.enqueue(store, request, settings, at(0)).task.task_id)
    return ids


def workers(store: Store, *names: str) -> None:
    for name in names:
        queue.register_worker(store, name, 1, T0)


def test_a_new_server_admits_one_task_at_a_time(store: Store, store_settings: Settings) -> None:
    submit(store, store_settings, 3)
    workers(store, "w1", "w2")
    first = queue.admit_next(store, "w1", at(1), 30, URL)
    assert first is not None and first.concurrency == 1 and first.capacity is not None
    assert first.capacity.limit == 1
    assert queue.admit_next(store, "w2", at(1), 30, URL) is None
    # the task stays pending while it waits for the slot
    assert queue.counts_by_status(store)[TaskStatus.PENDING] == 2
    assert queue.complete(store, first.task.task_id, "w1", "done", at(2))
    second = queue.admit_next(store, "w2", at(2), 30, URL)
    assert second is not None and second.task.model_url == URL


def test_an_admission_marks_its_worker_busy_and_a_refused_one_changes_nothing(
        store: Store, store_settings: Settings) -> None:
    queue.configure_model_server(store, URL, 2, at(0))
    ids = submit(store, store_settings, 3)
    workers(store, "w1", "w2", "w3")
    first = queue.admit_next(store, "w1", at(1), 30, URL)
    second = queue.admit_next(store, "w2", at(1), 30, URL)
    assert first is not None and second is not None
    assert (first.concurrency, second.concurrency) == (1, 2)  # the slots in use with each
    assert queue.admit_next(store, "w3", at(1), 30, URL) is None  # both slots are taken
    rows = {w.worker_id: w for w in queue.list_workers(store)}
    assert (rows["w1"].status, rows["w1"].current_task) == ("busy", first.task.task_id)
    assert (rows["w2"].status, rows["w2"].current_task) == ("busy", second.task.task_id)
    assert (rows["w3"].status, rows["w3"].current_task) == ("starting", None)
    [left] = set(ids) - {first.task.task_id, second.task.task_id}
    assert queue.get_task(store, left).status == TaskStatus.PENDING


def test_the_slot_of_a_dead_worker_frees_when_its_lease_runs_out(
        store: Store, store_settings: Settings) -> None:
    submit(store, store_settings, 2)
    workers(store, "w1", "w2")
    assert queue.admit_next(store, "w1", at(1), 10, URL) is not None
    assert queue.admit_next(store, "w2", at(5), 10, URL) is None
    assert queue.admit_next(store, "w2", at(12), 10, URL) is not None


def test_slots_are_per_server(store: Store, store_settings: Settings) -> None:
    submit(store, store_settings, 2)
    workers(store, "w1", "w2")
    assert queue.admit_next(store, "w1", at(1), 30, URL) is not None
    assert queue.admit_next(store, "w2", at(1), 30, OTHER) is not None


def test_a_pinned_limit_admits_that_many(store: Store, store_settings: Settings) -> None:
    submit(store, store_settings, 4)
    workers(store, "a", "b", "c", "d")
    cap = queue.configure_model_server(store, URL, 3, at(0))
    assert (cap.limit, cap.pinned) == (3, True)
    admitted = [queue.admit_next(store, w, at(1), 30, URL) for w in "abcd"]
    assert [a.concurrency if a else None for a in admitted] == [1, 2, 3, None]
    unpinned = queue.configure_model_server(store, URL, None, at(2))
    assert (unpinned.limit, unpinned.pinned) == (1, False)


def test_a_worker_that_finds_every_slot_taken_takes_no_write_lock(
        settings: Settings) -> None:
    """A worker woken while the other workers hold every slot reads, sees no free slot and
    goes back to sleep: it queues for no lock (on SQLite the file's write lock, on
    PostgreSQL the server row's) that the claims of the workers with slots need."""
    import sqlite3

    store = open_store(settings.database_url, settings.run_dir, busy_timeout_s=0.05)
    try:
        submit(store, settings, 3)
        workers(store, "w1", "w2")
        assert queue.admit_next(store, "w1", at(1), 30, URL) is not None  # the one slot
        holder = sqlite3.connect(settings.home / "db" / "koubou.db", isolation_level=None)
        try:
            holder.execute("BEGIN IMMEDIATE")  # another writer holds the lock meanwhile
            assert queue.admit_next(store, "w2", at(2), 30, URL) is None  # and no "locked"
        finally:
            holder.execute("ROLLBACK")
            holder.close()
    finally:
        store.close()


def test_measurements_raise_and_lower_the_shared_limit(
        store: Store, store_settings: Settings) -> None:
    cap = queue.observe_model_server(store, URL, Observation(1, first_token_s=0.2), at(1), 5)
    assert cap.limit == 2
    cap = queue.observe_model_server(store, URL, Observation(2, first_token_s=30.0), at(2), 5)
    assert cap.limit == 1
    (use,) = queue.model_servers(store, at(3))
    assert use.capacity == cap
    assert use.as_dict()["slot_limit"] == 1 and use.as_dict()["limit_source"] == "learned"


def test_admission_on_one_server_never_exceeds_its_limit_under_contention(
        store: Store, store_settings: Settings) -> None:
    queue.configure_model_server(store, URL, 2, at(0))
    submit(store, store_settings, 8)
    names = [f"w{i}" for i in range(6)]
    workers(store, *names)
    barrier = threading.Barrier(len(names))
    results: dict[str, queue.Admitted | None] = {}

    def claim(name: str) -> None:
        own = open_store(store_settings.database_url, store_settings.run_dir)
        try:
            barrier.wait(timeout=10)
            results[name] = queue.admit_next(own, name, at(1), 30, URL)
        finally:
            own.close()

    threads = [threading.Thread(target=claim, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    admitted = [r for r in results.values() if r is not None]
    assert len(results) == len(names)
    assert len(admitted) == 2
    assert len({a.task.task_id for a in admitted}) == 2


def test_progress_is_saved_with_heartbeats_and_kept_when_cancelled(
        store: Store, store_settings: Settings) -> None:
    (task_id,) = submit(store, store_settings)
    workers(store, "w1")
    assert queue.admit_next(store, "w1", at(1), 30, URL) is not None
    beat = queue.heartbeat(store, "w1", task_id, at(2), 30,
                           queue.Generated("Once upon", 2, 0.4))
    assert beat == queue.Beat.OK
    task = queue.get_task(store, task_id)
    assert (task.partial_result, task.tokens, task.first_token_s) == ("Once upon", 2, 0.4)
    assert task.progress_at == at(2)
    queue.cancel(store, task_id, at(3))
    assert queue.mark_cancelled(store, task_id, "w1", at(4),
                                queue.Generated("Once upon a time", 4, 0.4))
    task = queue.get_task(store, task_id)
    assert (task.status, task.partial_result, task.tokens) == (
        TaskStatus.CANCELLED, "Once upon a time", 4)


def test_a_completed_task_keeps_its_token_count_not_its_partial_text(
        store: Store, store_settings: Settings) -> None:
    (task_id,) = submit(store, store_settings)
    workers(store, "w1")
    queue.admit_next(store, "w1", at(1), 30, URL)
    queue.heartbeat(store, "w1", task_id, at(2), 30, queue.Generated("par", 1, 0.3))
    assert queue.complete(store, task_id, "w1", "partial no more", at(3),
                          queue.Generated("partial no more", 3, 0.3))
    task = queue.get_task(store, task_id)
    assert (task.result, task.partial_result, task.tokens, task.first_token_s) == (
        "partial no more", None, 3, 0.3)


def test_a_timed_out_task_keeps_the_text_it_had(store: Store, store_settings: Settings) -> None:
    (task_id,) = submit(store, store_settings)
    workers(store, "w1")
    queue.admit_next(store, "w1", at(1), 30, URL)
    queue.fail(store, task_id, "w1", "timed out after 60 s", at(61), kind="timeout",
               generated=queue.Generated("half an answer", 3, 0.5))
    task = queue.get_task(store, task_id)
    assert (task.status, task.partial_result, task.tokens) == (
        TaskStatus.FAILED, "half an answer", 3)


def test_busy_backpressure_gives_the_task_back_without_using_an_attempt(
        store: Store, store_settings: Settings) -> None:
    (task_id,) = submit(store, store_settings)
    workers(store, "w1")
    queue.admit_next(store, "w1", at(1), 30, URL)
    assert queue.release(store, task_id, "w1", at(2), retry_after_s=5,
                         reason="Ollama is busy (HTTP 503)")
    task = queue.get_task(store, task_id)
    assert (task.status, task.attempts, task.error_kind) == (TaskStatus.PENDING, 0, "busy")
    assert queue.admit_next(store, "w1", at(4), 30, URL) is None  # backing off
    assert queue.admit_next(store, "w1", at(8), 30, URL) is not None


def test_a_task_waiting_past_the_wait_bound_fails_with_the_reason(
        store: Store, store_settings: Settings) -> None:
    old, = submit(store, store_settings)
    assert queue.expire_waiting(store, at(100), max_wait_s=200) == []
    assert queue.expire_waiting(store, at(300), max_wait_s=200) == [old]
    task = queue.get_task(store, old)
    assert task.status == TaskStatus.FAILED and task.error_kind == "wait_timeout"
    assert "KOUBOU_MAX_WAIT" in (task.error or "")


# -- the hand-over: complete, observe and claim the next in one transaction ---------------------


def test_a_hand_over_completes_the_task_and_claims_the_next_with_the_freed_slot(
        store: Store, store_settings: Settings) -> None:
    ids = submit(store, store_settings, 3)
    workers(store, "w1", "w2")
    first = queue.admit_next(store, "w1", at(1), 30, URL)
    assert first is not None
    first_id = first.task.task_id
    assert queue.admit_next(store, "w2", at(1), 30, URL) is None  # one slot, taken
    handed = queue.complete_and_admit(
        store, first_id, "w1", "done", at(2), queue.Generated("done", 1, 0.1),
        observations=[Observation(1, first_token_s=0.1)], max_limit=5, model_url=URL,
        claim=queue.NextClaim(30, URL))
    assert handed.accepted
    assert handed.next is not None and handed.next.task.task_id in ids
    second_id = handed.next.task.task_id
    [third_id] = [i for i in ids if i not in (first_id, second_id)]
    assert handed.next.concurrency == 1  # the slot the first task gave back
    done = queue.get_task(store, first_id)
    assert done.status == TaskStatus.COMPLETED and done.result == "done"
    assert queue.get_task(store, second_id).worker_id == "w1"
    assert queue.get_task(store, third_id).status == TaskStatus.PENDING
    [worker] = [w for w in queue.list_workers(store) if w.worker_id == "w1"]
    assert worker.tasks_completed == 1 and worker.current_task == second_id
    [use] = queue.model_servers(store, at(2))
    assert use.capacity.last_ttft_s == 0.1  # the observation was applied


def test_a_hand_over_writes_what_it_learns_at_once_and_bare_measurements_once_a_second(
        store: Store, store_settings: Settings) -> None:
    queue.configure_model_server(store, URL, 4, at(0))  # pinned: nothing to learn
    submit(store, store_settings, 4)
    workers(store, "w1")
    running = queue.admit_next(store, "w1", at(1), 30, URL)
    assert running is not None

    def hand_over(when: float, **measured: float) -> None:
        nonlocal running
        assert running is not None
        handed = queue.complete_and_admit(
            store, running.task.task_id, "w1", "done", at(when), None,
            observations=[Observation(1, **measured)], max_limit=4, model_url=URL,
            claim=queue.NextClaim(30, URL))
        running = handed.next

    def shown() -> tuple[float | None, float | None]:
        [use] = queue.model_servers(store, at(10))
        return use.capacity.last_ttft_s, use.capacity.last_tps

    hand_over(1.2, tokens_per_s=50.0)  # the row was written at 0 (pinned at 0): due
    assert shown() == (None, 50.0)
    hand_over(1.5, tokens_per_s=60.0)  # 0.3 s later, only a measurement: not written yet
    assert shown() == (None, 50.0)
    hand_over(2.3, tokens_per_s=70.0)  # a second after the last write: written
    assert shown() == (None, 70.0)
    # unpinned, a measurement teaches the admission something (a baseline): written at once
    queue.configure_model_server(store, URL, None, at(2.4))
    [before] = queue.model_servers(store, at(2.4))
    hand_over(2.5, tokens_per_s=80.0)
    [after] = queue.model_servers(store, at(2.5))
    assert before.capacity.baseline_tps is None and after.capacity.baseline_tps == 80.0
    assert after.capacity.last_tps == 80.0


def test_a_hand_over_without_a_claim_leaves_the_worker_idle(
        store: Store, store_settings: Settings) -> None:
    [task_id] = submit(store, store_settings, 1)
    workers(store, "w1")
    assert queue.admit_next(store, "w1", at(1), 30, URL) is not None
    handed = queue.complete_and_admit(store, task_id, "w1", "r", at(2), None, model_url=URL,
                                      claim=queue.NextClaim(30, URL))
    assert handed.accepted and handed.next is None  # nothing left to claim
    [worker] = queue.list_workers(store)
    assert worker.status == "idle" and worker.current_task is None
    assert worker.tasks_completed == 1  # counted once (the claim's statement idles it here)


def test_a_hand_over_whose_claim_finds_no_slot_leaves_the_worker_idle_and_the_task_waiting(
        store: Store, store_settings: Settings) -> None:
    ids = submit(store, store_settings, 3)
    workers(store, "w1", "w2")
    first = queue.admit_next(store, "w1", at(1), 30, URL)
    assert first is not None
    queue.configure_model_server(store, URL, 2, at(1))
    second = queue.admit_next(store, "w2", at(1), 30, URL)
    assert second is not None
    queue.configure_model_server(store, URL, 1, at(1.5))  # the limit fell: w2 holds the slot
    handed = queue.complete_and_admit(store, first.task.task_id, "w1", "r", at(2), None,
                                      model_url=URL, claim=queue.NextClaim(30, URL))
    assert handed.accepted and handed.next is None
    workers_now = {w.worker_id: w for w in queue.list_workers(store)}
    assert workers_now["w1"].status == "idle" and workers_now["w1"].current_task is None
    assert workers_now["w1"].tasks_completed == 1
    assert workers_now["w2"].current_task == second.task.task_id
    [waiting] = [i for i in ids if i not in (first.task.task_id, second.task.task_id)]
    assert queue.get_task(store, waiting).status == TaskStatus.PENDING


def test_a_hand_over_of_a_task_that_ended_elsewhere_drops_the_result_but_still_claims(
        store: Store, store_settings: Settings) -> None:
    ids = submit(store, store_settings, 2)
    workers(store, "w1")
    claimed = queue.admit_next(store, "w1", at(1), 30, None)
    assert claimed is not None
    first_id = claimed.task.task_id
    [second_id] = [i for i in ids if i != first_id]
    assert queue.complete(store, first_id, "w1", "first", at(2))
    handed = queue.complete_and_admit(store, first_id, "w1", "again", at(3), None,
                                      claim=queue.NextClaim(30, None))
    assert not handed.accepted
    assert queue.get_task(store, first_id).result == "first"
    assert handed.next is not None and handed.next.task.task_id == second_id


def test_hand_overs_and_new_claims_racing_never_exceed_the_limit(
        store: Store, store_settings: Settings) -> None:
    """Hand-overs keep their worker's slot for the next task (on PostgreSQL without the
    server's row lock) while woken workers take free slots under it: the slots in use stay
    within the limit, round after round."""
    queue.configure_model_server(store, URL, 2, at(0))
    submit(store, store_settings, 40)
    holders, claimers = ["h1", "h2"], ["c1", "c2", "c3"]
    workers(store, *holders, *claimers)
    held = {name: queue.admit_next(store, name, at(1), 30, URL) for name in holders}
    assert all(a is not None for a in held.values())
    for round_no in range(6):
        now = at(2 + round_no)
        barrier = threading.Barrier(len(holders) + len(claimers))
        got: dict[str, queue.Admitted | None] = {}

        def hand_over(name: str, now: datetime = now,
                      barrier: threading.Barrier = barrier,
                      got: dict[str, queue.Admitted | None] = got) -> None:
            own = open_store(store_settings.database_url, store_settings.run_dir)
            try:
                admitted = held[name]
                barrier.wait(timeout=10)
                if admitted is None:
                    got[name] = queue.admit_next(own, name, now, 30, URL)
                else:
                    got[name] = queue.complete_and_admit(
                        own, admitted.task.task_id, name, "done", now, None, model_url=URL,
                        claim=queue.NextClaim(30, URL)).next
            finally:
                own.close()

        def claim(name: str, now: datetime = now, barrier: threading.Barrier = barrier,
                  got: dict[str, queue.Admitted | None] = got) -> None:
            own = open_store(store_settings.database_url, store_settings.run_dir)
            try:
                barrier.wait(timeout=10)
                got[name] = queue.admit_next(own, name, now, 30, URL)
            finally:
                own.close()

        threads = [threading.Thread(target=hand_over, args=(n,)) for n in holders] + \
                  [threading.Thread(target=claim, args=(n,)) for n in claimers]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=20)
        assert len(got) == len(threads)
        [use] = queue.model_servers(store, now)
        assert use.in_use <= 2, f"round {round_no}: {use.in_use} slots in use of 2"
        assert use.in_use == sum(1 for a in got.values() if a is not None)
        # the claimers' tasks end (their slots free), the holders carry theirs on
        for name in claimers:
            if (admitted := got[name]) is not None:
                assert queue.complete(store, admitted.task.task_id, name, "done", now)
        held.update({name: got[name] for name in holders})


def test_a_hand_over_gives_its_slot_up_when_the_limit_went_down(
        store: Store, store_settings: Settings) -> None:
    queue.configure_model_server(store, URL, 2, at(0))
    submit(store, store_settings, 3)
    workers(store, "w1", "w2")
    first, second = (queue.admit_next(store, w, at(1), 30, URL) for w in ("w1", "w2"))
    assert first is not None and second is not None
    queue.configure_model_server(store, URL, 1, at(1))  # two in use, one allowed now
    handed = queue.complete_and_admit(store, first.task.task_id, "w1", "done", at(2), None,
                                      model_url=URL, claim=queue.NextClaim(30, URL))
    assert handed.accepted and handed.next is None  # w2's task is the one slot allowed
    [use] = queue.model_servers(store, at(2))
    assert use.in_use == 1
