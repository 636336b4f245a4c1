"""Reading and filling the queue the way tests and benchmarks do."""

from __future__ import annotations

from datetime import datetime

from koubou_mcp import queue
from koubou_mcp.config import Settings
from koubou_mcp.models import FINAL_STATUSES, utcnow
from koubou_mcp.store import Store


def ended(store: Store, task_id: str) -> queue.TaskSnapshot | None:
    """The task if it is final (completed, failed or cancelled), else None: a ``wait_until``
    predicate that returns what the test then inspects."""
    task = queue.get_task(store, task_id)
    return task if task.status in FINAL_STATUSES else None


def submit(store: Store, settings: Settings, n: int = 1, now: datetime | None = None,
           **fields: object) -> list[queue.TaskSnapshot]:
    """Enqueue ``n`` valid tasks ("task 0", "task 1", ...) at ``now`` (default: the clock)."""
    at = now or utcnow()
    return [queue.enqueue(store, queue.validate_request(settings, f"task {i}", **fields),
                          settings, at).task for i in range(n)]
