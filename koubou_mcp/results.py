"""The records the service hands out, the same over every transport: a task's record
(MCP's get_status, REST's ``/task/{id}/status``, the CLI's ``status --json``), what a submit,
a wait and a listing answer. Pydantic models, so that the MCP tools' output schemas are built
from them; plain data otherwise (no I/O).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from koubou_mcp.backends import structured
from koubou_mcp.models import FINAL_STATUSES, TaskSnapshot, TaskStatus, elapsed_s, utcnow

#: The longest prompt a listing shows, characters
PREVIEW_CHARS = 80

#: the task types and statuses as the schemas name them (tests/unit/test_vocabulary.py
#: checks that they are exactly ``models.TaskType``'s and ``models.TaskStatus``'s values)
TaskTypeName = Literal["general", "code"]
StatusName = Literal["pending", "in_progress", "completed", "failed", "cancelled"]


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat(timespec="milliseconds") + "Z"


def phase_of(task: TaskSnapshot, now: datetime | None = None) -> str:
    """Where a task stands, finer than its status: a pending task may wait for a worker, out
    a retry backoff, or for a slot of a model server that was full (HTTP 503)."""
    if task.status == TaskStatus.PENDING:
        if task.error_kind == "busy":
            return "waiting_for_model"
        if task.not_before is not None and task.not_before > (now or utcnow()):
            return "retry_backoff"
        return "queued"
    if task.status == TaskStatus.IN_PROGRESS:
        return "generating" if task.tokens else "waiting_for_first_token"
    return str(task.status)


class TaskRecord(BaseModel):
    """The record of one task, as every transport shows it: MCP's get_status, REST's
    ``/task/{id}/status`` and the CLI's ``status --json``. Timestamps are ISO 8601 UTC with a
    ``Z``; the prompt only when asked for (it can be long)."""

    model_config = ConfigDict(extra="allow")

    task_id: str
    type: TaskTypeName
    status: StatusName
    priority: int
    result: str | None
    error: str | None
    error_kind: str | None
    attempts: int
    max_attempts: int
    timeout_s: float
    worker_id: str | None
    cancel_requested: bool
    idempotency_key: str | None
    created_at: str | None
    updated_at: str | None
    started_at: str | None
    finished_at: str | None
    duration_s: float | None = Field(description="run time of the finished task, s")
    phase: str = Field(description="where the task stands: queued, retry_backoff, "
                                   "waiting_for_model, waiting_for_first_token, generating, "
                                   "or its final status")
    partial_result: str | None = Field(
        default=None, description="the answer generated so far (saved about once a second "
                                  "while it runs; kept when cancelled or timed out)")
    tokens: int | None = Field(default=None, description="tokens generated so far, or in all")
    first_token_s: float | None = Field(
        default=None, description="seconds from sending the request to the first token")
    model_server: str | None = Field(default=None, description="the model server it ran on")
    workdir: str | None = Field(default=None, description="the task's project directory: "
                                "Codex works there and files are read from there")
    files: list[str] = Field(default_factory=list, description="the files the model is given "
                             "(read when the task runs)")
    model: str | None = Field(default=None, description="the model the task named (none: "
                              "its type's default)")
    system: str | None = Field(default=None, description="the task's system prompt")
    options: dict[str, Any] | None = Field(default=None, description="the task's model options")
    output_schema: dict[str, Any] | None = Field(
        default=None, description="the JSON Schema the answer must fit")
    result_json: Any = Field(default=None, description="with output_schema: the result, "
                                                       "parsed (it fits the schema)")
    prompt: str | None = None

    @classmethod
    def of(cls, task: TaskSnapshot, *, include_prompt: bool = True) -> TaskRecord:
        duration = None
        if task.started_at and task.finished_at:
            duration = round(elapsed_s(task.started_at, task.finished_at), 3)
        return cls(
            task_id=task.task_id, type=task.type, status=task.status,  # type: ignore[arg-type]
            priority=task.priority, result=task.result, error=task.error,
            error_kind=task.error_kind, attempts=task.attempts, max_attempts=task.max_attempts,
            timeout_s=task.timeout_s, worker_id=task.worker_id,
            cancel_requested=bool(task.cancel_requested), idempotency_key=task.idempotency_key,
            created_at=_iso(task.created_at), updated_at=_iso(task.updated_at),
            started_at=_iso(task.started_at), finished_at=_iso(task.finished_at),
            duration_s=duration, phase=phase_of(task), partial_result=task.partial_result,
            tokens=task.tokens, first_token_s=task.first_token_s, model_server=task.model_url,
            workdir=task.workdir, files=task.file_list, model=task.model,
            system=task.system_prompt, options=task.options, output_schema=task.schema,
            result_json=_parsed(task), prompt=task.prompt if include_prompt else None,
        )

    def as_json(self) -> dict[str, Any]:
        """JSON-ready data; without the ``prompt`` key when it was not asked for."""
        return self.model_dump(mode="json", exclude={"prompt"} if self.prompt is None else None)

    @property
    def ended(self) -> bool:
        return self.status in FINAL_STATUSES


def _parsed(task: TaskSnapshot) -> Any:
    """The JSON value of a completed task's result when it was asked for (``output_schema``;
    the worker only completes a task whose answer fits)."""
    if task.output_schema is None or task.result is None or \
            task.status != TaskStatus.COMPLETED.value:
        return None
    return structured.loads(task.result)


def next_step(record: TaskRecord) -> str:
    """What the caller should do next about this task, in one line."""
    if record.status == TaskStatus.COMPLETED.value:
        return "done: the result is in `result`"
    if record.status == TaskStatus.FAILED.value:
        return "failed: read `error`; fix the prompt or the backend and delegate again"
    if record.status == TaskStatus.CANCELLED.value:
        return "cancelled: nothing more will happen"
    return (f"still {record.status}: call get_status(task_id={record.task_id!r}) later for the "
            "result (the task goes on without you)")


class DelegateResult(BaseModel):
    """What a submit answers (``delegate_task``, ``POST /task/delegate``)."""

    model_config = ConfigDict(extra="allow")

    task_id: str = Field(description="id for get_status / cancel_task")
    status: StatusName = Field(description="pending, in_progress, completed, failed, cancelled")
    type: TaskTypeName
    priority: int
    created: bool = Field(description="false when an unfinished task with the same "
                                      "idempotency_key was returned instead of a new one")
    result: str | None = Field(description="the model's answer, once completed")
    error: str | None = Field(description="why the last run failed, if it did")
    worker_id: str | None = Field(description="the worker running (or that ran) the task")
    attempts: int
    duration_s: float | None = Field(description="run time of the finished task, s")
    waited_s: float | None = Field(description="how long this call waited (sync only), s")
    next_step: str = Field(description="what to do next")
    workdir: str | None = Field(default=None, description="the task's project directory")
    model: str | None = Field(default=None, description="the model it named, if any")
    result_json: Any = Field(default=None, description="with output_schema: the result, "
                                                       "parsed")

    @classmethod
    def of(cls, record: TaskRecord, *, created: bool, waited_s: float | None) -> DelegateResult:
        return cls(
            task_id=record.task_id, status=record.status, type=record.type,
            priority=record.priority, created=created, result=record.result,
            error=record.error, worker_id=record.worker_id, attempts=record.attempts,
            duration_s=record.duration_s, waited_s=waited_s, next_step=next_step(record),
            workdir=record.workdir, model=record.model, result_json=record.result_json,
        )


class TaskSummary(BaseModel):
    """One line of a listing: no result text (the task's record has it)."""

    task_id: str
    type: TaskTypeName
    status: StatusName
    priority: int
    prompt_preview: str
    has_result: bool
    error: str | None
    worker_id: str | None
    attempts: int
    created_at: str | None
    finished_at: str | None
    duration_s: float | None
    workdir: str | None = None
    model: str | None = None

    @classmethod
    def of(cls, task: TaskSnapshot) -> TaskSummary:
        record = TaskRecord.of(task, include_prompt=False)
        preview = " ".join(task.prompt.split())
        if len(preview) > PREVIEW_CHARS:
            preview = preview[:PREVIEW_CHARS] + "…"
        return cls(
            task_id=record.task_id, type=record.type, status=record.status,
            priority=record.priority, prompt_preview=preview, has_result=task.result is not None,
            error=record.error, worker_id=record.worker_id, attempts=record.attempts,
            created_at=record.created_at, finished_at=record.finished_at,
            duration_s=record.duration_s, workdir=task.workdir, model=task.model,
        )


WAIT_MODES = ("all", "any")


class WaitResult(BaseModel):
    """What a wait on several tasks answers (``wait_tasks``, ``POST /tasks/wait``)."""

    mode: Literal["all", "any"]
    done: bool = Field(description="whether the wait's condition holds: every task ended "
                                   "(all) or at least one did (any)")
    ended: list[str] = Field(description="ids of the tasks that ended")
    unfinished: list[str] = Field(description="ids of the tasks still pending or running")
    waited_s: float = Field(description="how long this call waited, s")
    tasks: list[TaskRecord] = Field(description="each task's record, in the order asked")
    next_step: str = Field(description="what to do next")

    @classmethod
    def of(cls, mode: str, records: list[TaskRecord], waited_s: float) -> WaitResult:
        ended = [r.task_id for r in records if r.ended]
        unfinished = [r.task_id for r in records if not r.ended]
        done = not unfinished if mode == "all" else bool(ended)
        if not unfinished:
            step = "all ended: read each task's `result` (or `error`)"
        elif done:
            step = (f"{len(ended)} ended; call wait_tasks again with the {len(unfinished)} "
                    "unfinished ids for the rest")
        else:
            step = ("the wait ran out; the tasks go on: call wait_tasks again with the "
                    "unfinished ids")
        return cls(mode=mode, done=done, ended=ended,  # type: ignore[arg-type]
                   unfinished=unfinished, waited_s=waited_s, tasks=records, next_step=step)

    def as_json(self) -> dict[str, Any]:
        data = self.model_dump(mode="json")
        data["tasks"] = [r.as_json() for r in self.tasks]
        return data


class TaskList(BaseModel):
    """What a listing answers (``list_tasks``, ``GET /tasks``)."""

    tasks: list[TaskSummary] = Field(description="newest first")
    counts: dict[str, int] = Field(description="number of tasks in each status")
