"""The task vocabulary is defined once (``models``); the literal types the tools' schemas are
built from, and the CLI's choices, must name exactly the same values."""

from __future__ import annotations

from typing import get_args

from koubou_mcp.models import FINAL_STATUSES, TaskStatus, TaskType
from koubou_mcp.request import TASK_TYPES
from koubou_mcp.results import StatusName, TaskTypeName


def test_the_schema_literals_name_exactly_the_enum_values() -> None:
    assert set(get_args(TaskTypeName)) == {t.value for t in TaskType}
    assert set(get_args(StatusName)) == {s.value for s in TaskStatus}


def test_the_accepted_task_types_are_the_enum_s() -> None:
    assert TASK_TYPES == tuple(t.value for t in TaskType)


def test_only_pending_and_in_progress_tasks_can_still_change() -> None:
    assert set(TaskStatus) - FINAL_STATUSES == {TaskStatus.PENDING, TaskStatus.IN_PROGRESS}
