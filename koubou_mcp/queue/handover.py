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

from koubou_mcp.admission import Observation, next_capacity
from koubou_mcp.queue.claim import Admitted, admit_in
from koubou_mcp.queue.lifecycle import Generated, complete_in, mark_worker_done
from koubou_mcp.queue.servers import lock_server_row, worth_writing, write_server
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


def complete_and_admit(store: Store, task_id: str, worker_id: str, result: str, now: datetime,
                       generated: Generated | None, *,
                       observations: Sequence[Observation] = (), max_limit: int = 1,
                       model_url: str | None = None,
                       claim: NextClaim | None = None) -> HandedOver:
    """Complete ``task_id``, apply ``observations`` of ``model_url`` and, with ``claim``,
    claim the next task, all in one transaction."""
    raised = False
    admitted = None
    with store.write() as conn:
        # the worker's row is written once: busy with the next task, or idle, counting this one
        accepted = complete_in(conn, task_id, worker_id, result, now, generated,
                               worker_row=False)
        known = None
        if model_url is not None and observations:
            before, written_at = lock_server_row(conn, model_url, now, store.is_postgres)
            known = before
            for observation in observations:
                known = next_capacity(known, observation, now, max_limit)
            if worth_writing(before, known, written_at, now):
                write_server(conn, known, now)
            raised = known.limit > before.limit
        if claim is not None:
            admitted = admit_in(conn, store.is_postgres, worker_id, now, claim.lease_s,
                                claim.model_url,
                                capacity=known if claim.model_url == model_url else None,
                                completed=int(accepted), idle_if_none=True)
        else:
            mark_worker_done(conn, worker_id, now, completed=accepted)
    if raised:
        store.notify_new_work()  # a worker waiting for a slot can take the new one
    return HandedOver(accepted, admitted)
