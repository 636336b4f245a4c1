"""The ``workers`` rows: registering, status changes, and marking silent workers offline."""

from __future__ import annotations

import secrets
import socket
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, select, update

from koubou_mcp.models import WorkerSnapshot, WorkerStatus
from koubou_mcp.queue.statements import W
from koubou_mcp.store import Store


def new_worker_id(now: datetime) -> str:
    return f"worker_{now:%Y%m%d_%H%M%S}_{secrets.token_hex(2)}"


def register_worker(store: Store, worker_id: str, pid: int, now: datetime,
                    host: str | None = None) -> None:
    """Add (or revive) the ``workers`` row of a starting worker."""
    host = host or socket.gethostname()
    with store.write() as conn:
        updated = conn.execute(
            update(W).where(W.c.worker_id == worker_id).values(
                status=WorkerStatus.STARTING.value, pid=pid, host=host, last_heartbeat=now,
                current_task=None, idle_since=None, stopped_at=None, woken_at=None,
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


def list_workers(store: Store, include_offline: bool = False) -> list[WorkerSnapshot]:
    query = select(W).order_by(W.c.created_at)
    if not include_offline:
        query = query.where(W.c.status != WorkerStatus.OFFLINE.value)
    with store.read() as conn:
        return [WorkerSnapshot(**row._mapping) for row in conn.execute(query)]

