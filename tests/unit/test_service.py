"""The transport-neutral service, without MCP or HTTP: submit and wait, read, list, cancel,
its errors, the health document, and its life (store and pool opened and closed).

The worker's side is played through the queue on a real SQLite file, in a thread.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest

from koubou_mcp import queue
from koubou_mcp.config import Settings
from koubou_mcp.models import utcnow
from koubou_mcp.service import (
    MAX_SYNC_WAIT_S,
    InvalidRequest,
    Service,
    StoreUnavailable,
    TaskFinished,
    TaskNotFound,
    TaskRecord,
    TaskSummary,
)
from koubou_mcp.store import Store
from tests.support.waiting import wait_until

pytestmark = pytest.mark.anyio

RECORD_KEYS = {"task_id", "type", "status", "priority", "result", "error", "error_kind",
               "attempts", "max_attempts", "timeout_s", "worker_id", "cancel_requested",
               "idempotency_key", "created_at", "updated_at", "started_at", "finished_at",
               "duration_s", "phase", "partial_result", "tokens", "first_token_s",
               "model_server", "workdir", "files", "model", "system", "options",
               "output_schema", "result_json"}


@pytest.fixture
async def service(settings: Settings) -> AsyncIterator[Service]:
    svc = Service(settings, run_pool=False)
    await svc.start()
    try:
        yield svc
    finally:
        await svc.stop()


def store_of(service: Service) -> Store:
    assert service.store is not None
    return service.store


async def run_one_task(store: Store, settings: Settings, answer: str) -> str:
    """Play a worker: claim the next task (waiting for one), then complete it."""
    def run() -> str:
        queue.register_worker(store, "stand-in", 1, utcnow())
        task = wait_until(lambda: queue.claim_next(store, "stand-in", utcnow(), settings.lease_s),
                          message="a task to claim")
        queue.complete(store, task.task_id, "stand-in", answer, utcnow())
        return task.task_id

    return await anyio.to_thread.run_sync(run)


# -- submit and wait ----------------------------------------------------------------------

async def test_an_async_submit_queues_the_task_and_returns_at_once(service: Service) -> None:
    request = service.validate("summarise", "code", 7)
    result = await service.submit(request)
    assert (result.status, result.type, result.priority, result.created) == (
        "pending", "code", 7, True)
    assert result.waited_s is None and "get_status" in result.next_step
    task = queue.get_task(store_of(service), result.task_id)
    assert (task.prompt, task.status) == ("summarise", "pending")


async def test_a_sync_submit_returns_what_the_worker_produced(
    service: Service, settings: Settings
) -> None:
    async with anyio.create_task_group() as tg:
        tg.start_soon(run_one_task, store_of(service), settings, "forty-two")
        result = await service.submit(service.validate("the answer?"), wait_s=30)
    assert (result.status, result.result, result.worker_id) == (
        "completed", "forty-two", "stand-in")
    assert result.waited_s is not None and result.next_step.startswith("done")


async def test_a_wait_reports_progress_and_returns_the_status_when_it_runs_out(
    service: Service,
) -> None:
    submitted = await service.submit(service.validate("nobody runs me"))
    seen: list[tuple[str, float]] = []

    async def on_progress(progress: queue.Progress, elapsed: float) -> None:
        seen.append((progress.status, elapsed))

    record, waited = await service.wait(submitted.task_id, 0.5, on_progress,
                                        progress_every_s=0.1)
    assert record.status == "pending" and waited >= 0.5
    assert len(seen) >= 2 and all(status == "pending" for status, _ in seen)
    assert [e for _, e in seen] == sorted(e for _, e in seen)


async def test_a_sync_wait_beyond_the_limit_is_refused_and_stores_nothing(
    service: Service,
) -> None:
    with pytest.raises(InvalidRequest) as refused:
        await service.submit(service.validate("x"), wait_s=MAX_SYNC_WAIT_S + 1)
    assert refused.value.field == "wait_s" and "from 0 to 100" in str(refused.value)
    assert sum(queue.counts_by_status(store_of(service)).values()) == 0


def test_a_bad_field_is_an_invalid_request_naming_it(settings: Settings) -> None:
    service = Service(settings, run_pool=False)
    with pytest.raises(InvalidRequest) as refused:
        service.validate("x", priority=11)
    assert refused.value.field == "priority" and "from 1 (lowest) to 10" in str(refused.value)
    with pytest.raises(InvalidRequest) as empty:
        service.validate("   ")
    assert empty.value.field == "prompt"


# -- read, list, cancel -------------------------------------------------------------------

async def test_a_record_has_every_field_and_the_prompt_only_when_asked(
    service: Service,
) -> None:
    task_id = (await service.submit(service.validate("read me back"))).task_id
    plain = await service.read(task_id)
    assert set(plain.as_json()) == RECORD_KEYS, "no prompt key unless asked for"
    full = await service.read(task_id, include_prompt=True)
    assert full.as_json()["prompt"] == "read me back"
    assert set(full.as_json()) == RECORD_KEYS | {"prompt"}
    assert plain.created_at is not None and plain.created_at.endswith("Z")


async def test_an_unknown_task_is_task_not_found_for_read_and_cancel(service: Service) -> None:
    with pytest.raises(TaskNotFound, match="no task with id 'task_nope'"):
        await service.read("task_nope")
    with pytest.raises(TaskNotFound, match="no task with id 'task_nope'"):
        await service.cancel("task_nope")


async def test_cancel_ends_a_pending_task_and_refuses_a_finished_one(
    service: Service, settings: Settings
) -> None:
    pending = (await service.submit(service.validate("never mind"))).task_id
    assert (await service.cancel(pending)).status == "cancelled"
    async with anyio.create_task_group() as tg:
        tg.start_soon(run_one_task, store_of(service), settings, "done")
        finished = (await service.submit(service.validate("done already"), wait_s=30)).task_id
    with pytest.raises(TaskFinished, match="already completed"):
        await service.cancel(finished)


async def test_a_listing_is_newest_first_with_counts_and_checks_its_arguments(
    service: Service,
) -> None:
    ids = [(await service.submit(service.validate(f"task {i}"))).task_id for i in range(3)]
    listing = await service.list_tasks()
    assert [t.task_id for t in listing.tasks] == ids[::-1]
    assert listing.counts["pending"] == 3
    assert listing.tasks[0].prompt_preview == "task 2" and listing.tasks[0].has_result is False
    assert [t.task_id for t in (await service.list_tasks("pending", 1)).tasks] == [ids[2]]
    for status, limit, field in (("done", 5, "status"), (None, 0, "limit"),
                                 (None, 201, "limit")):
        with pytest.raises(InvalidRequest) as refused:
            await service.list_tasks(status, limit)
        assert refused.value.field == field


def test_a_long_prompt_is_cut_in_the_listing(settings: Settings, sqlite_store: Store) -> None:
    task = queue.enqueue(sqlite_store, queue.validate_request(settings, "word " * 100),
                         settings, utcnow()).task
    summary = TaskSummary.of(task)
    assert len(summary.prompt_preview) == 81 and summary.prompt_preview.endswith("…")
    assert TaskRecord.of(task).prompt == task.prompt


# -- life, failures and health ------------------------------------------------------------

async def test_a_store_that_cannot_open_makes_every_call_say_so_and_health_down(
    settings: Settings, tmp_path: Path
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    broken = Service(settings.with_overrides(
        database_url=f"sqlite:///{blocker}/db/koubou.db"), run_pool=False)
    await broken.start()  # does not raise: the service serves its health regardless
    try:
        assert broken.store is None and broken.store_error
        for call in (lambda: broken.read("task_x"), lambda: broken.list_tasks(),
                     lambda: broken.submit(broken.validate("x")), broken.stats):
            with pytest.raises(StoreUnavailable, match="cannot create the database directory"):
                await call()
        document = await broken.health()
        assert document["status"] == "down"
        assert document["server"]["pool"] == "not started (--no-pool)"
    finally:
        await broken.stop()


class RecordingPool:
    """A pool link that records what the service asks of it (the real one starts a background
    pool: the end-to-end tests run it)."""

    def __init__(self) -> None:
        self.ensured = 0
        self.detached = 0

    def ensure(self, *, explicit: bool = True) -> None:
        self.ensured += 1

    def detach(self) -> None:
        self.detached += 1

    def health(self) -> dict[str, Any]:
        return {"hosting": "attached", "running": True, "leader": False, "pid": 1,
                "role": "detached", "detached": True, "attached_servers": [2]}


async def test_the_service_attaches_to_the_pool_names_it_wakes_it_per_task_and_only_leaves(
    settings: Settings,
) -> None:
    pool = RecordingPool()
    started: list[Settings] = []

    def starter(given: Settings) -> RecordingPool:
        started.append(given)
        return pool

    service = Service(settings, pool_starter=starter)
    await service.start()
    try:
        assert started == [settings]
        document = await service.health()
        assert document["supervisor"]["ok"] is True
        assert document["server"]["pool"] == "attached"
        assert "background pool, pid 1" in document["supervisor"]["summary"]
        assert "1 server attached" in document["supervisor"]["summary"]
        await service.submit(service.validate("a task"))
        assert pool.ensured == 1, "a new task makes sure a pool runs to take it"
    finally:
        await service.stop()
    assert pool.detached == 1, "stopping the server only leaves the pool"
    assert service.store is None and service.pool is None


async def test_a_pool_that_cannot_start_is_reported_by_health_and_the_store_still_serves(
    settings: Settings,
) -> None:
    def starter(given: Settings) -> RecordingPool:
        raise OSError("no more processes")

    service = Service(settings, pool_starter=starter)
    await service.start()
    try:
        document = await service.health()
        assert document["supervisor"]["ok"] is False
        assert "no more processes" in document["supervisor"]["reason"]
        assert (await service.submit(service.validate("still queued"))).status == "pending"
    finally:
        await service.stop()


async def test_stats_and_workers_describe_the_installation(service: Service) -> None:
    queue.register_worker(store_of(service), "w-live", 4242, utcnow())
    await service.submit(service.validate("queued"))
    stats = await service.stats()
    assert stats["tasks"]["pending"] == 1 and stats["queue_depth"] == 1
    workers = await service.workers()
    assert workers["live"] == 1 and workers["workers"][0]["pid"] == 4242


def test_the_phase_says_why_a_task_waits_and_how_far_it_got() -> None:
    from dataclasses import replace
    from datetime import timedelta

    from koubou_mcp.models import TaskSnapshot
    from koubou_mcp.results import phase_of

    now = utcnow()
    base = TaskSnapshot(task_id="t", type="general", prompt="p", status="pending", priority=5,
                        result=None, error=None, error_kind=None, attempts=0, max_attempts=3,
                        timeout_s=60, worker_id=None, lease_expires_at=None, not_before=None,
                        cancel_requested=False, idempotency_key=None, created_at=now,
                        updated_at=now, started_at=None, finished_at=None)
    assert phase_of(base, now) == "queued"
    assert phase_of(replace(base, error_kind="busy"), now) == "waiting_for_model"
    assert phase_of(replace(base, not_before=now + timedelta(seconds=5),
                            error_kind="server_error"), now) == "retry_backoff"
    running = replace(base, status="in_progress")
    assert phase_of(running, now) == "waiting_for_first_token"
    assert phase_of(replace(running, tokens=12), now) == "generating"
    assert phase_of(replace(base, status="completed"), now) == "completed"
