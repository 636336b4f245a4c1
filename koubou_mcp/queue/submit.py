"""Storing a new task (from a request that ``koubou_mcp.request`` checked)."""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from koubou_mcp.config import Settings
from koubou_mcp.models import TaskSnapshot, TaskStatus
from koubou_mcp.queue.message import Call, transaction
from koubou_mcp.queue.prepared import prepared
from koubou_mcp.queue.records import task_snapshot
from koubou_mcp.queue.statements import IDEMPOTENCY_LOCK, INSERT_TASK, UNFINISHED_WITH_KEY
from koubou_mcp.request import TaskRequest
from koubou_mcp.store import WAKE_IDLE_WORKERS, DriverTransaction, Store


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
    if store.is_postgres and all(r.idempotency_key is None for r in requests):
        return _enqueue_in_one_message(store, requests, settings, now)
    out: list[Enqueued] = []
    # on the driver's connection: SQLAlchemy's transaction handling was a third of the CPU of
    # an enqueue, spent while holding SQLite's write lock (docs/benchmarks.md)
    with store.write_on_driver() as tx:
        for request in requests:
            out.append(_insert(tx, store, request, settings, now))
        created = sum(1 for e in out if e.created)
        if created and store.is_postgres:
            # one idle worker per new task, picked and notified in this transaction: NOTIFY
            # is delivered at its commit, with no gap between the two
            prepared(WAKE_IDLE_WORKERS, tx).execute(tx, {"n": created})
    if created and not store.is_postgres:
        store.notify_new_work(created)  # one worker per new task
    return out


def _enqueue_in_one_message(store: Store, requests: Sequence[TaskRequest], settings: Settings,
                            now: datetime) -> list[Enqueued]:
    """PostgreSQL, no idempotency keys (nothing to look up first): ``BEGIN``, the inserts, the
    wake-up of one idle worker per task and ``COMMIT`` as one message (``queue.message``),
    one round trip instead of four for one task. Each round trip is a wait for the server
    and then for a core: with more runnable processes than cores (a busy pool on a small
    machine) the submitter waited longest of all, and it is what the pool waits for."""
    rows = [_new_row(request, settings, now) for request in requests]
    with store.write_on_driver() as tx, transaction(tx) as messages:
        calls: list[Call] = [(prepared(INSERT_TASK, tx, column_keys=tuple(values)), values)
                             for values in rows]
        calls.append((prepared(WAKE_IDLE_WORKERS, tx), {"n": len(rows)}))
        results = messages.send(calls, commit=True)
    return [Enqueued(task_snapshot(inserted[0]), created=True) for inserted in results[:-1]]


def _insert(tx: DriverTransaction, store: Store, request: TaskRequest, settings: Settings,
            now: datetime) -> Enqueued:
    if request.idempotency_key is not None:
        if store.is_postgres:
            prepared(IDEMPOTENCY_LOCK, tx).execute(tx, {"k": request.idempotency_key})
        existing = prepared(UNFINISHED_WITH_KEY, tx).first(tx, {"p_key": request.idempotency_key})
        if existing is not None:
            return Enqueued(task_snapshot(existing), created=False)
    values = _new_row(request, settings, now)
    # the prepared INSERT is compiled for this set of columns (a request leaves out the
    # fields it does not use); a handful of sets in all
    row = prepared(INSERT_TASK, tx, column_keys=tuple(values)).first(tx, values)
    assert row is not None  # INSERT ... RETURNING returns the row it inserted
    return Enqueued(task_snapshot(row), created=True)


def _new_row(request: TaskRequest, settings: Settings, now: datetime) -> dict[str, Any]:
    return {
        **request.columns(),
        "task_id": new_task_id(now),
        "status": TaskStatus.PENDING.value,
        "attempts": 0,
        "max_attempts": settings.max_attempts,
        "cancel_requested": False,
        "created_at": now,
        "updated_at": now,
    }
