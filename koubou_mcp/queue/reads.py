"""Reads for callers, health, stats, metrics, `top` and the supervisor (no writes)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select

from koubou_mcp.models import TaskSnapshot, TaskStatus, WorkerSnapshot, elapsed_s
from koubou_mcp.queue.errors import TaskNotFound
from koubou_mcp.queue.records import task_snapshot, worker_record
from koubou_mcp.queue.statements import AUTOVACUUM, FINAL, NEXT_NOT_BEFORE, READY_COUNT, T
from koubou_mcp.queue.workers import list_workers
from koubou_mcp.store import Store


def get_task(store: Store, task_id: str) -> TaskSnapshot:
    """The task with ``task_id``; TaskNotFound when there is none."""
    with store.read() as conn:
        row = conn.execute(select(T).where(T.c.task_id == task_id)).first()
    if row is None:
        raise TaskNotFound(task_id)
    return task_snapshot(row)


@dataclass(frozen=True)
class Progress:
    """Where a task stands, without its (possibly large) prompt and result."""

    task_id: str
    status: str
    worker_id: str | None
    #: tokens generated so far (None before the first is saved)
    tokens: int | None = None
    #: why a pending task waits (the last error kind: ``busy`` = the model server was full)
    error_kind: str | None = None


def task_progress(store: Store, task_id: str) -> Progress:
    """The status, worker and tokens of a task: a light read for waiters that poll often."""
    with store.read() as conn:
        row = conn.execute(select(T.c.status, T.c.worker_id, T.c.tokens, T.c.error_kind)
                           .where(T.c.task_id == task_id)).first()
    if row is None:
        raise TaskNotFound(task_id)
    return Progress(task_id, row.status, row.worker_id, row.tokens, row.error_kind)


def tasks_progress(store: Store, task_ids: Sequence[str]) -> list[Progress]:
    """``task_progress`` of several tasks in one read, in the order of ``task_ids``;
    TaskNotFound names the first id that has no task."""
    with store.read() as conn:
        rows = {row.task_id: row for row in conn.execute(
            select(T.c.task_id, T.c.status, T.c.worker_id, T.c.tokens, T.c.error_kind)
            .where(T.c.task_id.in_(list(task_ids))))}
    missing = next((i for i in task_ids if i not in rows), None)
    if missing is not None:
        raise TaskNotFound(missing)
    return [Progress(i, rows[i].status, rows[i].worker_id, rows[i].tokens, rows[i].error_kind)
            for i in task_ids]


def get_tasks(store: Store, task_ids: Sequence[str]) -> list[TaskSnapshot]:
    """Several tasks in one read, in the order of ``task_ids``; TaskNotFound names the first
    id that has no task."""
    with store.read() as conn:
        rows = {row.task_id: task_snapshot(row) for row in conn.execute(
            select(T).where(T.c.task_id.in_(list(task_ids))))}
    missing = next((i for i in task_ids if i not in rows), None)
    if missing is not None:
        raise TaskNotFound(missing)
    return [rows[i] for i in task_ids]


def list_tasks(store: Store, status: str | None = None, limit: int = 20) -> list[TaskSnapshot]:
    """Tasks, newest first, optionally of one status."""
    query = select(T).order_by(T.c.created_at.desc(), T.c.task_id.desc()).limit(limit)
    if status is not None:
        query = query.where(T.c.status == status)
    with store.read() as conn:
        return [task_snapshot(row) for row in conn.execute(query)]


def counts_by_status(store: Store) -> dict[str, int]:
    """How many tasks are in each status (every status present, zero when none)."""
    counts = {s.value: 0 for s in TaskStatus}
    with store.read() as conn:
        for status, count in conn.execute(select(T.c.status, func.count()).group_by(T.c.status)):
            counts[status] = count
    return counts


def ready_pending_count(store: Store, now: datetime) -> int:
    """Pending tasks that a worker could claim right now (not waiting out a backoff)."""
    with store.read() as conn:
        return int(conn.execute(READY_COUNT, {"p_now": now}).scalar_one())


def next_ready_in(store: Store, now: datetime) -> float | None:
    """Seconds from ``now`` until the first pending task that waits out a retry backoff
    becomes ready; None when none waits (a task ready already is a claim's to find). An idle
    worker sleeping longer than its poll wakes by then: no wake-up announces the end of a
    backoff."""
    with store.read() as conn:
        at = conn.execute(NEXT_NOT_BEFORE, {"p_now": now}).scalar_one()
    return None if at is None else elapsed_s(now, at)


def pending_by_priority(store: Store) -> dict[int, int]:
    """How many tasks wait at each priority, highest priority first (only those present)."""
    query = (select(T.c.priority, func.count()).where(T.c.status == TaskStatus.PENDING.value)
             .group_by(T.c.priority).order_by(T.c.priority.desc()))
    with store.read() as conn:
        return {int(priority): int(count) for priority, count in conn.execute(query)}


def recently_finished(store: Store, statuses: Sequence[str], limit: int) -> list[TaskSnapshot]:
    """The last ``limit`` tasks to finish in one of ``statuses``, most recent first."""
    query = (select(T).where(T.c.status.in_(list(statuses)), T.c.finished_at.is_not(None))
             .order_by(T.c.finished_at.desc(), T.c.task_id.desc()).limit(limit))
    with store.read() as conn:
        return [task_snapshot(row) for row in conn.execute(query)]


@dataclass(frozen=True)
class Stats:
    counts: dict[str, int]
    workers: list[WorkerSnapshot]
    avg_duration_s: float | None
    avg_wait_s: float | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "tasks": self.counts,
            "queue_depth": self.counts.get(TaskStatus.PENDING.value, 0),
            "avg_duration_s": self.avg_duration_s,
            "avg_wait_s": self.avg_wait_s,
            "workers": [worker_record(w) for w in self.workers],
        }


def stats(store: Store) -> Stats:
    """Counts by status, per-worker counters (live workers) and average run and wait times of
    completed tasks (each never below zero: the stamps come from several hosts' clocks, see
    ``models.elapsed_s``)."""
    counts = counts_by_status(store)
    workers = list_workers(store)
    with store.read() as conn:
        rows = conn.execute(
            select(T.c.created_at, T.c.started_at, T.c.finished_at)
            .where(T.c.status == TaskStatus.COMPLETED.value)
            .order_by(T.c.finished_at.desc()).limit(1000)
        ).all()
    runs = [elapsed_s(r.started_at, r.finished_at) for r in rows
            if r.started_at and r.finished_at]
    waits = [elapsed_s(r.created_at, r.started_at) for r in rows if r.started_at]
    return Stats(counts, workers,
                 sum(runs) / len(runs) if runs else None,
                 sum(waits) / len(waits) if waits else None)


@dataclass(frozen=True)
class FinishedTask:
    """The columns of a finished task that the metrics' histograms need."""

    task_id: str
    type: str
    status: str
    error_kind: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime


def finished_since(store: Store, since: datetime | None) -> list[FinishedTask]:
    """Tasks in a final status that finished at or after ``since`` (all when None)."""
    query = (select(T.c.task_id, T.c.type, T.c.status, T.c.error_kind, T.c.created_at,
                    T.c.started_at, T.c.finished_at)
             .where(T.c.status.in_(FINAL), T.c.finished_at.is_not(None)))
    if since is not None:
        query = query.where(T.c.finished_at >= since)
    with store.read() as conn:
        return [FinishedTask(*row) for row in conn.execute(query)]


def retrying_by_kind(store: Store) -> dict[str, int]:
    """Pending tasks whose last attempt failed (they wait out a backoff), by error kind."""
    query = (select(T.c.error_kind, func.count())
             .where(T.c.status == TaskStatus.PENDING.value, T.c.error_kind.is_not(None))
             .group_by(T.c.error_kind))
    with store.read() as conn:
        return {str(kind): int(count) for kind, count in conn.execute(query)}


@dataclass(frozen=True)
class RunningTask:
    """The few columns of an in-progress task the supervisor's deadline check needs."""

    task_id: str
    worker_id: str | None
    started_at: datetime | None
    timeout_s: float
    first_token_s: float | None = None


def running_task_deadlines(store: Store) -> list[RunningTask]:
    """Tasks in progress, without their prompts and results (read every supervisor tick)."""
    with store.read() as conn:
        return [RunningTask(r.task_id, r.worker_id, r.started_at, r.timeout_s, r.first_token_s)
                for r in conn.execute(
                    select(T.c.task_id, T.c.worker_id, T.c.started_at, T.c.timeout_s,
                           T.c.first_token_s)
                    .where(T.c.status == TaskStatus.IN_PROGRESS.value))]


def autovacuum_setting(store: Store) -> str | None:
    """The PostgreSQL server's ``autovacuum`` setting (None on SQLite, which has none)."""
    if not store.is_postgres:
        return None
    with store.read() as conn:
        return str(conn.execute(AUTOVACUUM).scalar_one())
