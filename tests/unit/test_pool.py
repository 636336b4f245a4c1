"""Hosting the pool: draining with deadlines, the pool log, a supervisor run in a thread and
standing by (stand-in worker processes; tests/integration/test_supervisor.py runs real ones)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from koubou_mcp import queue
from koubou_mcp.config import Settings
from koubou_mcp.models import TaskStatus, utcnow
from koubou_mcp.pool import PoolHandle, PoolLog, PoolRunner, drain, start_in_thread
from koubou_mcp.store import Store
from koubou_mcp.supervisor import LOGGER_NAME, Supervisor, Tuning
from tests.support.pool_doubles import FakeLauncher, become_ready
from tests.support.tasks import submit
from tests.support.waiting import wait_until

T0 = datetime(2026, 11, 28, 12, 0, 0)
QUICK = Tuning(wake_on_work=False, tick_s=0.05, lock_retry_s=0.05, force_wait_s=0.3,
               drain_margin_s=0.3)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


@pytest.fixture
def pool_settings(settings: Settings) -> Settings:
    return settings.with_overrides(min_workers=1, max_workers=4, idle_timeout_s=10.0,
                                   lease_s=30.0, drain_grace_s=2.0, stats_interval_s=5.0)


@pytest.fixture
def handles() -> Iterator[list[PoolHandle]]:
    started: list[PoolHandle] = []
    try:
        yield started
    finally:
        for handle in started:
            handle.stop(drain=False, timeout_s=10)


def pool_handlers() -> list[logging.Handler]:
    return list(logging.getLogger(LOGGER_NAME).handlers)


def test_drain_terminates_then_forces_then_kills_and_the_task_goes_back(
    pool_settings: Settings, sqlite_store: Store
) -> None:
    launcher = FakeLauncher()
    launcher.obey_sigterm = False
    sup = Supervisor(pool_settings, sqlite_store, launcher=launcher, tuning=QUICK)
    assert sup.try_lead()
    try:
        sup.tick(at(0))
        process = launcher.started[0]
        become_ready(sqlite_store, process, at(0))
        (task,) = submit(sqlite_store, pool_settings, now=at(0))
        queue.claim_next(sqlite_store, process.worker_id, at(0), pool_settings.lease_s)
        sup.tick(at(0.5))

        drain(sup, force=True)

        assert process.signals == ["TERM", "TERM", "KILL"]
        assert sup.workers == {}
        assert queue.get_task(sqlite_store, task.task_id).status == TaskStatus.PENDING
        assert sup.health()["stopping"] is True
    finally:
        sup.close(utcnow())


def test_drain_lets_obedient_workers_exit_on_the_first_sigterm(
    pool_settings: Settings, sqlite_store: Store
) -> None:
    launcher = FakeLauncher()
    sup = Supervisor(pool_settings, sqlite_store, launcher=launcher, tuning=QUICK)
    assert sup.try_lead()
    try:
        sup.tick(at(0))
        drain(sup)
        assert [p.signals for p in launcher.started] == [["TERM"]]
        assert sup.workers == {}
    finally:
        sup.close(utcnow())


def test_statistics_go_to_worker_pool_log_even_without_logging_set_up(
    pool_settings: Settings, sqlite_store: Store
) -> None:
    sup = Supervisor(pool_settings, sqlite_store, launcher=FakeLauncher(), tuning=QUICK)
    pool_log = PoolLog(pool_settings)
    pool_log.attach()
    try:
        assert sup.try_lead()
        submit(sqlite_store, pool_settings, 2, now=at(0))
        sup.tick(at(0))
        sup.tick(at(pool_settings.stats_interval_s + 0.1))
    finally:
        sup.close(at(10))
        pool_log.detach()
    path = pool_settings.logs_dir / "worker_pool.log"
    text = path.read_text()
    assert "Worker Pool Statistics" in text and "Active Workers:" in text
    assert "  • pending: 2 tasks" in text
    assert "supervising the worker pool" in text
    assert path.stat().st_mode & 0o777 == 0o600


def test_the_pool_log_adds_one_handler_and_removes_it(pool_settings: Settings) -> None:
    before = pool_handlers()
    pool_log = PoolLog(pool_settings)
    pool_log.attach()
    pool_log.attach()  # twice: still one
    assert len(pool_handlers()) == len(before) + 1
    pool_log.detach()
    assert pool_handlers() == before


def test_the_pool_log_adds_nothing_when_the_process_logs_there_already(
    pool_settings: Settings,
) -> None:
    root = logging.getLogger()
    path = pool_settings.logs_dir / "worker_pool.log"
    path.parent.mkdir(parents=True)
    own = logging.FileHandler(path)
    root.addHandler(own)
    try:
        before = pool_handlers()
        pool_log = PoolLog(pool_settings)
        pool_log.attach()
        assert pool_handlers() == before
        pool_log.detach()
    finally:
        root.removeHandler(own)
        own.close()


def test_a_pool_in_a_thread_leads_stops_and_removes_its_log_handler(
    pool_settings: Settings, sqlite_store: Store, handles: list[PoolHandle]
) -> None:
    before = pool_handlers()
    launcher = FakeLauncher()
    handle = start_in_thread(pool_settings, store=sqlite_store, tuning=QUICK, launcher=launcher)
    handles.append(handle)
    wait_until(lambda: handle.health().get("workers", {}).get("starting") == 1, 10,
               message="the pool to start its first worker")
    assert handle.is_leader and len(pool_handlers()) == len(before) + 1

    assert handle.stop(timeout_s=10)

    assert not handle.running and not handle.is_leader
    assert [p.signals for p in launcher.started] == [["TERM"]]
    assert pool_handlers() == before


def test_a_standing_by_pool_takes_over_when_the_leader_stops(
    pool_settings: Settings, sqlite_store: Store, handles: list[PoolHandle]
) -> None:
    first = start_in_thread(pool_settings, store=sqlite_store, tuning=QUICK,
                            launcher=FakeLauncher(), role="pool")
    handles.append(first)
    wait_until(lambda: first.is_leader, 10, message="the first pool to lead")
    second = start_in_thread(pool_settings, store=sqlite_store, tuning=QUICK,
                             launcher=FakeLauncher())
    handles.append(second)
    wait_until(lambda: "leader_pid" in second.health(), 10, message="the second to stand by")
    assert not second.is_leader and second.running

    assert first.stop(timeout_s=10)

    wait_until(lambda: second.is_leader, 10, message="the second pool to take over")


def test_a_stop_request_while_standing_by_ends_the_run_without_leading(
    pool_settings: Settings, sqlite_store: Store, tmp_path: Path
) -> None:
    leader = Supervisor(pool_settings, sqlite_store, launcher=FakeLauncher(), tuning=QUICK)
    assert leader.try_lead()
    runner = PoolRunner(Supervisor(pool_settings, sqlite_store, launcher=FakeLauncher(),
                                   tuning=QUICK))
    try:
        runner.request_stop()
        assert runner.run() == 0
        assert not runner.supervisor.is_leader and leader.is_leader
    finally:
        runner.close()
        leader.close(utcnow())


def test_a_second_stop_request_forces(pool_settings: Settings, sqlite_store: Store) -> None:
    runner = PoolRunner(Supervisor(pool_settings, sqlite_store, launcher=FakeLauncher(),
                                   tuning=QUICK))
    try:
        runner.request_stop()
        assert runner.stop_requested and not runner.forced
        runner.request_stop()
        assert runner.forced
    finally:
        runner.close()
