"""The errors the queue's operations raise: no such task, or a task in the wrong state (bad
input is ``koubou_mcp.request.InvalidTask``)."""

from __future__ import annotations


class TaskNotFound(LookupError):
    def __init__(self, task_id: str) -> None:
        super().__init__(f"no task with id {task_id!r}; list_tasks / `koubou-mcp tasks` shows ids")
        self.task_id = task_id


class TaskStateError(ValueError):
    """The task exists but is in a state that does not allow the operation."""

