"""The Prometheus collector over a real SQLite store with a fake clock, its running totals, and
the supervisor's scaling counters it reports (stand-in processes, no real workers)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from koubou_mcp import queue
from koubou_mcp.admission import Observation
from koubou_mcp.config import Settings
from koubou_mcp.metrics import FinishedTally, Histogram, StoreCollector, build_registry
from koubou_mcp.models import WorkerStatus, utcnow
from koubou_mcp.queue import FinishedTask
from koubou_mcp.store import Store
from koubou_mcp.supervisor import Supervisor, Tuning
from tests.support.pool_doubles import FakeLauncher, become_ready

T0 = datetime(2026, 11, 28, 12, 0, 0)
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def scrape(collector: StoreCollector) -> Samples:
    text = generate_latest(build_registry(collector)).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def finished(task_id: str, *, done: float, ran: float = 1.0, waited: float = 0.5,
             status: str = "completed", kind: str | None = None,
             task_type: str = "general") -> FinishedTask:
    finished_at = at(done)
    started = finished_at - timedelta(seconds=ran)
    return FinishedTask(task_id, task_type, status, kind, started - timedelta(seconds=waited),
                        started, finished_at)


# -- running totals -------------------------------------------------------------------------

def test_a_histogram_reports_cumulative_buckets_ending_with_inf() -> None:
    h = Histogram((1.0, 5.0))
    for value in (0.5, 1.0, 3.0, 7.0):
        h.observe(value)
    assert h.buckets() == [("1.0", 2.0), ("5.0", 3.0), ("+Inf", 4.0)]
    assert h.total == 11.5


def test_overlapping_reads_count_each_task_once_and_a_late_commit_within_the_margin() -> None:
    tally = FinishedTally(margin_s=60)
    assert tally.since is None  # the first read takes everything
    assert tally.add([finished("a", done=0), finished("b", done=100)]) == 2
    assert tally.since == at(40)
    # the next read starts at the horizon: b again, and c, which finished before b but
    # committed after the previous read
    assert tally.add([finished("b", done=100), finished("c", done=90)]) == 1
    assert tally.add([finished("b", done=100), finished("c", done=90)]) == 0
    assert sum(tally.waits["general"].counts) == 3
    assert sum(tally.durations[("general", "completed")].counts) == 3


def test_failures_count_by_kind_and_tasks_that_never_ran_have_no_times() -> None:
    tally = FinishedTally()
    never_ran = FinishedTask("x", "code", "cancelled", "cancelled", at(0), None, at(1))
    tally.add([finished("f1", done=1, status="failed", kind="timeout"),
               finished("f2", done=2, status="failed", kind="timeout", task_type="code"),
               finished("f3", done=3, status="failed", kind=None), never_ran,
               finished("c", done=4, status="cancelled", kind="cancelled")])
    assert tally.errors == {("general", "timeout"): 1, ("code", "timeout"): 1,
                            ("general", "unknown"): 1}
    assert sum(tally.waits["code"].counts) == 1  # the cancelled one that never ran: none
    assert sum(tally.durations[("general", "cancelled")].counts) == 1


# -- the collector over a store -------------------------------------------------------------

def run_one(store: Store, settings: Settings, worker: str, prompt: str, *, start: float,
            end: float, fail_kind: str | None = None, task_type: str = "general") -> None:
    request = queue.validate_request(settings, prompt, task_type)
    queue.enqueue(store, request, settings, at(start))
    task = queue.claim_next(store, worker, at(start + 0.25), settings.lease_s)
    assert task is not None
    if fail_kind is None:
        queue.complete(store, task.task_id, worker, "ok", at(end))
    else:
        queue.fail(store, task.task_id, worker, "boom", at(end), kind=fail_kind)


def test_the_collector_reads_counts_workers_times_and_errors_from_the_store(
    settings: Settings, sqlite_store: Store
) -> None:
    now = [at(0)]
    pool: dict[str, Any] = {"leader": True, "scaling": {"up_events": 2, "down_events": 1,
                                                        "workers_started": 3,
                                                        "workers_retired": 1}}
    collector = StoreCollector(settings, lambda: sqlite_store, lambda: pool,
                               clock=lambda: now[0])
    empty = scrape(collector)
    assert empty[("koubou_store_up", ())] == 1
    assert empty[("koubou_tasks", (("status", "completed"),))] == 0
    assert empty[("koubou_workers", (("host", settings.hostname), ("status", "busy")))] == 0
    assert empty[("koubou_pool_leader", ())] == 1
    assert empty[("koubou_pool_scale_events_total", (("direction", "up"),))] == 2
    assert empty[("koubou_pool_scale_events_total", (("direction", "down"),))] == 1
    assert empty[("koubou_pool_workers_started_total", ())] == 3

    queue.register_worker(sqlite_store, "w1", 1, at(0), host="box-a")
    run_one(sqlite_store, settings, "w1", "a", start=0, end=2)
    run_one(sqlite_store, settings, "w1", "b", start=1, end=40)
    run_one(sqlite_store, settings, "w1", "c", start=2, end=3, fail_kind="timeout",
            task_type="code")
    queue.enqueue(sqlite_store, queue.validate_request(settings, "waiting"), settings, at(5))
    queue.register_worker(sqlite_store, "w2", 2, at(5), host="box-b")
    queue.set_worker_status(sqlite_store, "w2", WorkerStatus.BUSY, at(5))
    now[0] = at(50)

    got = scrape(collector)
    assert got[("koubou_tasks", (("status", "completed"),))] == 2
    assert got[("koubou_tasks", (("status", "failed"),))] == 1
    assert got[("koubou_queue_depth", ())] == got[("koubou_queue_ready", ())] == 1
    assert got[("koubou_workers", (("host", "box-a"), ("status", "idle")))] == 1
    assert got[("koubou_workers", (("host", "box-b"), ("status", "busy")))] == 1
    duration = (("status", "completed"), ("type", "general"))
    assert got[("koubou_task_duration_seconds_count", duration)] == 2
    assert got[("koubou_task_duration_seconds_sum", duration)] == pytest.approx(1.75 + 38.75)
    assert got[("koubou_task_duration_seconds_bucket", (("le", "2.5"), *duration))] == 1
    assert got[("koubou_task_duration_seconds_bucket", (("le", "60.0"), *duration))] == 2
    assert got[("koubou_task_wait_seconds_sum", (("type", "general"),))] == pytest.approx(0.5)
    assert got[("koubou_task_errors_total", (("kind", "timeout"), ("type", "code")))] == 1
    assert scrape(collector)[("koubou_task_duration_seconds_count", duration)] == 2


def test_a_host_whose_clock_runs_ahead_does_not_hide_the_other_hosts_tasks(
    settings: Settings, sqlite_store: Store
) -> None:
    """Box b's clock is an hour ahead: its task finishes "in the future". The tasks box a
    finishes afterwards, with the right time, are still counted, each once, and a worker
    whose clock is behind the server's adds no negative wait."""
    now = [at(0)]
    collector = StoreCollector(settings, lambda: sqlite_store, lambda: None,
                               clock=lambda: now[0])
    duration = (("status", "completed"), ("type", "general"))
    run_one(sqlite_store, settings, "a1", "right on time", start=0, end=2)
    now[0] = at(5)
    assert scrape(collector)[("koubou_task_duration_seconds_count", duration)] == 1
    run_one(sqlite_store, settings, "b1", "an hour ahead", start=3605, end=3610)
    now[0] = at(11)
    assert scrape(collector)[("koubou_task_duration_seconds_count", duration)] == 2
    run_one(sqlite_store, settings, "a1", "after the one from the future", start=12, end=15)
    now[0] = at(20)
    got = scrape(collector)
    assert got[("koubou_task_duration_seconds_count", duration)] == 3
    assert got[("koubou_task_duration_seconds_sum", duration)] == pytest.approx(
        1.75 + 4.75 + 2.75)
    for later in (30, 200, 3700):  # read again while "in the future", counted once
        now[0] = at(later)
        assert scrape(collector)[("koubou_task_duration_seconds_count", duration)] == 3

    # a worker whose clock is 100 s behind the server that took the task
    request = queue.validate_request(settings, "behind")
    queue.enqueue(sqlite_store, request, settings, at(3800))
    task = queue.claim_next(sqlite_store, "c1", at(3700), settings.lease_s)
    assert task is not None
    queue.complete(sqlite_store, task.task_id, "c1", "ok", at(3701))
    now[0] = at(3802)
    got = scrape(collector)
    assert got[("koubou_task_duration_seconds_count", duration)] == 4
    assert got[("koubou_task_wait_seconds_count", (("type", "general"),))] == 4
    assert got[("koubou_task_wait_seconds_bucket", (("le", "0.01"), ("type", "general")))] == 1
    assert queue.stats(sqlite_store).avg_wait_s == pytest.approx((0.25 * 3 + 0) / 4)


def test_retrying_tasks_show_by_kind_and_a_closed_store_reports_down(
    settings: Settings, sqlite_store: Store
) -> None:
    store: list[Store | None] = [sqlite_store]
    collector = StoreCollector(settings, lambda: store[0], lambda: None, clock=lambda: at(9))
    queue.register_worker(sqlite_store, "w1", 1, at(0))
    queue.enqueue(sqlite_store, queue.validate_request(settings, "flaky"), settings, at(0))
    task = queue.claim_next(sqlite_store, "w1", at(1), settings.lease_s)
    assert task is not None
    queue.fail(sqlite_store, task.task_id, "w1", "503", at(2), kind="busy", retry=True)
    got = scrape(collector)
    assert got[("koubou_tasks_retrying", (("kind", "busy"),))] == 1
    assert got[("koubou_pool_leader", ())] == 0  # no pool in this process
    assert got[("koubou_pool_scale_events_total", (("direction", "up"),))] == 0

    store[0] = None
    down = scrape(collector)
    assert down[("koubou_store_up", ())] == 0
    assert not any(name == "koubou_tasks" for name, _ in down)


# -- the supervisor's counters --------------------------------------------------------------

@pytest.fixture
def sup(settings: Settings, sqlite_store: Store) -> Iterator[tuple[Supervisor, FakeLauncher]]:
    launcher = FakeLauncher()
    limits = settings.with_overrides(min_workers=1, max_workers=4, scale_up_threshold=2.0,
                                     idle_timeout_s=10.0, lease_s=30.0)
    supervisor = Supervisor(limits, sqlite_store, launcher=launcher,
                            tuning=Tuning(wake_on_work=False))
    assert supervisor.try_lead()
    yield supervisor, launcher
    supervisor.close(utcnow())


def test_the_supervisor_counts_scale_up_and_scale_down_events_and_workers(
    sup: tuple[Supervisor, FakeLauncher], sqlite_store: Store, settings: Settings
) -> None:
    supervisor, launcher = sup
    supervisor.tick(at(0))  # the minimum: one worker
    become_ready(sqlite_store, launcher.started[0], at(1))
    for i in range(6):
        queue.enqueue(sqlite_store, queue.validate_request(settings, f"t{i}"), settings, at(1))
    supervisor.tick(at(2))  # 6 ready / threshold 2: three workers, two more
    assert supervisor.health()["scaling"] == {"up_events": 2, "down_events": 0,
                                              "workers_started": 3, "workers_retired": 0}
    supervisor.tick(at(3))  # nothing changes: no event
    for process in launcher.started[1:]:
        become_ready(sqlite_store, process, at(3))
    for task in queue.list_tasks(sqlite_store, limit=10):
        queue.cancel(sqlite_store, task.task_id, at(3))
    supervisor.tick(at(20))  # idle for 17 s > 10 s: back to the minimum of one
    assert supervisor.health()["scaling"] == {"up_events": 2, "down_events": 1,
                                              "workers_started": 3, "workers_retired": 2}


def test_model_servers_show_slots_in_use_their_limit_and_first_token_time(
    settings: Settings, sqlite_store: Store
) -> None:
    url = settings.ollama_url
    collector = StoreCollector(settings, lambda: sqlite_store, lambda: None, clock=lambda: at(2))
    assert not any(name.startswith("koubou_model_") for name, _ in scrape(collector))
    queue.configure_model_server(sqlite_store, url, 2, at(0))
    queue.observe_model_server(sqlite_store, url, Observation(1, first_token_s=0.25), at(0), 5)
    queue.observe_model_server(sqlite_store, url, Observation(2, busy=True), at(0), 5)
    queue.enqueue(sqlite_store, queue.validate_request(settings, "x"), settings, at(0))
    queue.register_worker(sqlite_store, "w1", 1, at(0))
    assert queue.admit_next(sqlite_store, "w1", at(1), 30, url) is not None
    got = scrape(collector)
    server = (("server", url),)
    assert got[("koubou_model_slots_in_use", server)] == 1
    assert got[("koubou_model_slot_limit", server)] == 2
    assert got[("koubou_model_slot_limit_pinned", server)] == 1
    assert got[("koubou_model_first_token_seconds", server)] == 0.25
    assert got[("koubou_model_busy_total", server)] == 1
