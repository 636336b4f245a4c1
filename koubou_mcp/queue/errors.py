"""The errors the queue's operations raise for bad input or a task in the wrong state."""

from __future__ import annotations


class InvalidTask(ValueError):
    """Input a task cannot be made from. The message says what is wrong and what is accepted."""


class TaskNotFound(LookupError):
    def __init__(self, task_id: str) -> None:
        super().__init__(f"no task with id {task_id!r}; list_tasks / `koubou-mcp tasks` shows ids")
        self.task_id = task_id


class TaskStateError(ValueError):
    """The task exists but is in a state that does not allow the operation."""

