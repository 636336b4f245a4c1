"""The queue's SQL, named in one place.

The hot path's statements are built once, with bound parameters (``p_*``): building and
cache-keying a SQLAlchemy statement on every call cost more CPU than running it (see
docs/benchmarks.md). The operations in the sibling modules pass values. The few statements
that depend on the call (a where-clause the caller chooses, a list of ids) are built beside
their one user, from the tables and conditions named here.
"""

from __future__ import annotations

import functools
from typing import Any

from sqlalchemy import (
    DateTime,
    Float,
    Integer,
    String,
    Text,
    and_,
    bindparam,
    exists,
    func,
    or_,
    select,
    text,
    update,
)

from koubou_mcp.models import FINAL_STATUSES, ModelServer, Task, TaskStatus, Worker, WorkerStatus

T = Task.__table__  # type: ignore[attr-defined]
W = Worker.__table__  # type: ignore[attr-defined]
M = ModelServer.__table__  # type: ignore[attr-defined]

#: the statuses a task never leaves, as stored
FINAL = [s.value for s in FINAL_STATUSES]

NOW = bindparam("p_now", type_=DateTime())
LEASE = bindparam("p_lease", type_=DateTime())
WORKER = bindparam("p_worker", type_=String())
TASK = bindparam("p_task", type_=String())
URL = bindparam("p_url", type_=String())

#: a pending task not waiting out a retry backoff at ``p_now``
READY = and_(T.c.status == TaskStatus.PENDING.value,
             or_(T.c.not_before.is_(None), T.c.not_before <= NOW))
ANY_READY = select(T.c.task_id).where(READY).limit(1)
READY_COUNT = select(func.count()).select_from(T).where(READY)
#: when the first pending task now waiting out a retry backoff at ``p_now`` becomes ready
#: (NULL when none waits)
NEXT_NOT_BEFORE = select(func.min(T.c.not_before)).where(
    T.c.status == TaskStatus.PENDING.value, T.c.not_before > NOW)


# -- enqueue ------------------------------------------------------------------------------

INSERT_TASK = T.insert().returning(*T.c)  # the values travel as parameters
#: the newest unfinished task with an idempotency key (``p_key``)
UNFINISHED_WITH_KEY = (
    select(T)
    .where(T.c.idempotency_key == bindparam("p_key", type_=String()), T.c.status.not_in(FINAL))
    .order_by(T.c.created_at.desc())
    .limit(1)
)
#: serialises enqueues that carry the same idempotency key (PostgreSQL; SQLite's write lock
#: does that already)
IDEMPOTENCY_LOCK = text("SELECT pg_advisory_xact_lock(hashtext(:k))")


# -- claim --------------------------------------------------------------------------------

@functools.cache
def claim_statement(postgres: bool) -> Any:
    """One ``UPDATE … RETURNING``: the best ready task (highest priority, then oldest) becomes
    ``p_worker``'s, with a lease until ``p_lease`` (``SKIP LOCKED`` on PostgreSQL)."""
    return _claim(postgres)


def _claim(postgres: bool) -> Any:
    """``claim_statement``, built anew: a statement derived from one that has been compiled
    can keep the columns it returned before (SQLAlchemy memoizes them), so each statement
    built on this one starts from a fresh copy."""
    candidate = (
        select(T.c.task_id).where(READY)
        .order_by(T.c.priority.desc(), T.c.created_at, T.c.task_id)
        .limit(1)
    )
    if postgres:
        candidate = candidate.with_for_update(skip_locked=True)
    return (
        update(T)
        .where(T.c.task_id == candidate.scalar_subquery(), T.c.status == TaskStatus.PENDING.value)
        .values(status=TaskStatus.IN_PROGRESS.value, worker_id=WORKER,
                attempts=T.c.attempts + 1, lease_expires_at=LEASE, started_at=NOW,
                finished_at=None, updated_at=NOW, model_url=URL,
                partial_result=None, tokens=None, first_token_s=None, progress_at=None)
        .returning(*T.c)
    )


#: slots of a model server in use: tasks bound to it, in progress, whose lease still runs
IN_FLIGHT = select(func.count()).select_from(T).where(
    T.c.status == TaskStatus.IN_PROGRESS.value,
    T.c.model_url == URL,
    T.c.lease_expires_at >= NOW,
)
#: until when ``p_worker`` holds a slot of ``p_url`` with task ``p_task``: its lease, while
#: the task is in progress as that worker's on that server (no row: it holds none)
SLOT_HELD_UNTIL = select(T.c.lease_expires_at).where(
    T.c.task_id == TASK, T.c.worker_id == WORKER, T.c.model_url == URL,
    T.c.status == TaskStatus.IN_PROGRESS.value)
#: what a worker looks at before it claims (no lock taken): whether a task is ready, and
#: the slots of ``p_url`` in use and its limit (NULL: no row for that server yet)
LOOK_BEFORE_CLAIM = select(
    exists(ANY_READY).label("ready"),
    IN_FLIGHT.scalar_subquery().label("in_flight"),
    select(M.c.slot_limit).where(M.c.url == URL).scalar_subquery().label("slot_limit"),
)


def _worker_busy() -> Any:
    # woken_at cleared: it marks a worker woken since it last took a task (wake-ups pass such
    # a worker over, it is about to claim)
    return update(W).where(W.c.worker_id == WORKER).values(
        status=WorkerStatus.BUSY.value, current_task=TASK, last_heartbeat=NOW, idle_since=None,
        woken_at=None)


def _worker_busy_counted() -> Any:
    return _worker_busy().values(
        tasks_completed=W.c.tasks_completed + bindparam("p_completed", type_=Integer()))


WORKER_BUSY = _worker_busy()
#: ``WORKER_BUSY`` that also counts the task the worker just completed (the hand-over)
WORKER_BUSY_COUNTED = _worker_busy_counted()


@functools.cache
def admit_statement_pg() -> Any:
    """PostgreSQL: the claim, its slot check and the worker's row in one statement.

    While a worker admits a task it holds its model server's row lock (``lock_server``), and
    every other worker's admission to that server waits for it; as separate statements the
    slot count, the claim and the worker's row were three round trips under the lock. Here
    the claim's ``UPDATE`` takes the best ready task only while fewer tasks hold a slot
    (``IN_FLIGHT``) than the server's ``slot_limit``, both read in the statement's snapshot,
    which is taken after the lock: it sees every admission committed before, and the limit
    as this transaction left it. It returns the count as ``in_flight``, and a second
    ``UPDATE`` in the same statement marks ``p_worker`` busy with that task, counting
    ``p_completed`` (``WORKER_BUSY_COUNTED``). No row: no task was admitted, and the worker's
    row is unchanged.
    """
    claimed = _admission()
    return select(claimed, _count(_busy_with(claimed)).label("workers_marked"))


@functools.cache
def handover_admit_pg() -> Any:
    """``admit_statement_pg`` for a hand-over: when no task is admitted, the same statement
    marks ``p_worker`` idle instead, counting ``p_completed`` and ``p_failed``
    (``WORKER_DONE``), so the whole admission is one statement whatever it finds
    (one round trip fewer under the server's row lock, which the claim holds). PostgreSQL runs
    every data-changing ``WITH`` part to the end whether or not the rows it returns are read;
    of the two ``UPDATE``s of the worker's row exactly one matches."""
    claimed = _admission()
    idle = (_worker_done().where(~exists(select(claimed.c.task_id)))
            .returning(W.c.worker_id).cte("idle"))
    return select(claimed, _count(_busy_with(claimed)).label("workers_marked"),
                  _count(idle).label("workers_idled"))


def _admission() -> Any:
    in_flight = IN_FLIGHT.scalar_subquery()
    limit = select(M.c.slot_limit).where(M.c.url == URL).scalar_subquery()
    return (_claim(True)
            .where(in_flight < limit)
            .returning(in_flight.label("in_flight"))
            .cte("claimed"))


def _busy_with(claimed: Any) -> Any:
    return (_worker_busy_counted().values(current_task=claimed.c.task_id)
            .returning(W.c.worker_id).cte("busy"))


def _count(cte: Any) -> Any:
    return select(func.count()).select_from(cte).scalar_subquery()


#: a model server's row (locked for the transaction on PostgreSQL: ``SERVER_ROW_LOCKED``)
SERVER_ROW = select(M).where(M.c.url == URL)
SERVER_ROW_LOCKED = SERVER_ROW.with_for_update()
def _server_values() -> dict[str, Any]:
    return {name: bindparam(f"v_{name}", type_=M.c[name].type)
            for name in ("slot_limit", "pinned", "good", "ceiling", "ceiling_at",
                         "baseline_ttft_s", "baseline_tps", "last_ttft_s", "last_tps",
                         "busy_events", "updated_at")}


#: what is known of a model server, replaced whole (``records.capacity_values`` names the
#: values; built once like the other hot-path statements)
SERVER_UPDATE = update(M).where(M.c.url == URL).values(_server_values())
#: ``SERVER_UPDATE`` only while the row is as it was read (``p_seen``: its ``updated_at``),
#: returning its url: a hand-over reads the row unlocked and writes what it learned from it
#: only if no one wrote it since (``queue.handover``; every write sets ``updated_at``)
SERVER_UPDATE_IF_UNCHANGED = update(M).where(
    M.c.url == URL, M.c.updated_at == bindparam("p_seen", type_=M.c.updated_at.type)
).values(_server_values()).returning(M.c.url)
#: a new model server's row at one slot; another worker may insert it first
SERVER_INSERT_PG = text(
    "INSERT INTO model_servers (url, slot_limit, pinned, good, busy_events, "
    "updated_at) VALUES (:url, 1, false, 0, 0, :now) ON CONFLICT (url) DO NOTHING"
)


# -- heartbeat and the end of a run ---------------------------------------------------------

WORKER_BEAT = update(W).where(W.c.worker_id == WORKER).values(last_heartbeat=NOW)
TASK_BEAT = (
    update(T)
    .where(T.c.task_id == TASK, T.c.worker_id == WORKER,
           T.c.status == TaskStatus.IN_PROGRESS.value)
    .values(lease_expires_at=LEASE)
    .returning(T.c.cancel_requested)
)
TASK_BEAT_PROGRESS = TASK_BEAT.values(
    partial_result=bindparam("p_partial", type_=Text()),
    tokens=bindparam("p_tokens", type_=Integer()),
    first_token_s=bindparam("p_ttft", type_=Float()),
    progress_at=NOW,
)
COMPLETE = (
    update(T)
    .where(T.c.task_id == TASK, T.c.status.not_in(FINAL))
    .values(status=TaskStatus.COMPLETED.value, result=bindparam("p_result", type_=Text()),
            error=None, error_kind=None, worker_id=WORKER, lease_expires_at=None,
            finished_at=NOW, updated_at=NOW, partial_result=None)
    .returning(T.c.task_id)
)
COMPLETE_COUNTED = COMPLETE.values(tokens=bindparam("p_tokens", type_=Integer()),
                                   first_token_s=bindparam("p_ttft", type_=Float()))


def _worker_done() -> Any:
    return update(W).where(W.c.worker_id == WORKER).values(
        status=WorkerStatus.IDLE.value, current_task=None, idle_since=NOW, last_heartbeat=NOW,
        tasks_completed=W.c.tasks_completed + bindparam("p_completed", type_=Integer()),
        tasks_failed=W.c.tasks_failed + bindparam("p_failed", type_=Integer()),
    )


WORKER_DONE = _worker_done()


#: PostgreSQL: whether the server vacuums tables by itself (``health.check_vacuum``)
AUTOVACUUM = text("SHOW autovacuum")
