"""Claiming the best ready task, together with a slot of its model server."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from sqlalchemy import Connection

from koubou_mcp.admission import Capacity
from koubou_mcp.models import TaskSnapshot
from koubou_mcp.queue.message import transaction
from koubou_mcp.queue.prepared import prepared
from koubou_mcp.queue.records import capacity_of, task_snapshot
from koubou_mcp.queue.servers import lock_server
from koubou_mcp.queue.statements import (
    IN_FLIGHT,
    LOOK_BEFORE_CLAIM,
    SERVER_ROW_LOCKED,
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
               model_url: str | None, *, woken: bool = False) -> Admitted | None:
    """Claim the best ready task together with a slot of ``model_url``, in one transaction.

    A slot is an in-progress task bound to the server whose lease has not run out, so a worker
    that dies frees its slot when its lease does, like the task itself. The task is claimed
    only while fewer tasks hold a slot than the server's limit (``model_servers``): a request
    is never sent to wait inside the model server. Without ``model_url`` there is no limit.
    ``woken``: a wake-up said that new work is there (on PostgreSQL the claim goes ahead
    without the look first).
    """
    postgres = store.is_postgres
    if not (postgres and woken and model_url is not None):
        # A look first: when nothing is ready (most wake-ups of most workers), or every slot
        # of the model server is taken (a worker woken beside ones that hold them all), no
        # write lock (nor, on PostgreSQL, the server row's lock the claims queue for) is
        # taken at all. One statement, outside any transaction on PostgreSQL (one round
        # trip, not five). The claim below re-checks, so a race only costs an empty claim.
        with store.read() as conn:
            look = prepared(LOOK_BEFORE_CLAIM, conn).first_on_its_own(
                conn, {"p_now": now, "p_url": model_url})
        if look is None or not look_finds_work([look], model_url):
            return None
    with store.write() as conn:
        if postgres and model_url is not None:
            admitted = _admit_in_one_message(conn, worker_id, now, lease_s, model_url)
            if admitted is not False:
                return admitted
        return admit_in(conn, postgres, worker_id, now, lease_s, model_url)


def look_finds_work(look: list[dict[str, Any]], model_url: str | None) -> bool:
    """Whether ``LOOK_BEFORE_CLAIM``'s row shows a ready task and, with ``model_url``, a free
    slot (a server without a row yet has one: its claim makes the row)."""
    if not look or not look[0]["ready"]:
        return False
    limit = look[0]["slot_limit"]
    return model_url is None or limit is None or int(look[0]["in_flight"]) < int(limit)


def _admit_in_one_message(conn: Connection, worker_id: str, now: datetime, lease_s: float,
                          model_url: str) -> Admitted | None | Literal[False]:
    """PostgreSQL: ``admit_in``'s lock of the server's row and its admission, with the
    transaction's ``BEGIN`` and ``COMMIT``, as one message: one round trip instead of four,
    and the row's lock held only while the server runs the admission (``queue.message``).
    False: the server has no row yet (nothing was claimed; ``admit_in`` makes it)."""
    with transaction(conn) as tx:
        server, claimed = tx.send([
            (prepared(SERVER_ROW_LOCKED, conn), {"p_url": model_url}),
            (prepared(admit_statement_pg(), conn),
             admission_params(worker_id, now, lease_s, model_url)),
        ], commit=True)
    if not server:
        return False
    return admitted_from(claimed[0], capacity_of(server[0])) if claimed else None


def admission_params(worker_id: str, now: datetime, lease_s: float, model_url: str | None,
                     completed: int = 0) -> dict[str, Any]:
    """The values of an admission (``admit_statement_pg``, ``handover_admit_pg``)."""
    return {"p_worker": worker_id, "p_now": now, "p_url": model_url,
            "p_lease": now + timedelta(seconds=lease_s), "p_completed": completed,
            "p_failed": 0}


def admitted_from(row: dict[str, Any], capacity: Capacity) -> Admitted:
    """What a PostgreSQL admission statement's row says: the task, and its slot."""
    row = dict(row)
    in_flight = int(row.pop("in_flight"))
    row.pop("workers_marked")
    row.pop("workers_idled", None)
    return Admitted(task_snapshot(row), in_flight + 1, capacity)


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
                conn, admission_params(worker_id, now, lease_s, model_url, completed))
            return None if row is None else admitted_from(row, capacity)
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

