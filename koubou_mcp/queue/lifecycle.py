"""A claimed task's life: heartbeats, its end (complete, fail, cancelled, released), and the
recovery of tasks whose worker is gone or that waited too long."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import Connection, and_, select, update
from sqlalchemy.sql.elements import ColumnElement

from koubou_mcp.models import TaskSnapshot, TaskStatus
from koubou_mcp.queue.errors import TaskNotFound, TaskStateError
from koubou_mcp.queue.prepared import prepared
from koubou_mcp.queue.records import task_snapshot
from koubou_mcp.queue.statements import (
    COMPLETE,
    COMPLETE_COUNTED,
    FINAL,
    TASK_BEAT,
    TASK_BEAT_PROGRESS,
    WORKER_BEAT,
    WORKER_DONE,
    T,
    W,
)
from koubou_mcp.queue.workers import mark_worker_offline
from koubou_mcp.store import Store


class Beat(StrEnum):
    """What a heartbeat learned about the task being worked on."""

    OK = "ok"
    CANCEL = "cancel"  # someone asked to cancel: stop and call mark_cancelled
    LOST = "lost"  # the task is no longer ours (lease expired and someone else took it)


@dataclass(frozen=True)
class Generated:
    """What a running task's model has produced so far (saved with heartbeats)."""

    text: str | None
    tokens: int | None = None
    first_token_s: float | None = None

    def values(self) -> dict[str, Any]:
        return {"partial_result": self.text, "tokens": self.tokens,
                "first_token_s": self.first_token_s}


def heartbeat(store: Store, worker_id: str, task_id: str | None, now: datetime,
              lease_s: float, generated: Generated | None = None) -> Beat:
    """Record that ``worker_id`` is alive and, when it holds ``task_id``, extend its lease
    (and save what the model has generated so far, when given: one write a heartbeat, never
    one a token)."""
    with store.write() as conn:
        row = None
        if task_id is not None:
            # the task's row before the worker's, in the order the hand-over takes them
            # (it completes the task, then marks the worker): the other order deadlocked on
            # PostgreSQL with a hand-over that began just as the beat did
            params: dict[str, Any] = {"p_task": task_id, "p_worker": worker_id, "p_now": now,
                                      "p_lease": now + timedelta(seconds=lease_s)}
            statement = TASK_BEAT
            if generated is not None:
                statement = TASK_BEAT_PROGRESS
                params.update(p_partial=generated.text, p_tokens=generated.tokens,
                              p_ttft=generated.first_token_s)
            row = prepared(statement, conn).first(conn, params)
        prepared(WORKER_BEAT, conn).execute(conn, {"p_worker": worker_id, "p_now": now})
    if task_id is None:
        return Beat.OK
    if row is None:
        return Beat.LOST
    return Beat.CANCEL if row["cancel_requested"] else Beat.OK


def complete(store: Store, task_id: str, worker_id: str, result: str, now: datetime,
             generated: Generated | None = None) -> bool:
    """Record the result of a run. False (and nothing changes) when the task already ended.

    A result is accepted even if the lease ran out meanwhile: the work is done, and keeping it
    is better than running the task again. Whoever finishes first gives the one final result.
    """
    with store.write() as conn:
        return complete_in(conn, task_id, worker_id, result, now, generated)


def complete_in(conn: Connection, task_id: str, worker_id: str, result: str, now: datetime,
                generated: Generated | None = None, *, worker_row: bool = True) -> bool:
    """``complete`` inside the caller's write transaction. ``worker_row=False``: the caller
    updates the worker's row itself (``mark_worker_done``, or with the next claim)."""
    statement, params = complete_call(task_id, worker_id, result, now, generated)
    done = bool(prepared(statement, conn).execute(conn, params))
    if worker_row:
        _worker_done(conn, worker_id, now, completed=done, failed=False)
    return done


def complete_call(task_id: str, worker_id: str, result: str, now: datetime,
                  generated: Generated | None) -> tuple[Any, dict[str, Any]]:
    """``complete``'s statement and its values; it returns a row when the result was
    stored (the task had not ended elsewhere)."""
    params: dict[str, Any] = {"p_task": task_id, "p_worker": worker_id,
                              "p_result": result, "p_now": now}
    if generated is None:
        return COMPLETE, params
    return COMPLETE_COUNTED, {**params, "p_tokens": generated.tokens,
                              "p_ttft": generated.first_token_s}


def worker_done_params(worker_id: str, now: datetime, *, completed: bool,
                       failed: bool) -> dict[str, Any]:
    """The values of ``WORKER_DONE``: the worker idle, the task counted as it ended."""
    return {"p_worker": worker_id, "p_now": now, "p_completed": int(completed),
            "p_failed": int(failed)}


def mark_worker_done(conn: Connection, worker_id: str, now: datetime, *, completed: bool) -> None:
    """The worker's row after a task: idle, and the task counted when ``completed``."""
    _worker_done(conn, worker_id, now, completed=completed, failed=False)


def fail(
    store: Store,
    task_id: str,
    worker_id: str,
    error: str,
    now: datetime,
    *,
    kind: str = "error",
    retry: bool = False,
    backoff: tuple[float, float] = (2.0, 60.0),
    jitter: float = 1.0,
    generated: Generated | None = None,
) -> TaskSnapshot | None:
    """Record a failed run.

    With ``retry`` (a transient error) and attempts left, the task goes back to ``pending`` and
    is not claimed before ``base * 2**(attempts-1)`` seconds (capped at ``max``), scaled by
    ``jitter`` in [0.5, 1]. Otherwise it ends ``failed``. Returns the task after the change, or
    None when the task was no longer this worker's (nothing changes then).
    """
    base, cap = backoff
    with store.write() as conn:
        current = conn.execute(
            select(T.c.attempts, T.c.max_attempts).where(
                T.c.task_id == task_id, T.c.worker_id == worker_id,
                T.c.status == TaskStatus.IN_PROGRESS.value,
            )
        ).first()
        if current is None:
            _worker_done(conn, worker_id, now, completed=False, failed=False)
            return None
        if retry and current.attempts < current.max_attempts:
            delay = min(cap, base * 2 ** max(current.attempts - 1, 0)) * max(0.5, min(jitter, 1.0))
            values: dict[str, Any] = {
                "status": TaskStatus.PENDING.value,
                "not_before": now + timedelta(seconds=delay),
            }
        else:
            if retry:
                error = f"{error} (gave up after {current.attempts} attempts)"
            values = {"status": TaskStatus.FAILED.value, "finished_at": now}
        if generated is not None:
            values.update(generated.values(), progress_at=now)
        row = conn.execute(
            update(T).where(T.c.task_id == task_id)
            .values(error=error, error_kind=kind, lease_expires_at=None, updated_at=now, **values)
            .returning(*T.c)
        ).one()
        _worker_done(conn, worker_id, now, completed=False, failed=True)
    if row.status == TaskStatus.PENDING.value:
        store.notify_new_work()
    return task_snapshot(row)


def mark_cancelled(store: Store, task_id: str, worker_id: str, now: datetime,
                   generated: Generated | None = None) -> bool:
    """The worker stopped a task whose cancel was requested: record it as ``cancelled``
    (keeping what the model had generated, when given)."""
    kept = {} if generated is None else {**generated.values(), "progress_at": now}
    with store.write() as conn:
        row = conn.execute(
            update(T)
            .where(T.c.task_id == task_id, T.c.status.not_in(FINAL))
            .values(**kept, status=TaskStatus.CANCELLED.value, lease_expires_at=None,
                    error="cancelled while running", error_kind="cancelled",
                    finished_at=now, updated_at=now)
            .returning(T.c.task_id)
        ).first()
        _worker_done(conn, worker_id, now, completed=False, failed=False)
    return row is not None


def release(store: Store, task_id: str, worker_id: str, now: datetime, *,
            retry_after_s: float = 0.0, reason: str | None = None) -> bool:
    """Give a task back unfinished (a worker told to stop now, or a model server too busy to
    take it). The interrupted run is not counted as an attempt; with ``retry_after_s`` the
    task is not claimed again before that many seconds (backpressure)."""
    later = {"not_before": now + timedelta(seconds=retry_after_s)} if retry_after_s > 0 else {}
    noted = {"error": reason, "error_kind": "busy"} if reason else {}
    with store.write() as conn:
        row = conn.execute(
            update(T)
            .where(T.c.task_id == task_id, T.c.worker_id == worker_id,
                   T.c.status == TaskStatus.IN_PROGRESS.value)
            .values(status=TaskStatus.PENDING.value, attempts=T.c.attempts - 1,
                    lease_expires_at=None, updated_at=now, **later, **noted)
            .returning(T.c.task_id)
        ).first()
        _worker_done(conn, worker_id, now, completed=False, failed=False)
    if row is not None:
        store.notify_new_work()
    return row is not None


def cancel(store: Store, task_id: str, now: datetime) -> TaskSnapshot:
    """Cancel a task. Pending: ``cancelled`` at once. Running: its worker is asked to stop
    (it sees the request at its next heartbeat, within about a second) and records
    ``cancelled``. Already cancelled: returned as is. Completed or failed: TaskStateError."""
    with store.write() as conn:
        row = conn.execute(select(T).where(T.c.task_id == task_id)).first()
        if row is None:
            raise TaskNotFound(task_id)
        if row.status == TaskStatus.CANCELLED.value or (
            row.status == TaskStatus.IN_PROGRESS.value and row.cancel_requested
        ):
            return task_snapshot(row)
        if row.status in (TaskStatus.COMPLETED.value, TaskStatus.FAILED.value):
            raise TaskStateError(f"task {task_id} already {row.status}; there is nothing to cancel")
        if row.status == TaskStatus.PENDING.value:
            values: dict[str, Any] = {"status": TaskStatus.CANCELLED.value, "finished_at": now,
                                      "cancel_requested": True, "error": "cancelled before it ran",
                                      "error_kind": "cancelled"}
        else:
            values = {"cancel_requested": True}
        row = conn.execute(
            update(T).where(T.c.task_id == task_id).values(updated_at=now, **values)
            .returning(*T.c)
        ).one()
    return task_snapshot(row)


def expire_waiting(store: Store, now: datetime, max_wait_s: float) -> list[str]:
    """Fail the pending tasks that waited longer than ``max_wait_s`` without a run ending
    (the wait for a model slot has its own bound, longer than any time limit)."""
    cutoff = now - timedelta(seconds=max_wait_s)
    with store.write() as conn:
        rows = conn.execute(
            update(T).where(T.c.status == TaskStatus.PENDING.value, T.c.created_at < cutoff)
            .values(status=TaskStatus.FAILED.value, finished_at=now, updated_at=now,
                    error_kind="wait_timeout",
                    error=f"waited more than {max_wait_s:g} s for a model slot without "
                          "finishing; add model-server capacity or raise KOUBOU_MAX_WAIT")
            .returning(T.c.task_id)
        ).all()
    return [r.task_id for r in rows]


@dataclass(frozen=True)
class Recovered:
    task_id: str
    status: str


def requeue_expired(store: Store, now: datetime) -> list[Recovered]:
    """Give back tasks whose lease ran out (their worker died without saying so).

    Each goes back to ``pending``, or to ``failed`` ("worker lost") once its attempts are used
    up, or to ``cancelled`` when a cancel was pending.
    """
    return _recover(store, and_(T.c.status == TaskStatus.IN_PROGRESS.value,
                                T.c.lease_expires_at < now), now, "lease expired")


def requeue_worker(store: Store, worker_id: str, now: datetime, reason: str) -> list[Recovered]:
    """Give back at once every task held by a worker known to be dead, and mark it offline."""
    recovered = _recover(store, and_(T.c.status == TaskStatus.IN_PROGRESS.value,
                                     T.c.worker_id == worker_id), now, reason)
    mark_worker_offline(store, worker_id, now)
    return recovered


def _recover(store: Store, where: ColumnElement[bool], now: datetime,
             reason: str) -> list[Recovered]:
    out: list[Recovered] = []
    with store.write() as conn:
        base = update(T).where(where)
        common = {"lease_expires_at": None, "updated_at": now}
        for row in conn.execute(
            base.where(T.c.cancel_requested.is_(True))
            .values(status=TaskStatus.CANCELLED.value, finished_at=now,
                    error=f"cancelled ({reason})", error_kind="cancelled", **common)
            .returning(T.c.task_id, T.c.status)
        ):
            out.append(Recovered(row.task_id, row.status))
        for row in conn.execute(
            base.where(T.c.attempts >= T.c.max_attempts)
            .values(status=TaskStatus.FAILED.value, finished_at=now, error_kind="worker_lost",
                    error=f"worker lost ({reason}) on the last of its attempts", **common)
            .returning(T.c.task_id, T.c.status)
        ):
            out.append(Recovered(row.task_id, row.status))
        for row in conn.execute(
            base.values(status=TaskStatus.PENDING.value, error_kind="worker_lost",
                        error=f"worker lost ({reason}); retrying", **common)
            .returning(T.c.task_id, T.c.status)
        ):
            out.append(Recovered(row.task_id, row.status))
        if out:
            conn.execute(
                update(W).where(W.c.current_task.in_([r.task_id for r in out]))
                .values(current_task=None)
            )
    if pending := sum(1 for r in out if r.status == TaskStatus.PENDING.value):
        store.notify_new_work(pending)  # one idle worker per task given back
    return out


def _worker_done(conn: Connection, worker_id: str, now: datetime, *, completed: bool,
                 failed: bool) -> None:
    prepared(WORKER_DONE, conn).execute(
        conn, worker_done_params(worker_id, now, completed=completed, failed=failed))

