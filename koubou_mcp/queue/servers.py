"""Model servers: their slot limits (pinned or learned) and the slots in use."""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, select

from koubou_mcp.admission import Capacity, Observation, next_capacity
from koubou_mcp.queue.prepared import prepared
from koubou_mcp.queue.records import capacity_of, capacity_values
from koubou_mcp.queue.statements import (
    IN_FLIGHT,
    READY_COUNT,
    SERVER_INSERT_PG,
    SERVER_ROW,
    SERVER_ROW_LOCKED,
    SERVER_UPDATE,
    M,
)
from koubou_mcp.store import Store

#: a hand-over writes a server's latest measurements (``last_ttft_s``, ``last_tps``, shown by
#: health, ``top`` and the metrics) at most this often when nothing it learns changes, s
MEASUREMENTS_EVERY_S = 1.0


def lock_server(conn: Connection, url: str, now: datetime, postgres: bool) -> Capacity:
    """The server's row, locked for this transaction (made at one slot when new).

    On PostgreSQL the row lock serialises admissions to one server (SQLite's write lock does
    that already), so two workers never both take the last slot.
    """
    return lock_server_row(conn, url, now, postgres)[0]


def lock_server_row(conn: Connection, url: str, now: datetime,
                    postgres: bool) -> tuple[Capacity, datetime | None]:
    """``lock_server``, and when the row was last written (None: it is new)."""
    query = prepared(SERVER_ROW_LOCKED if postgres else SERVER_ROW, conn)
    row = query.first(conn, {"p_url": url})
    if row is None:
        cap = Capacity(url=url)
        if postgres:
            conn.execute(SERVER_INSERT_PG, {"url": url, "now": now})
            row = query.first(conn, {"p_url": url})
            return (capacity_of(row), row["updated_at"]) if row is not None else (cap, None)
        conn.execute(M.insert().values(url=url, **capacity_values(cap, now)))
        return cap, None
    return capacity_of(row), row["updated_at"]


def worth_writing(before: Capacity, after: Capacity, written_at: datetime | None,
                  now: datetime) -> bool:
    """Whether ``after`` must be stored now: anything the admission learned (the limit, the
    baselines, the ceiling, busy events) at once; the latest measurements alone once
    ``MEASUREMENTS_EVERY_S`` has passed since the row was written.

    A worker's hand-over holds the server's row (PostgreSQL's row lock, SQLite's write lock)
    while it writes it, and every other admission to that server waits: a write per task of
    two numbers only shown to people made it one statement longer for all of them."""
    if after == before:
        return False
    if replace(after, last_ttft_s=before.last_ttft_s, last_tps=before.last_tps) != before:
        return True
    return written_at is None or (now - written_at).total_seconds() >= MEASUREMENTS_EVERY_S


def write_server(conn: Connection, cap: Capacity, now: datetime) -> None:
    """Store what is known of a server (its row is locked by ``lock_server``)."""
    prepared(SERVER_UPDATE, conn).execute(conn, server_update_params(cap, now))


def server_update_params(cap: Capacity, now: datetime) -> dict[str, Any]:
    """The values of ``SERVER_UPDATE``: what is known of the server, replaced whole."""
    return {"p_url": cap.url,
            **{f"v_{name}": value for name, value in capacity_values(cap, now).items()}}


def configure_model_server(store: Store, url: str, pinned_limit: int | None,
                           now: datetime) -> Capacity:
    """Pin the server's slot limit (``KOUBOU_OLLAMA_PARALLEL``), or unpin a pinned one so that
    it is learned again (from one slot). Called by each worker as it starts."""
    with store.write() as conn:
        cap = lock_server(conn, url, now, store.is_postgres)
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
        write_server(conn, new, now)
    store.notify_new_work()
    return new


def observe_model_server(store: Store, url: str, observation: Observation, now: datetime,
                         max_limit: int) -> Capacity:
    """Apply one request's measurements to what is known of the server (``admission``)."""
    with store.write() as conn:
        before, after = observe_in(conn, store.is_postgres, url, observation, now, max_limit)
    if after.limit > before.limit:
        store.notify_new_work()  # a worker waiting for a slot can take the new one
    return after


def observe_in(conn: Connection, postgres: bool, url: str, observation: Observation,
               now: datetime, max_limit: int) -> tuple[Capacity, Capacity]:
    """``observe_model_server`` inside the caller's write transaction: (before, after); the
    caller wakes workers when the limit went up."""
    before = lock_server(conn, url, now, postgres)
    after = next_capacity(before, observation, now, max_limit)
    if after != before:
        write_server(conn, after, now)
    return before, after


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
        ready = int(conn.execute(READY_COUNT, {"p_now": now}).scalar_one())
        return [ServerUse(capacity_of(r), int(conn.execute(
            IN_FLIGHT, {"p_url": r.url, "p_now": now}).scalar_one()), ready) for r in rows]


def model_server(store: Store, url: str, now: datetime) -> ServerUse | None:
    """One model server's use, or None when no worker has used it yet."""
    for use in model_servers(store, now):
        if use.capacity.url == url:
            return use
    return None


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)

