"""A worker's hand-over from one task to the next: the result, what was learned of the model
server, and the claim of the next task, in one write transaction.

Each write transaction on SQLite takes the database's one write lock and ends in a commit; a
worker draining a queue would otherwise pay for three per task (complete, observe, claim).
The guarantees are those of the parts (``complete``, ``observe_model_server``,
``admit_next``): the claim sees the slot this task just gave back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

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
    observe_model_server,
    server_update_params,
    worth_writing,
    write_server,
)
from koubou_mcp.queue.statements import (
    LOOK_BEFORE_CLAIM,
    SERVER_ROW,
    SERVER_ROW_LOCKED,
    SERVER_UPDATE_IF_UNCHANGED,
    SLOT_HELD_UNTIL,
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
    if done.raised:
        store.notify_new_work()  # a worker waiting for a slot can take the new one
    if not done.unapplied or model_url is None:
        return done.handed
    # learned from a row that changed before it could be written: learn from the row as it is
    # now, one observation a transaction (each notifies when it raises the limit)
    known = None
    for observation in done.unapplied:
        known = observe_model_server(store, model_url, observation, now, max_limit)
    nxt = done.handed.next
    if nxt is not None and known is not None:
        return replace(done.handed, next=replace(nxt, capacity=known))
    return done.handed


def _in_statements(conn: Connection, postgres: bool, task_id: str, worker_id: str,
                   result: str, now: datetime, generated: Generated | None,
                   observations: Sequence[Observation], max_limit: int, model_url: str | None,
                   claim: NextClaim | None) -> _Recorded:
    """The hand-over one statement at a time (SQLite, and the rarer shapes on PostgreSQL)."""
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
    return _Recorded(HandedOver(accepted, admitted), raised)


def _in_two_messages(conn: Connection, task_id: str, worker_id: str, result: str,
                     now: datetime, generated: Generated | None,
                     observations: Sequence[Observation], max_limit: int, model_url: str,
                     claim: NextClaim | None) -> _Recorded | None:
    """PostgreSQL: the same transaction in two round trips instead of five
    (``queue.message``): ``BEGIN``, the completion and the server's row, read without a lock;
    then what was learned of the server, written only if no one wrote the row since it was
    read, the next claim (or the worker idle) and ``COMMIT``.

    The server's row is never locked across a round trip: a worker descheduled between its
    two messages (more workers than cores) held every other admission to that server behind
    it. Nor, mostly, at all: a worker that claims its next task on the server whose slot it
    holds keeps that slot (``_keeps_slot``), and only a claim that takes a slot takes the
    row's lock, which admissions take turns on (held until the commit's WAL flush, that
    serialised every hand-over of a pool on one server). When the row did change in between
    (a rare race: another hand-over's write), the observations are left to the caller to
    apply after the commit (``unapplied``). None when the server has no row yet (the caller
    runs ``_in_statements``, which makes it)."""
    complete, params = complete_call(task_id, worker_id, result, now, generated)
    first: list[Call] = [(prepared(complete, conn), params),
                         (prepared(SERVER_ROW, conn), {"p_url": model_url})]
    if claim is not None:  # read before the completion ends the task's hold on its slot
        first.insert(0, (prepared(SLOT_HELD_UNTIL, conn),
                         {"p_task": task_id, "p_worker": worker_id, "p_url": model_url}))
    with transaction(conn) as tx:
        *held, done, server = tx.send(first)
        if not server:
            tx.rollback()
            return None
        accepted = bool(done)
        before = known = capacity_of(server[0])
        for observation in observations:
            known = next_capacity(known, observation, now, max_limit)
        calls: list[Call] = []
        if claim is not None and not (accepted and _keeps_slot(held[0], claim, now)):
            # a new admission: admissions to the server take turns on its row's lock
            calls.append((prepared(SERVER_ROW_LOCKED, conn), {"p_url": model_url}))
        written = None
        if worth_writing(before, known, server[0]["updated_at"], now):
            written = len(calls)
            calls.append((prepared(SERVER_UPDATE_IF_UNCHANGED, conn),
                          {**server_update_params(known, now),
                           "p_seen": server[0]["updated_at"]}))
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
    unapplied = written is not None and not results[written]
    admitted = None
    nothing_ready = False
    if claim is not None:
        claimed, look = results[len(calls) - 1], results[-1]
        admitted = admitted_from(claimed[0], known) if claimed else None
        nothing_ready = admitted is None and not look_finds_work(look, model_url)
    return _Recorded(HandedOver(accepted, admitted, nothing_ready),
                     raised=not unapplied and known.limit > before.limit,
                     unapplied=observations if unapplied else ())


def _keeps_slot(held: list[dict[str, Any]], claim: NextClaim, now: datetime) -> bool:
    """Whether the hand-over can claim its next task into the slot its task held, without
    the server's row lock. Every other admission counts that slot as taken until this
    transaction commits, and at its commit one task replaces the other: the slots in use
    stay as they were, whatever admissions run meanwhile, so none can overfill the server.
    The claim still needs fewer slots in use than the limit (``handover_admit_pg``), which
    gives the slot up when the limit went down. Only while the lease has half its length
    to run: an expiring lease stops counting as a slot (``IN_FLIGHT``) by others' clocks."""
    if not held:
        return False  # the task is not this worker's slot any more (ended, or taken back)
    until = held[0]["lease_expires_at"]
    return until is not None and until >= now + timedelta(seconds=claim.lease_s / 2)


@dataclass(frozen=True)
class _Recorded:
    """What a hand-over's transaction did, for ``complete_and_admit`` to finish after it."""

    handed: HandedOver
    #: the server's limit was raised
    raised: bool
    #: observations not written: the server's row changed between the two messages
    unapplied: Sequence[Observation] = ()
