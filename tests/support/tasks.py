"""Reading the queue the way tests and benchmarks do."""

from __future__ import annotations

from koubou_mcp import queue
from koubou_mcp.models import FINAL_STATUSES
from koubou_mcp.store import Store


def ended(store: Store, task_id: str) -> queue.TaskSnapshot | None:
    """The task if it is final (completed, failed or cancelled), else None: a ``wait_until``
    predicate that returns what the test then inspects."""
    task = queue.get_task(store, task_id)
    return task if task.status in FINAL_STATUSES else None
