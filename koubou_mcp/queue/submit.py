"""Storing a new task (from a request that ``koubou_mcp.request`` checked)."""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection, select

from koubou_mcp.config import Settings
from koubou_mcp.models import TaskSnapshot, TaskStatus
from koubou_mcp.queue.prepared import prepared
from koubou_mcp.queue.records import task_snapshot
from koubou_mcp.queue.statements import FINAL, IDEMPOTENCY_LOCK, INSERT_TASK, T
from koubou_mcp.request import TaskRequest
from koubou_mcp.store import Store


def new_task_id(now: datetime) -> str:
    return f"task_{now:%Y%m%d_%H%M%S}_{secrets.token_hex(4)}"


@dataclass(frozen=True)
class Enqueued:
    task: TaskSnapshot
    #: False when an unfinished task with the same idempotency key was returned instead
    created: bool


def enqueue(store: Store, request: TaskRequest, settings: Settings, now: datetime) -> Enqueued:
    """Store a new pending task and wake the workers.

    With an idempotency key, an unfinished task carrying the same key is returned instead of a
    new one (clients that retry a call do not create duplicates).
    """
    return enqueue_many(store, [request], settings, now)[0]


def enqueue_many(store: Store, requests: Sequence[TaskRequest], settings: Settings,
                 now: datetime) -> list[Enqueued]:
    """Store several new pending tasks in one transaction: all of them or, when anything
    fails, none. In the order given; idempotency keys work as in ``enqueue`` (within the
    batch too). The workers are woken once."""
    out: list[Enqueued] = []
    with store.write() as conn:
        for request in requests:
            out.append(_insert(conn, store, request, settings, now))
        created = sum(1 for e in out if e.created)
        # one idle worker per new task (PostgreSQL: picked and notified in this transaction)
        notified = store.notify_within(conn, created) if created else True
    if not notified:
        store.notify_new_work(created)  # one worker per new task
    return out


def _insert(conn: Connection, store: Store, request: TaskRequest, settings: Settings,
            now: datetime) -> Enqueued:
    if request.idempotency_key is not None:
        if store.is_postgres:
            conn.execute(IDEMPOTENCY_LOCK, {"k": request.idempotency_key})
        existing = conn.execute(
            select(T).where(
                T.c.idempotency_key == request.idempotency_key,
                T.c.status.not_in(FINAL),
            ).order_by(T.c.created_at.desc()).limit(1)
        ).first()
        if existing is not None:
            return Enqueued(task_snapshot(existing), created=False)
    values = {
        **request.columns(),
        "task_id": new_task_id(now),
        "status": TaskStatus.PENDING.value,
        "attempts": 0,
        "max_attempts": settings.max_attempts,
        "cancel_requested": False,
        "created_at": now,
        "updated_at": now,
    }
    # the prepared INSERT is compiled for this set of columns (a request leaves out the
    # fields it does not use); a handful of sets in all
    row = prepared(INSERT_TASK, conn, column_keys=tuple(values)).first(conn, values)
    assert row is not None  # INSERT ... RETURNING returns the row it inserted
    return Enqueued(task_snapshot(row), created=True)
