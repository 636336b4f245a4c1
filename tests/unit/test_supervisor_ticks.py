"""The supervisor's decisions with stand-in processes and a fake clock (no real workers here;
tests/integration/test_supervisor.py runs real ones), on SQLite and PostgreSQL.

Each test drives ``tick(now)`` by hand. The stand-in processes are told how to behave; the
worker rows that real workers would write are written with the queue's own functions.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import datetime, timedelta

import pytest

from koubou_mcp import queue
from koubou_mcp.config import Settings
from koubou_mcp.leader import LOCK_FILE, lock_is_held, read_holder
from koubou_mcp.models import TaskStatus, WorkerStatus
from koubou_mcp.processes import Phase
from koubou_mcp.store import Store
from koubou_mcp.supervisor import Supervisor, Tuning
from tests.support.pool_doubles import FakeLauncher, become_ready
from tests.support.tasks import submit

T0 = datetime(2026, 11, 28, 12, 0, 0)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


@pytest.fixture
def launcher() -> FakeLauncher:
    return FakeLauncher()


@pytest.fixture
def pool_settings(store_settings: Settings) -> Settings:
    return store_settings.with_overrides(min_workers=1, max_workers=4, idle_timeout_s=10.0,
                                   lease_s=30.0, drain_grace_s=2.0, stats_interval_s=5.0)


@pytest.fixture
def sup(pool_settings: Settings, store: Store, launcher: FakeLauncher
        ) -> Iterator[Supervisor]:
    supervisor = Supervisor(pool_settings, store, launcher=launcher,
                            tuning=Tuning(wake_on_work=False, force_wait_s=0.3,
                                          drain_margin_s=0.3))
    assert supervisor.try_lead()
    yield supervisor
    supervisor.close(at(3600))


def test_an_empty_pool_starts_the_minimum_and_counts_starters_as_capacity(
    sup: Supervisor, launcher: FakeLauncher
) -> None:
    assert sup.tick(at(0)).spawn == 1
    assert len(launcher.started) == 1
    assert sup.tick(at(1)).spawn == 0  # still starting: not started twice
    assert sup.health()["workers"]["starting"] == 1


def test_a_burst_grows_the_pool_to_max_in_one_decision(
    sup: Supervisor, launcher: FakeLauncher, store: Store, pool_settings: Settings
) -> None:
    sup.tick(at(0))
    become_ready(store, launcher.started[0], at(0.5))
    sup.tick(at(1))
    submit(store, pool_settings, 50, now=at(1.5))
    decision = sup.tick(at(2))
    assert (decision.desired, decision.spawn) == (4, 3)
    assert len(launcher.started) == 4
    assert sup.tick(at(2.5)).spawn == 0


def test_a_worker_that_dies_holding_a_task_gives_it_back_at_once_and_is_replaced(
    sup: Supervisor, launcher: FakeLauncher, store: Store, pool_settings: Settings
) -> None:
    sup.tick(at(0))
    process = launcher.started[0]
    become_ready(store, process, at(0.5))
    sup.tick(at(1))
    (task,) = submit(store, pool_settings, now=at(1))
    claimed = queue.claim_next(store, process.worker_id, at(1.1), pool_settings.lease_s)
    assert claimed is not None and claimed.task_id == task.task_id
    sup.tick(at(1.5))
    process.code = -9  # SIGKILLed by someone

    decision = sup.tick(at(2))  # the lease (30 s) is far from over

    after = queue.get_task(store, task.task_id)
    assert after.status == TaskStatus.PENDING
    assert after.error is not None and "SIGKILL" in after.error
    row = queue.get_worker(store, process.worker_id)
    assert row is not None and row.status == WorkerStatus.OFFLINE
    assert decision.spawn == 1 and len(launcher.started) == 2  # replaced
    assert not sup.health()["crash_loop"]["active"]  # it had started fine


def test_workers_that_die_at_start_up_are_restarted_one_at_a_time_with_backoff(
    sup: Supervisor, launcher: FakeLauncher, store: Store
) -> None:
    sup.tick(at(0))
    launcher.started[-1].code = 1  # dies before registering
    sup.tick(at(0.5))
    health = sup.health()["crash_loop"]
    assert health["active"] and health["failures_in_a_row"] == 1
    assert "before it was ready" in health["last_failure"]
    assert len(launcher.started) == 1  # backoff: 1 s

    sup.tick(at(1.6))
    assert len(launcher.started) == 2  # the probe
    launcher.started[-1].code = 1
    sup.tick(at(2.0))  # second failure: 2 s
    sup.tick(at(3.5))
    assert len(launcher.started) == 2
    assert sup.health()["crash_loop"]["backoff_s"] == 2
    sup.tick(at(4.1))
    assert len(launcher.started) == 3

    become_ready(store, launcher.started[-1], at(4.5))
    sup.tick(at(5))
    assert not sup.health()["crash_loop"]["active"]


def test_a_burst_during_a_crash_loop_starts_only_one_probe(
    sup: Supervisor, launcher: FakeLauncher, store: Store, pool_settings: Settings
) -> None:
    sup.tick(at(0))
    launcher.started[-1].code = 1
    submit(store, pool_settings, 20, now=at(0.1))
    sup.tick(at(0.5))
    sup.tick(at(2))
    sup.tick(at(2.5))
    assert len(launcher.started) == 2


def test_a_launcher_error_counts_as_a_start_up_failure(
    sup: Supervisor, launcher: FakeLauncher
) -> None:
    launcher.fail_with = OSError(24, "Too many open files")
    sup.tick(at(0))
    assert sup.health()["crash_loop"]["failures_in_a_row"] == 1
    assert "Too many open files" in sup.health()["crash_loop"]["last_failure"]


def test_a_worker_that_never_gets_ready_is_killed_as_a_failed_start(
    pool_settings: Settings, store: Store, launcher: FakeLauncher
) -> None:
    sup = Supervisor(pool_settings, store, launcher=launcher,
                     tuning=Tuning(wake_on_work=False, startup_timeout_s=5))
    assert sup.try_lead()
    try:
        sup.tick(at(0))
        sup.tick(at(6))
        assert launcher.started[0].signals == ["KILL"]
        assert sup.health()["crash_loop"]["failures_in_a_row"] == 1
    finally:
        sup.close(at(7))


def test_idle_workers_retire_after_the_timeout_longest_idle_first(
    sup: Supervisor, launcher: FakeLauncher, store: Store, pool_settings: Settings
) -> None:
    sup.tick(at(0))
    submit(store, pool_settings, 8, now=at(0))
    sup.tick(at(0.1))
    assert len(launcher.started) == 4
    for i, process in enumerate(launcher.started):
        become_ready(store, process, at(1 + i))  # idle since 1, 2, 3, 4 s
    for task in queue.list_tasks(store):
        queue.cancel(store, task.task_id, at(1))  # nothing left to do

    sup.tick(at(11.5))  # idle 10.5, 9.5, 8.5, 7.5 s: only the first is past 10 s
    assert [p.signals for p in launcher.started] == [["TERM"], [], [], []]
    sup.tick(at(20))  # all past: down to min, longest idle first
    assert [p.signals for p in launcher.started] == [["TERM"], ["TERM"], ["TERM"], []]
    sup.tick(at(20.5))
    assert sup.health()["workers"]["total"] == 1


def test_a_retiring_worker_that_ignores_sigterm_is_killed_after_the_drain_grace(
    sup: Supervisor, launcher: FakeLauncher, store: Store, pool_settings: Settings
) -> None:
    launcher.obey_sigterm = False
    sup.tick(at(0))
    submit(store, pool_settings, 8, now=at(0))
    sup.tick(at(0.1))
    for process in launcher.started:
        become_ready(store, process, at(1))
    for task in queue.list_tasks(store):
        queue.cancel(store, task.task_id, at(1))
    sup.tick(at(12))
    retiring = [p for p in launcher.started if p.signals == ["TERM"]]
    assert len(retiring) == 3
    rows = {w.worker_id: w.status for w in queue.list_workers(store)}
    assert all(rows[p.worker_id] == WorkerStatus.STOPPING for p in retiring)
    sup.tick(at(12 + pool_settings.drain_grace_s + 0.1))  # within the margin
    assert all(p.signals == ["TERM"] for p in retiring)
    sup.tick(at(12 + pool_settings.drain_grace_s + 1))
    assert all(p.signals == ["TERM", "KILL"] for p in retiring)


def test_a_task_past_its_time_limit_gets_its_worker_killed_and_fails(
    sup: Supervisor, launcher: FakeLauncher, store: Store, pool_settings: Settings
) -> None:
    sup.tick(at(0))
    process = launcher.started[0]
    become_ready(store, process, at(0.5))
    (task,) = submit(store, pool_settings, now=at(1), timeout_s=5)
    queue.claim_next(store, process.worker_id, at(1), pool_settings.lease_s)
    sup.tick(at(1 + 5 + sup.tuning.overdue_grace_s - 0.5))
    assert process.signals == []
    sup.tick(at(1 + 5 + sup.tuning.overdue_grace_s + 0.5))
    assert process.signals == ["KILL"]
    failed = queue.get_task(store, task.task_id)
    assert failed.status == TaskStatus.FAILED and failed.error == "timed out after 5 s"
    assert failed.error_kind == "timeout"
    assert len(launcher.started) == 2  # a killed worker is no capacity: replaced at once
    sup.tick(at(17))  # reaped: an expected exit, not a crash loop
    assert process.worker_id not in sup.workers
    assert not sup.health()["crash_loop"]["active"]


def test_expired_leases_of_unknown_workers_are_recovered_and_silent_rows_go_offline(
    sup: Supervisor, store: Store, pool_settings: Settings
) -> None:
    (task,) = submit(store, pool_settings, now=at(0))
    queue.register_worker(store, "elsewhere", 4242, at(0), host="other-machine")
    queue.claim_next(store, "elsewhere", at(0), pool_settings.lease_s)
    sup.tick(at(pool_settings.lease_s + 1))
    assert queue.get_task(store, task.task_id).status == TaskStatus.PENDING
    row = queue.get_worker(store, "elsewhere")
    assert row is not None and row.status == WorkerStatus.OFFLINE


def test_only_one_supervisor_leads_a_home_and_another_takes_over(
    pool_settings: Settings, store: Store, launcher: FakeLauncher
) -> None:
    first = Supervisor(pool_settings, store, launcher=launcher, role="pool")
    second = Supervisor(pool_settings, store, launcher=launcher, role="server")
    try:
        assert first.try_lead()
        assert not second.try_lead()
        assert second.health()["leader_pid"] == os.getpid()  # a standby names the leader
        assert lock_is_held(pool_settings.run_dir)
        holder = read_holder(pool_settings.run_dir)
        assert holder is not None and (holder.pid, holder.role) == (os.getpid(), "pool")
        with pytest.raises(RuntimeError, match="leadership"):
            second.tick(at(0))
        first.resign()
        assert not lock_is_held(pool_settings.run_dir)
        assert read_holder(pool_settings.run_dir) is None
        assert second.try_lead()
        holder = read_holder(pool_settings.run_dir)
        assert holder is not None and holder.role == "server"
    finally:
        first.close(at(1))
        second.close(at(1))
    assert (pool_settings.run_dir / LOCK_FILE).stat().st_mode & 0o777 == 0o600


def test_a_phase_other_than_running_is_not_capacity(
    sup: Supervisor, launcher: FakeLauncher, store: Store
) -> None:
    sup.tick(at(0))
    become_ready(store, launcher.started[0], at(0))
    launcher.obey_sigterm = False
    launcher.started[0].obeys_sigterm = False
    sup.workers[launcher.started[0].worker_id].phase = Phase.RETIRING
    assert sup.tick(at(1)).spawn == 1


def test_closing_with_workers_left_kills_them_rather_than_leave_them_unsupervised(
    sup: Supervisor, launcher: FakeLauncher, store: Store, pool_settings: Settings
) -> None:
    launcher.obey_sigterm = False
    sup.tick(at(0))
    process = launcher.started[0]
    become_ready(store, process, at(0))
    (task,) = submit(store, pool_settings, now=at(0))
    queue.claim_next(store, process.worker_id, at(0), pool_settings.lease_s)

    sup.close(at(1))

    assert process.signals == ["KILL"]
    assert sup.workers == {} and not sup.is_leader
    assert queue.get_task(store, task.task_id).status == TaskStatus.PENDING  # reaped: back


def test_the_queue_functions_the_supervisor_adds(store: Store, pool_settings: Settings) -> None:
    assert queue.get_worker(store, "nobody") is None
    queue.register_worker(store, "old", 1, at(0))
    queue.register_worker(store, "mine", 2, at(0))
    queue.register_worker(store, "fresh", 3, at(25))
    (task,) = submit(store, pool_settings, now=at(0), timeout_s=7)
    queue.claim_next(store, "fresh", at(26), pool_settings.lease_s)

    assert queue.mark_silent_workers_offline(store, at(30), 10, keep=["mine"]) == ["old"]
    old = queue.get_worker(store, "old")
    assert old is not None and old.status == WorkerStatus.OFFLINE and old.stopped_at == at(30)
    mine = queue.get_worker(store, "mine")
    assert mine is not None and mine.status == WorkerStatus.STARTING

    (running,) = queue.running_task_deadlines(store)
    assert (running.task_id, running.worker_id, running.started_at, running.timeout_s) == (
        task.task_id, "fresh", at(26), 7)


def test_a_worker_whose_heartbeats_stop_for_a_lease_is_killed_and_its_task_goes_back(
    pool_settings: Settings, store: Store, launcher: FakeLauncher
) -> None:
    settings = pool_settings.with_overrides(min_workers=2)
    sup = Supervisor(settings, store, launcher=launcher, tuning=Tuning(wake_on_work=False))
    assert sup.try_lead()
    try:
        sup.tick(at(0))
        hung, beating = launcher.started
        become_ready(store, hung, at(0.5))
        become_ready(store, beating, at(0.5))
        (task,) = submit(store, settings, now=at(1), timeout_s=600)
        queue.claim_next(store, hung.worker_id, at(1), settings.lease_s)
        queue.set_worker_status(store, hung.worker_id, WorkerStatus.BUSY, at(1))  # last beat
        lease = settings.lease_s
        for t in range(3, int(lease) + 1, 3):
            queue.set_worker_status(store, beating.worker_id, WorkerStatus.IDLE, at(t))
            sup.tick(at(t))
        assert hung.signals == []  # silent for a lease minus a second: not yet
        queue.set_worker_status(store, beating.worker_id, WorkerStatus.IDLE, at(lease + 1.5))
        sup.tick(at(lease + 1.5))
        assert hung.signals == ["KILL"]
        assert beating.signals == []  # a worker that beats is left alone
        sup.tick(at(lease + 2))  # reaped: its task back in the queue, the attempt spent
        back = queue.get_task(store, task.task_id)
        assert back.status == TaskStatus.PENDING and back.attempts == 1
        assert hung.worker_id not in sup.workers and len(launcher.started) == 3  # replaced
    finally:
        sup.close(at(3600))


def test_after_a_store_outage_workers_get_a_lease_to_beat_again_before_counting_as_hung(
    sup: Supervisor, launcher: FakeLauncher, store: Store, pool_settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sup.tick(at(0))
    worker = launcher.started[0]
    become_ready(store, worker, at(0.5))
    lease = pool_settings.lease_s

    def store_down(*args: object, **kwargs: object) -> None:
        raise OSError("the store is down")

    with monkeypatch.context() as patched:
        patched.setattr(queue, "list_workers", store_down)
        for t in range(3, int(lease) + 10, 3):
            with pytest.raises(OSError):
                sup.tick(at(t))
    back = lease + 10  # silent for longer than a lease, but so was the store
    for t in range(int(back), int(back + lease), 3):  # answering for less than a lease
        sup.tick(at(t))
        assert worker.signals == []
    sup.tick(at(back + lease + 1))  # a whole lease of answers, and still no beat: it hangs
    assert worker.signals == ["KILL"]


def test_after_a_stall_of_the_supervisor_workers_get_a_lease_to_beat_again(
    sup: Supervisor, launcher: FakeLauncher, store: Store, pool_settings: Settings,
) -> None:
    # a store call that waited for a lock, or a machine that slept: every heartbeat is old
    sup.tick(at(0))
    worker = launcher.started[0]
    become_ready(store, worker, at(0.5))
    lease = pool_settings.lease_s
    for t in range(3, int(lease), 3):
        queue.set_worker_status(store, worker.worker_id, WorkerStatus.IDLE, at(t))
        sup.tick(at(t))
    woke = 3600.0
    for t in range(int(woke), int(woke + lease), 3):
        sup.tick(at(t))
        assert worker.signals == []
    sup.tick(at(woke + lease + 1))
    assert worker.signals == ["KILL"]
