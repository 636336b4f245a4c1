"""Every operation on tasks and workers, each one short transaction, each with its SQL here.

Callers pass ``now`` (naive UTC): the queue never reads the clock, so leases, backoff and
expiry are tested by handing it a fake time. Guarantees:

* ``claim_next`` is one atomic ``UPDATE … RETURNING`` (with ``FOR UPDATE SKIP LOCKED`` on
  PostgreSQL): a task is held by one worker at a time, highest priority first, then oldest.
* A claimed task carries a lease that the worker renews with ``heartbeat``. A lease that ran out
  means the worker is gone: ``requeue_expired`` gives the task back (at-least-once).
* Transient failures are retried with exponential backoff and jitter up to the task's
  ``max_attempts``; permanent ones and timeouts fail at once.
"""

from __future__ import annotations

import functools
import math
import secrets
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    Connection,
    DateTime,
    Float,
    Integer,
    String,
    Text,
    and_,
    bindparam,
    func,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.sql.elements import ColumnElement

from koubou_mcp.admission import Capacity, Observation, next_capacity
from koubou_mcp.config import PRIORITY_MAX, PRIORITY_MIN, TASK_TYPES, Settings
from koubou_mcp.models import (
    FINAL_STATUSES,
    ModelServer,
    Task,
    TaskSnapshot,
    TaskStatus,
    Worker,
    WorkerSnapshot,
    WorkerStatus,
)
from koubou_mcp.store import Store

T = Task.__table__  # type: ignore[attr-defined]
W = Worker.__table__  # type: ignore[attr-defined]
M = ModelServer.__table__  # type: ignore[attr-defined]

MAX_IDEMPOTENCY_KEY = 200


class InvalidTask(ValueError):
    """Input a task cannot be made from. The message says what is wrong and what is accepted."""


class TaskNotFound(LookupError):
    def __init__(self, task_id: str) -> None:
        super().__init__(f"no task with id {task_id!r}; list_tasks / `koubou-mcp tasks` shows ids")
        self.task_id = task_id


class TaskStateError(ValueError):
    """The task exists but is in a state that does not allow the operation."""


def new_task_id(now: datetime) -> str:
    return f"task_{now:%Y%m%d_%H%M%S}_{secrets.token_hex(4)}"


def new_worker_id(now: datetime) -> str:
    return f"worker_{now:%Y%m%d_%H%M%S}_{secrets.token_hex(2)}"


# -- enqueue ------------------------------------------------------------------------------

@dataclass(frozen=True)
class TaskRequest:
    """A validated request for a new task."""

    prompt: str
    type: str
    priority: int
    timeout_s: float
    idempotency_key: str | None


def validate_request(
    settings: Settings,
    prompt: Any,
    type: Any = "general",
    priority: Any = 5,
    timeout_s: Any = None,
    idempotency_key: Any = None,
) -> TaskRequest:
    """Check every field of a new task; raise InvalidTask naming the first bad one."""
    if not isinstance(prompt, str):
        raise InvalidTask(f"prompt must be a string, got {_type_name(prompt)}")
    if not prompt.strip():
        raise InvalidTask("prompt must not be empty or only whitespace")
    if len(prompt) > settings.max_prompt_chars:
        raise InvalidTask(
            f"prompt is {len(prompt)} characters; the limit is {settings.max_prompt_chars} "
            "(KOUBOU_MAX_PROMPT_CHARS). Split the work or send a file path instead."
        )
    if "\x00" in prompt:
        raise InvalidTask("prompt contains a NUL character (\\x00); remove it")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidTask("prompt is not valid Unicode text (lone surrogate characters)") from None
    if not isinstance(type, str) or type not in TASK_TYPES:
        raise InvalidTask(f"type must be one of {', '.join(TASK_TYPES)}, got {type!r}")
    if isinstance(priority, bool) or not isinstance(priority, int):
        if isinstance(priority, float) and priority.is_integer():
            priority = int(priority)
        else:
            raise InvalidTask(
                f"priority must be an integer from {PRIORITY_MIN} to {PRIORITY_MAX}, got {priority!r}"
            )
    if not PRIORITY_MIN <= priority <= PRIORITY_MAX:
        raise InvalidTask(
            f"priority must be from {PRIORITY_MIN} (lowest) to {PRIORITY_MAX} (highest), got {priority}"
        )
    if timeout_s is None:
        timeout = settings.timeout_for(type)
    else:
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, int | float):
            raise InvalidTask(f"timeout_s must be a number of seconds, got {_type_name(timeout_s)}")
        timeout = float(timeout_s)
        if not math.isfinite(timeout) or timeout <= 0 or timeout > settings.max_timeout_s:
            raise InvalidTask(
                f"timeout_s must be more than 0 and at most {settings.max_timeout_s:g} "
                f"(KOUBOU_MAX_TIMEOUT), got {timeout_s!r}"
            )
    key = idempotency_key
    if key is not None:
        if not isinstance(key, str) or not key.strip() or len(key) > MAX_IDEMPOTENCY_KEY:
            raise InvalidTask(
                f"idempotency_key must be a non-empty string of at most {MAX_IDEMPOTENCY_KEY} "
                f"characters, got {_short(key)}"
            )
        if "\x00" in key or not key.isprintable():
            raise InvalidTask("idempotency_key must be printable text")
    return TaskRequest(prompt, type, priority, timeout, key)


_INSERT = T.insert().returning(*T.c)  # built once; the values travel as parameters


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
    with store.write() as conn:
        if request.idempotency_key is not None:
            if store.is_postgres:
                conn.execute(text("SELECT pg_advisory_xact_lock(hashtext(:k))"),
                             {"k": request.idempotency_key})
            existing = conn.execute(
                select(T).where(
                    T.c.idempotency_key == request.idempotency_key,
                    T.c.status.not_in([s.value for s in FINAL_STATUSES]),
                ).order_by(T.c.created_at.desc()).limit(1)
            ).first()
            if existing is not None:
                return Enqueued(_task(existing), created=False)
        values = {
            "task_id": new_task_id(now),
            "type": request.type,
            "prompt": request.prompt,
            "status": TaskStatus.PENDING.value,
            "priority": request.priority,
            "attempts": 0,
            "max_attempts": settings.max_attempts,
            "timeout_s": request.timeout_s,
            "cancel_requested": False,
            "idempotency_key": request.idempotency_key,
            "created_at": now,
            "updated_at": now,
        }
        row = conn.execute(_INSERT, values).one()
        notified = store.notify_within(conn)
    if not notified:
        store.notify_new_work()
    return Enqueued(_task(row), created=True)


# -- claiming and running -----------------------------------------------------------------

# The hot path's statements are built once, with bound parameters: building and cache-keying
# a SQLAlchemy statement on every call cost more CPU than running it (see docs/benchmarks.md).
_NOW = bindparam("p_now", type_=DateTime())
_LEASE = bindparam("p_lease", type_=DateTime())
_WORKER = bindparam("p_worker", type_=String())
_TASK = bindparam("p_task", type_=String())

_READY = and_(T.c.status == TaskStatus.PENDING.value,
              or_(T.c.not_before.is_(None), T.c.not_before <= _NOW))
_ANY_READY = select(T.c.task_id).where(_READY).limit(1)


@functools.cache
def _claim_statement(postgres: bool) -> Any:
    candidate = (
        select(T.c.task_id).where(_READY)
        .order_by(T.c.priority.desc(), T.c.created_at, T.c.task_id)
        .limit(1)
    )
    if postgres:
        candidate = candidate.with_for_update(skip_locked=True)
    return (
        update(T)
        .where(T.c.task_id == candidate.scalar_subquery(), T.c.status == TaskStatus.PENDING.value)
        .values(status=TaskStatus.IN_PROGRESS.value, worker_id=_WORKER,
                attempts=T.c.attempts + 1, lease_expires_at=_LEASE, started_at=_NOW,
                finished_at=None, updated_at=_NOW, model_url=bindparam("p_url", type_=String()),
                partial_result=None, tokens=None, first_token_s=None, progress_at=None)
        .returning(*T.c)
    )


# slots of a model server in use: tasks bound to it, in progress, whose lease still runs
_IN_FLIGHT = select(func.count()).select_from(T).where(
    T.c.status == TaskStatus.IN_PROGRESS.value,
    T.c.model_url == bindparam("p_url", type_=String()),
    T.c.lease_expires_at >= _NOW,
)
_WORKER_BUSY = update(W).where(W.c.worker_id == _WORKER).values(
    status=WorkerStatus.BUSY.value, current_task=_TASK, last_heartbeat=_NOW, idle_since=None)
_WORKER_BEAT = update(W).where(W.c.worker_id == _WORKER).values(last_heartbeat=_NOW)
_TASK_BEAT = (
    update(T)
    .where(T.c.task_id == _TASK, T.c.worker_id == _WORKER,
           T.c.status == TaskStatus.IN_PROGRESS.value)
    .values(lease_expires_at=_LEASE)
    .returning(T.c.cancel_requested)
)
_TASK_BEAT_PROGRESS = _TASK_BEAT.values(
    partial_result=bindparam("p_partial", type_=Text()),
    tokens=bindparam("p_tokens", type_=Integer()),
    first_token_s=bindparam("p_ttft", type_=Float()),
    progress_at=_NOW,
)
_COMPLETE = (
    update(T)
    .where(T.c.task_id == _TASK, T.c.status.not_in([s.value for s in FINAL_STATUSES]))
    .values(status=TaskStatus.COMPLETED.value, result=bindparam("p_result", type_=Text()),
            error=None, error_kind=None, worker_id=_WORKER, lease_expires_at=None,
            finished_at=_NOW, updated_at=_NOW, partial_result=None)
    .returning(T.c.task_id)
)
_COMPLETE_COUNTED = _COMPLETE.values(tokens=bindparam("p_tokens", type_=Integer()),
                                     first_token_s=bindparam("p_ttft", type_=Float()))
_WORKER_DONE = update(W).where(W.c.worker_id == _WORKER).values(
    status=WorkerStatus.IDLE.value, current_task=None, idle_since=_NOW, last_heartbeat=_NOW,
    tasks_completed=W.c.tasks_completed + bindparam("p_completed", type_=Integer()),
    tasks_failed=W.c.tasks_failed + bindparam("p_failed", type_=Integer()),
)


def claim_next(store: Store, worker_id: str, now: datetime, lease_s: float,
               model_url: str | None = None) -> TaskSnapshot | None:
    """Atomically take the best ready task for ``worker_id``, or None when there is none.

    Best = highest priority, then oldest. Tasks waiting out a retry backoff are not ready.
    The task's attempts go up by one and it gets a lease of ``lease_s`` seconds. With
    ``model_url``, the task is only taken while that model server has a free slot (see
    ``admit_next``).
    """
    admitted = admit_next(store, worker_id, now, lease_s, model_url)
    return None if admitted is None else admitted.task


@dataclass(frozen=True)
class Admitted:
    """A claimed task and the slot it holds."""

    task: TaskSnapshot
    #: requests in flight on the model server with this one (None without admission)
    concurrency: int | None = None
    capacity: Capacity | None = None


def admit_next(store: Store, worker_id: str, now: datetime, lease_s: float,
               model_url: str | None) -> Admitted | None:
    """Claim the best ready task together with a slot of ``model_url``, in one transaction.

    A slot is an in-progress task bound to the server whose lease has not run out, so a worker
    that dies frees its slot when its lease does, like the task itself. The task is claimed
    only while fewer tasks hold a slot than the server's limit (``model_servers``): a request
    is never sent to wait inside the model server. Without ``model_url`` there is no limit.
    """
    # A plain read first: when nothing is ready (most wake-ups of most workers) no write lock
    # is taken at all. The claim below re-checks, so a race only costs an empty claim.
    with store.read() as conn:
        if conn.execute(_ANY_READY, {"p_now": now}).first() is None:
            return None
    params = {"p_worker": worker_id, "p_now": now, "p_url": model_url,
              "p_lease": now + timedelta(seconds=lease_s)}
    with store.write() as conn:
        capacity = None
        in_flight = 0
        if model_url is not None:
            capacity = _lock_server(conn, model_url, now, store.is_postgres)
            in_flight = int(conn.execute(_IN_FLIGHT, {"p_url": model_url, "p_now": now})
                            .scalar_one())
            if in_flight >= capacity.limit:
                return None
        row = conn.execute(_claim_statement(store.is_postgres), params).first()
        if row is None:
            return None
        conn.execute(_WORKER_BUSY, {"p_worker": worker_id, "p_task": row.task_id, "p_now": now})
    return Admitted(_task(row), in_flight + 1 if model_url is not None else None, capacity)


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
        conn.execute(_WORKER_BEAT, {"p_worker": worker_id, "p_now": now})
        if task_id is None:
            return Beat.OK
        params: dict[str, Any] = {"p_task": task_id, "p_worker": worker_id, "p_now": now,
                                  "p_lease": now + timedelta(seconds=lease_s)}
        statement = _TASK_BEAT
        if generated is not None:
            statement = _TASK_BEAT_PROGRESS
            params.update(p_partial=generated.text, p_tokens=generated.tokens,
                          p_ttft=generated.first_token_s)
        row = conn.execute(statement, params).first()
    if row is None:
        return Beat.LOST
    return Beat.CANCEL if row.cancel_requested else Beat.OK


def complete(store: Store, task_id: str, worker_id: str, result: str, now: datetime,
             generated: Generated | None = None) -> bool:
    """Record the result of a run. False (and nothing changes) when the task already ended.

    A result is accepted even if the lease ran out meanwhile: the work is done, and keeping it
    is better than running the task again. Whoever finishes first gives the one final result.
    """
    with store.write() as conn:
        params: dict[str, Any] = {"p_task": task_id, "p_worker": worker_id,
                                  "p_result": result, "p_now": now}
        statement = _COMPLETE
        if generated is not None:
            statement = _COMPLETE_COUNTED
            params.update(p_tokens=generated.tokens, p_ttft=generated.first_token_s)
        row = conn.execute(statement, params).first()
        _worker_done(conn, worker_id, now, completed=row is not None, failed=False)
    return row is not None


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
    return _task(row)


def mark_cancelled(store: Store, task_id: str, worker_id: str, now: datetime,
                   generated: Generated | None = None) -> bool:
    """The worker stopped a task whose cancel was requested: record it as ``cancelled``
    (keeping what the model had generated, when given)."""
    kept = {} if generated is None else {**generated.values(), "progress_at": now}
    with store.write() as conn:
        row = conn.execute(
            update(T)
            .where(T.c.task_id == task_id, T.c.status.not_in(_final()))
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
            return _task(row)
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
    return _task(row)


# -- recovery -----------------------------------------------------------------------------

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
    if any(r.status == TaskStatus.PENDING.value for r in out):
        store.notify_new_work()
    return out


# -- workers ------------------------------------------------------------------------------

def register_worker(store: Store, worker_id: str, pid: int, now: datetime,
                    host: str | None = None) -> None:
    """Add (or revive) the ``workers`` row of a starting worker."""
    host = host or socket.gethostname()
    with store.write() as conn:
        updated = conn.execute(
            update(W).where(W.c.worker_id == worker_id).values(
                status=WorkerStatus.STARTING.value, pid=pid, host=host, last_heartbeat=now,
                current_task=None, idle_since=None, stopped_at=None,
            )
        ).rowcount
        if not updated:
            conn.execute(W.insert().values(
                worker_id=worker_id, status=WorkerStatus.STARTING.value, pid=pid, host=host,
                tasks_completed=0, tasks_failed=0, last_heartbeat=now, created_at=now,
            ))


def set_worker_status(store: Store, worker_id: str, status: WorkerStatus, now: datetime) -> None:
    values: dict[str, Any] = {"status": status.value, "last_heartbeat": now}
    if status == WorkerStatus.IDLE:
        values.update(idle_since=now, current_task=None)
    with store.write() as conn:
        conn.execute(
            update(W).where(W.c.worker_id == worker_id,
                            W.c.status != WorkerStatus.OFFLINE.value).values(**values)
        )


def mark_worker_offline(store: Store, worker_id: str, now: datetime) -> None:
    with store.write() as conn:
        conn.execute(
            update(W).where(W.c.worker_id == worker_id).values(
                status=WorkerStatus.OFFLINE.value, current_task=None, stopped_at=now,
                idle_since=None,
            )
        )


def _worker_done(conn: Connection, worker_id: str, now: datetime, *, completed: bool,
                 failed: bool) -> None:
    conn.execute(_WORKER_DONE, {"p_worker": worker_id, "p_now": now,
                                "p_completed": int(completed), "p_failed": int(failed)})


# -- model servers (admission) --------------------------------------------------------------

def _capacity(row: Any) -> Capacity:
    return Capacity(url=row.url, limit=row.slot_limit, pinned=bool(row.pinned), good=row.good,
                    ceiling=row.ceiling, ceiling_at=row.ceiling_at,
                    baseline_ttft_s=row.baseline_ttft_s, baseline_tps=row.baseline_tps,
                    last_ttft_s=row.last_ttft_s, last_tps=row.last_tps,
                    busy_events=row.busy_events)


def _capacity_values(cap: Capacity, now: datetime) -> dict[str, Any]:
    return {"slot_limit": cap.limit, "pinned": cap.pinned, "good": cap.good,
            "ceiling": cap.ceiling, "ceiling_at": cap.ceiling_at,
            "baseline_ttft_s": cap.baseline_ttft_s, "baseline_tps": cap.baseline_tps,
            "last_ttft_s": cap.last_ttft_s, "last_tps": cap.last_tps,
            "busy_events": cap.busy_events, "updated_at": now}


def _lock_server(conn: Connection, url: str, now: datetime, postgres: bool) -> Capacity:
    """The server's row, locked for this transaction (made at one slot when new).

    On PostgreSQL the row lock serialises admissions to one server (SQLite's write lock does
    that already), so two workers never both take the last slot.
    """
    query = select(M).where(M.c.url == url)
    if postgres:
        query = query.with_for_update()
    row = conn.execute(query).first()
    if row is None:
        cap = Capacity(url=url)
        if postgres:
            conn.execute(text(
                "INSERT INTO model_servers (url, slot_limit, pinned, good, busy_events, "
                "updated_at) VALUES (:url, 1, false, 0, 0, :now) ON CONFLICT (url) DO NOTHING"
            ), {"url": url, "now": now})
            row = conn.execute(query).first()
            return _capacity(row) if row is not None else cap
        conn.execute(M.insert().values(url=url, **_capacity_values(cap, now)))
        return cap
    return _capacity(row)


def configure_model_server(store: Store, url: str, pinned_limit: int | None,
                           now: datetime) -> Capacity:
    """Pin the server's slot limit (``KOUBOU_OLLAMA_PARALLEL``), or unpin a pinned one so that
    it is learned again (from one slot). Called by each worker as it starts."""
    with store.write() as conn:
        cap = _lock_server(conn, url, now, store.is_postgres)
        if pinned_limit is not None:
            new = Capacity(url=url, limit=pinned_limit, pinned=True,
                           baseline_ttft_s=cap.baseline_ttft_s, baseline_tps=cap.baseline_tps,
                           last_ttft_s=cap.last_ttft_s, last_tps=cap.last_tps,
                           busy_events=cap.busy_events)
        elif cap.pinned:
            new = Capacity(url=url, baseline_ttft_s=cap.baseline_ttft_s,
                           baseline_tps=cap.baseline_tps, busy_events=cap.busy_events)
        else:
            return cap
        conn.execute(update(M).where(M.c.url == url).values(**_capacity_values(new, now)))
    store.notify_new_work()
    return new


def observe_model_server(store: Store, url: str, observation: Observation, now: datetime,
                         max_limit: int) -> Capacity:
    """Apply one request's measurements to what is known of the server (``admission``)."""
    with store.write() as conn:
        before = _lock_server(conn, url, now, store.is_postgres)
        after = next_capacity(before, observation, now, max_limit)
        if after != before:
            conn.execute(update(M).where(M.c.url == url).values(**_capacity_values(after, now)))
    if after.limit > before.limit:
        store.notify_new_work()  # a worker waiting for a slot can take the new one
    return after


@dataclass(frozen=True)
class ServerUse:
    """A model server as health, stats, metrics and `top` show it."""

    capacity: Capacity
    in_use: int
    #: ready pending tasks: they wait for a slot when ``in_use`` has reached the limit
    waiting: int

    def as_dict(self) -> dict[str, Any]:
        cap = self.capacity
        return {"url": cap.url, "slots_in_use": self.in_use, "slot_limit": cap.limit,
                "limit_source": "pinned (KOUBOU_OLLAMA_PARALLEL)" if cap.pinned else "learned",
                "waiting": self.waiting, "good": cap.good, "ceiling": cap.ceiling,
                "first_token_s": _round(cap.last_ttft_s),
                "baseline_first_token_s": _round(cap.baseline_ttft_s),
                "tokens_per_s": _round(cap.last_tps), "busy_events": cap.busy_events}


def model_servers(store: Store, now: datetime) -> list[ServerUse]:
    """Every model server the pool has used, with its slots in use."""
    with store.read() as conn:
        rows = conn.execute(select(M).order_by(M.c.url)).all()
        ready = int(conn.execute(
            select(func.count()).select_from(T).where(_READY), {"p_now": now}).scalar_one())
        return [ServerUse(_capacity(r), int(conn.execute(
            _IN_FLIGHT, {"p_url": r.url, "p_now": now}).scalar_one()), ready) for r in rows]


def model_server(store: Store, url: str, now: datetime) -> ServerUse | None:
    """One model server's use, or None when no worker has used it yet."""
    for use in model_servers(store, now):
        if use.capacity.url == url:
            return use
    return None


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


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


# -- reading ------------------------------------------------------------------------------

def get_task(store: Store, task_id: str) -> TaskSnapshot:
    """The task with ``task_id``; TaskNotFound when there is none."""
    with store.read() as conn:
        row = conn.execute(select(T).where(T.c.task_id == task_id)).first()
    if row is None:
        raise TaskNotFound(task_id)
    return _task(row)


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


def list_tasks(store: Store, status: str | None = None, limit: int = 20) -> list[TaskSnapshot]:
    """Tasks, newest first, optionally of one status."""
    query = select(T).order_by(T.c.created_at.desc(), T.c.task_id.desc()).limit(limit)
    if status is not None:
        query = query.where(T.c.status == status)
    with store.read() as conn:
        return [_task(row) for row in conn.execute(query)]


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
        return int(conn.execute(
            select(func.count()).select_from(T)
            .where(T.c.status == TaskStatus.PENDING.value, _ready(now))
        ).scalar_one())


def list_workers(store: Store, include_offline: bool = False) -> list[WorkerSnapshot]:
    query = select(W).order_by(W.c.created_at)
    if not include_offline:
        query = query.where(W.c.status != WorkerStatus.OFFLINE.value)
    with store.read() as conn:
        return [WorkerSnapshot(**row._mapping) for row in conn.execute(query)]


def running_tasks(store: Store) -> list[TaskSnapshot]:
    """Tasks in progress (for the supervisor's overdue check)."""
    with store.read() as conn:
        return [_task(r) for r in conn.execute(
            select(T).where(T.c.status == TaskStatus.IN_PROGRESS.value))]



# -- the live view (`koubou-mcp top`) -----------------------------------------------------

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
        return [_task(row) for row in conn.execute(query)]

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
    completed tasks."""
    counts = counts_by_status(store)
    workers = list_workers(store)
    with store.read() as conn:
        rows = conn.execute(
            select(T.c.created_at, T.c.started_at, T.c.finished_at)
            .where(T.c.status == TaskStatus.COMPLETED.value)
            .order_by(T.c.finished_at.desc()).limit(1000)
        ).all()
    runs = [(r.finished_at - r.started_at).total_seconds() for r in rows
            if r.started_at and r.finished_at]
    waits = [(r.started_at - r.created_at).total_seconds() for r in rows if r.started_at]
    return Stats(counts, workers,
                 sum(runs) / len(runs) if runs else None,
                 sum(waits) / len(waits) if waits else None)


# -- metrics support ----------------------------------------------------------------------

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
             .where(T.c.status.in_(_final()), T.c.finished_at.is_not(None)))
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


# -- records ------------------------------------------------------------------------------

def worker_record(worker: WorkerSnapshot) -> dict[str, Any]:
    done = worker.tasks_completed + worker.tasks_failed
    return {
        "worker_id": worker.worker_id,
        "status": worker.status,
        "current_task": worker.current_task,
        "tasks_completed": worker.tasks_completed,
        "tasks_failed": worker.tasks_failed,
        "success_rate": round(100.0 * worker.tasks_completed / done, 1) if done else None,
        "host": worker.host,
        "pid": worker.pid,
        "last_heartbeat": _iso(worker.last_heartbeat),
        "created_at": _iso(worker.created_at),
    }


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat(timespec="milliseconds") + "Z"


def _task(row: Any) -> TaskSnapshot:
    return TaskSnapshot(**row._mapping)


def _ready(now: datetime) -> ColumnElement[bool]:
    return or_(T.c.not_before.is_(None), T.c.not_before <= now)


def _final() -> Sequence[str]:
    return [s.value for s in FINAL_STATUSES]


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _short(value: Any) -> str:
    text_ = repr(value)
    return text_ if len(text_) <= 60 else text_[:57] + "..."


# -- supervisor support -------------------------------------------------------------------

def get_worker(store: Store, worker_id: str) -> WorkerSnapshot | None:
    """The ``workers`` row of ``worker_id`` (any status), or None when it never registered."""
    with store.read() as conn:
        row = conn.execute(select(W).where(W.c.worker_id == worker_id)).first()
    return None if row is None else WorkerSnapshot(**row._mapping)


def mark_silent_workers_offline(store: Store, now: datetime, silent_s: float,
                                keep: Sequence[str] = ()) -> list[str]:
    """Mark offline the rows of workers that have not heartbeaten for ``silent_s`` seconds
    (they died without saying so, possibly on another machine), except those in ``keep``.

    Their tasks are not touched: leases expire on their own and ``requeue_expired`` gives them
    back. A worker marked offline by mistake becomes busy/idle again at its next task.
    Returns the ids marked.
    """
    where = and_(W.c.status != WorkerStatus.OFFLINE.value,
                 W.c.last_heartbeat < now - timedelta(seconds=silent_s))
    if keep:
        where = and_(where, W.c.worker_id.not_in(list(keep)))
    with store.write() as conn:
        rows = conn.execute(
            update(W).where(where).values(status=WorkerStatus.OFFLINE.value, current_task=None,
                                          idle_since=None, stopped_at=now)
            .returning(W.c.worker_id)
        ).all()
    return [row.worker_id for row in rows]


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
