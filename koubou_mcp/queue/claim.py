"""Claiming the best ready task, together with a slot of its model server."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Connection

from koubou_mcp.admission import Capacity
from koubou_mcp.models import TaskSnapshot
from koubou_mcp.queue.prepared import prepared
from koubou_mcp.queue.records import task_snapshot
from koubou_mcp.queue.servers import lock_server
from koubou_mcp.queue.statements import (
    IN_FLIGHT,
    LOOK_BEFORE_CLAIM,
    WORKER_BUSY,
    WORKER_BUSY_COUNTED,
    WORKER_DONE,
    admit_statement_pg,
    claim_statement,
    handover_admit_pg,
)
from koubou_mcp.store import Store


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
    # A look first: when nothing is ready (most wake-ups of most workers), or every slot of
    # the model server is taken (a worker woken beside ones that hold them all), no write
    # lock (nor, on PostgreSQL, the server row's lock the claims queue for) is taken at all.
    # One statement, outside any transaction on PostgreSQL (one round trip, not five). The
    # claim below re-checks, so a race only costs an empty claim.
    with store.read() as conn:
        look = prepared(LOOK_BEFORE_CLAIM, conn).first_on_its_own(
            conn, {"p_now": now, "p_url": model_url})
    if look is None or not look["ready"]:
        return None
    limit = look["slot_limit"]  # None: a new server, whose row the claim makes
    if model_url is not None and limit is not None and int(look["in_flight"]) >= int(limit):
        return None
    with store.write() as conn:
        return admit_in(conn, store.is_postgres, worker_id, now, lease_s, model_url)


def admit_in(conn: Connection, postgres: bool, worker_id: str, now: datetime, lease_s: float,
             model_url: str | None, *, capacity: Capacity | None = None,
             completed: int = 0, idle_if_none: bool = False) -> Admitted | None:
    """``admit_next``'s claim inside the caller's write transaction; ``capacity``: the
    server's row as this transaction already locked (and maybe changed) it; ``completed``:
    tasks to count on the worker's row with the claim (the hand-over's, one statement for
    both). ``idle_if_none``: when no task is admitted, the worker's row is marked idle,
    counting ``completed`` (on PostgreSQL by the claim's own statement)."""
    admitted = _admit(conn, postgres, worker_id, now, lease_s, model_url, capacity,
                      completed, idle_if_none)
    if admitted is None and idle_if_none and not (postgres and model_url is not None):
        prepared(WORKER_DONE, conn).execute(conn, {"p_worker": worker_id, "p_now": now,
                                                   "p_completed": completed, "p_failed": 0})
    return admitted


def _admit(conn: Connection, postgres: bool, worker_id: str, now: datetime, lease_s: float,
           model_url: str | None, capacity: Capacity | None, completed: int,
           idle_if_none: bool) -> Admitted | None:
    params = {"p_worker": worker_id, "p_now": now, "p_url": model_url,
              "p_lease": now + timedelta(seconds=lease_s)}
    in_flight = 0
    if model_url is None:
        capacity = None
    else:
        if capacity is None:
            capacity = lock_server(conn, model_url, now, postgres)
        if postgres:  # one round trip under the server's lock instead of three
            statement = handover_admit_pg() if idle_if_none else admit_statement_pg()
            row = prepared(statement, conn).first(
                conn, {**params, "p_completed": completed, "p_failed": 0})
            if row is None:
                return None
            in_flight = int(row.pop("in_flight"))
            del row["workers_marked"]
            row.pop("workers_idled", None)
            return Admitted(task_snapshot(row), in_flight + 1, capacity)
        in_flight = int(prepared(IN_FLIGHT, conn).scalar(conn, {"p_url": model_url,
                                                                  "p_now": now}))
        if in_flight >= capacity.limit:
            return None
    row = prepared(claim_statement(postgres), conn).first(conn, params)
    if row is None:
        return None
    busy = {"p_worker": worker_id, "p_task": row["task_id"], "p_now": now}
    if completed:
        prepared(WORKER_BUSY_COUNTED, conn).execute(conn, {**busy, "p_completed": completed})
    else:
        prepared(WORKER_BUSY, conn).execute(conn, busy)
    return Admitted(task_snapshot(row), in_flight + 1 if model_url is not None else None, capacity)

