"""A worker's hand-over from one task to the next: the result, what was learned of the model
server, and the claim of the next task, in one write transaction.

Each write transaction on SQLite takes the database's one write lock and ends in a commit; a
worker draining a queue would otherwise pay for three per task (complete, observe, claim).
The guarantees are those of the parts (``complete``, ``observe_model_server``,
``admit_next``): the claim sees the slot this task just gave back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection

from koubou_mcp.admission import Observation, next_capacity
from koubou_mcp.queue.claim import (
    Admitted,
    admission_params,
    admit_in,
    admitted_from,
    look_finds_work,
)
from koubou_mcp.queue.lifecycle import (
    Generated,
    complete_call,
    complete_in,
    mark_worker_done,
    worker_done_params,
)
from koubou_mcp.queue.message import Call, transaction
from koubou_mcp.queue.prepared import prepared
from koubou_mcp.queue.records import capacity_of
from koubou_mcp.queue.servers import (
    lock_server_row,
    server_update_params,
    worth_writing,
    write_server,
)
from koubou_mcp.queue.statements import (
    LOOK_BEFORE_CLAIM,
    SERVER_ROW_LOCKED,
    SERVER_UPDATE,
    WORKER_DONE,
    handover_admit_pg,
)
from koubou_mcp.store import Store


@dataclass(frozen=True)
class NextClaim:
    """What the worker asks for after its task: a claim like ``admit_next``'s."""

    lease_s: float
    model_url: str | None


@dataclass(frozen=True)
class HandedOver:
    #: the result was stored (False: the task had already ended elsewhere)
    accepted: bool
    #: the next task, when one was ready and the model server had a slot for it
    next: Admitted | None
    #: no next task, and a look after the commit saw none ready with a free slot (PostgreSQL):
    #: the worker can wait for a wake-up without looking again, as any task enqueued after
    #: that look finds it idle and wakes it
    nothing_ready: bool = False


def complete_and_admit(store: Store, task_id: str, worker_id: str, result: str, now: datetime,
                       generated: Generated | None, *,
                       observations: Sequence[Observation] = (), max_limit: int = 1,
                       model_url: str | None = None,
                       claim: NextClaim | None = None) -> HandedOver:
    """Complete ``task_id``, apply ``observations`` of ``model_url`` and, with ``claim``,
    claim the next task, all in one transaction."""
    with store.write() as conn:
        done = None
        if store.is_postgres and model_url is not None and (
                claim is None or claim.model_url == model_url):
            done = _in_two_messages(conn, task_id, worker_id, result, now, generated,
                                    observations, max_limit, model_url, claim)
        if done is None:
            done = _in_statements(conn, store.is_postgres, task_id, worker_id, result, now,
                                  generated, observations, max_limit, model_url, claim)
    handed, raised = done
    if raised:
        store.notify_new_work()  # a worker waiting for a slot can take the new one
    return handed


def _in_statements(conn: Connection, postgres: bool, task_id: str, worker_id: str,
                   result: str, now: datetime, generated: Generated | None,
                   observations: Sequence[Observation], max_limit: int, model_url: str | None,
                   claim: NextClaim | None) -> tuple[HandedOver, bool]:
    """The hand-over one statement at a time (SQLite, and the rarer shapes on PostgreSQL);
    also whether the server's limit was raised."""
    raised = False
    admitted = None
    # the worker's row is written once: busy with the next task, or idle, counting this one
    accepted = complete_in(conn, task_id, worker_id, result, now, generated, worker_row=False)
    known = None
    if model_url is not None and observations:
        before, written_at = lock_server_row(conn, model_url, now, postgres)
        known = before
        for observation in observations:
            known = next_capacity(known, observation, now, max_limit)
        if worth_writing(before, known, written_at, now):
            write_server(conn, known, now)
        raised = known.limit > before.limit
    if claim is not None:
        admitted = admit_in(conn, postgres, worker_id, now, claim.lease_s, claim.model_url,
                            capacity=known if claim.model_url == model_url else None,
                            completed=int(accepted), idle_if_none=True)
    else:
        mark_worker_done(conn, worker_id, now, completed=accepted)
    return HandedOver(accepted, admitted), raised


def _in_two_messages(conn: Connection, task_id: str, worker_id: str, result: str,
                     now: datetime, generated: Generated | None,
                     observations: Sequence[Observation], max_limit: int, model_url: str,
                     claim: NextClaim | None) -> tuple[HandedOver, bool] | None:
    """PostgreSQL: the same transaction in two round trips instead of five
    (``queue.message``): ``BEGIN``, the completion and the server's row, locked; then what
    was learned of the server, the next claim (or the worker idle) and ``COMMIT``. The row
    stays locked across one round trip, not two. None when the server has no row yet (the
    caller runs ``_in_statements``, which makes it)."""
    complete, params = complete_call(task_id, worker_id, result, now, generated)
    with transaction(conn) as tx:
        done, server = tx.send([(prepared(complete, conn), params),
                                (prepared(SERVER_ROW_LOCKED, conn), {"p_url": model_url})])
        if not server:
            tx.rollback()
            return None
        accepted = bool(done)
        before = known = capacity_of(server[0])
        for observation in observations:
            known = next_capacity(known, observation, now, max_limit)
        calls: list[Call] = []
        if worth_writing(before, known, server[0]["updated_at"], now):
            calls.append((prepared(SERVER_UPDATE, conn), server_update_params(known, now)))
        if claim is None:
            calls.append((prepared(WORKER_DONE, conn),
                          worker_done_params(worker_id, now, completed=accepted, failed=False)))
        else:
            calls.append((prepared(handover_admit_pg(), conn),
                          admission_params(worker_id, now, claim.lease_s, model_url,
                                           int(accepted))))
        then: list[Call] = []
        if claim is not None:
            then.append((prepared(LOOK_BEFORE_CLAIM, conn), {"p_now": now, "p_url": model_url}))
        results = tx.send(calls, commit=True, then=then)
    admitted = None
    nothing_ready = False
    if claim is not None:
        claimed, look = results[-2], results[-1]
        admitted = admitted_from(claimed[0], known) if claimed else None
        nothing_ready = admitted is None and not look_finds_work(look, model_url)
    return HandedOver(accepted, admitted, nothing_ready), known.limit > before.limit
