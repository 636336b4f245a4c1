"""Rows turned into the records callers see (and back, for the model servers' table)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from koubou_mcp.admission import Capacity
from koubou_mcp.models import TaskSnapshot, WorkerSnapshot


def task_snapshot(row: Any) -> TaskSnapshot:
    """A task from a SQLAlchemy row or, from the prepared hot path, a column mapping."""
    return TaskSnapshot(**(row if isinstance(row, dict) else row._mapping))


def capacity_of(row: Any) -> Capacity:
    """A model server's state from a SQLAlchemy row or a column mapping."""
    m = row if isinstance(row, dict) else row._mapping
    return Capacity(url=m["url"], limit=m["slot_limit"], pinned=bool(m["pinned"]),
                    good=m["good"], ceiling=m["ceiling"], ceiling_at=m["ceiling_at"],
                    baseline_ttft_s=m["baseline_ttft_s"], baseline_tps=m["baseline_tps"],
                    last_ttft_s=m["last_ttft_s"], last_tps=m["last_tps"],
                    busy_events=m["busy_events"])


def capacity_values(cap: Capacity, now: datetime) -> dict[str, Any]:
    return {"slot_limit": cap.limit, "pinned": cap.pinned, "good": cap.good,
            "ceiling": cap.ceiling, "ceiling_at": cap.ceiling_at,
            "baseline_ttft_s": cap.baseline_ttft_s, "baseline_tps": cap.baseline_tps,
            "last_ttft_s": cap.last_ttft_s, "last_tps": cap.last_tps,
            "busy_events": cap.busy_events, "updated_at": now}


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
        "last_heartbeat": iso(worker.last_heartbeat),
        "created_at": iso(worker.created_at),
    }


def iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat(timespec="milliseconds") + "Z"

