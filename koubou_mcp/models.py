"""The tables of the task store, named and shaped as in the seed so its monitoring SQL works.

Timestamps are naive UTC datetimes. On SQLite they are stored as ``YYYY-MM-DD HH:MM:SS.ffffff``,
which SQLite's date functions read, so ``last_heartbeat > datetime('now', '-1 minute')`` and
``julianday(updated_at)`` from the seed give correct answers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import Column, DateTime, Index, Text
from sqlmodel import Field, SQLModel

SCHEMA_VERSION = 6


def utcnow() -> datetime:
    """Now, as the naive UTC datetime the store keeps. Only outer loops call this."""
    return datetime.now(UTC).replace(tzinfo=None)


def elapsed_s(start: datetime, end: datetime) -> float:
    """Seconds from ``start`` to ``end``, never negative.

    A task's stamps come from the clocks of whichever hosts wrote them: created by the server
    that took it, started and finished by a worker, failed by a supervisor or cancelled by a
    server elsewhere. With one clock behind another the difference comes out negative; that
    is a clock error, not a time anything took, so it counts as zero.
    """
    return max(0.0, (end - start).total_seconds())


class TaskStatus(StrEnum):
    PENDING = "pending"
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


FINAL_STATUSES = frozenset({TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED})


class TaskType(StrEnum):
    GENERAL = "general"
    CODE = "code"


class WorkerStatus(StrEnum):
    STARTING = "starting"
    IDLE = "idle"
    BUSY = "busy"
    STOPPING = "stopping"
    OFFLINE = "offline"


class Task(SQLModel, table=True):
    """One delegated task. ``task_master`` is the seed's name for this table."""

    __tablename__ = "task_master"

    task_id: str = Field(primary_key=True, max_length=64)
    type: str = Field(max_length=16)
    prompt: str = Field(sa_column=Column(Text, nullable=False))
    status: str = Field(default=TaskStatus.PENDING, max_length=16)
    priority: int = Field(default=5)
    result: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    error: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    #: short label of the last error (``busy``, ``timeout``, ``worker_lost``...), for stats
    error_kind: str | None = Field(default=None, max_length=32)
    attempts: int = Field(default=0)
    max_attempts: int = Field(default=3)
    timeout_s: float = Field(default=60.0)
    #: the worker that holds (or last held) the task
    worker_id: str | None = Field(default=None, max_length=128)
    lease_expires_at: datetime | None = Field(default=None, sa_type=DateTime)
    #: a retried task is not claimed before this time (backoff)
    not_before: datetime | None = Field(default=None, sa_type=DateTime)
    cancel_requested: bool = Field(default=False)
    idempotency_key: str | None = Field(default=None, max_length=200)
    created_at: datetime = Field(default_factory=utcnow, sa_type=DateTime)
    updated_at: datetime = Field(default_factory=utcnow, sa_type=DateTime)
    started_at: datetime | None = Field(default=None, sa_type=DateTime)
    finished_at: datetime | None = Field(default=None, sa_type=DateTime)
    # -- since schema v3: admission and streaming progress
    #: the model server whose slot the task holds while in progress (or held last)
    model_url: str | None = Field(default=None, max_length=500)
    #: the answer generated so far (saved about once a second while running; kept when a task
    #: is cancelled or times out)
    partial_result: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    #: tokens generated so far (or in all, once finished)
    tokens: int | None = Field(default=None)
    #: seconds from sending the request to the first token of the answer
    first_token_s: float | None = Field(default=None)
    #: when ``partial_result``/``tokens`` were last saved
    progress_at: datetime | None = Field(default=None, sa_type=DateTime)
    # -- since schema v4: what the delegating agent handed the task beyond its prompt
    #: the task's project directory (absolute, links resolved); Codex works in it and
    #: ``files`` are relative to it
    workdir: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    #: the paths the worker reads when the task runs, as a JSON list (not their contents)
    files: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    #: the model to run on instead of the type's default
    model: str | None = Field(default=None, max_length=200)
    #: a system prompt (general tasks)
    system_prompt: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    #: sampling options (general tasks), a JSON object
    model_options: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    #: the JSON Schema the answer must fit (general tasks)
    output_schema: str | None = Field(default=None, sa_column=Column(Text, nullable=True))


def _partial_index(name: str, first: str, *rest: str) -> Index:
    """An index of the task rows whose ``first`` column is set."""
    columns = Task.__table__.c  # type: ignore[attr-defined]
    where = columns[first].is_not(None)
    return Index(name, columns[first], *(columns[c] for c in rest),
                 sqlite_where=where, postgresql_where=where)


# Partial: a new task has no worker, no idempotency key (mostly) and no finish time, so its
# INSERT writes none of these three (each index is one page more that every enqueue's commit
# writes to SQLite's WAL). ``x = ...`` and ``x >= ...`` imply ``x IS NOT NULL``, so SQLite and
# PostgreSQL use them for the queries they serve.
_partial_index("ix_task_master_worker_set", "worker_id", "status")
_partial_index("ix_task_master_idempotency_set", "idempotency_key")
# the metrics read the tasks finished since their last scrape
_partial_index("ix_task_master_finished_set", "finished_at")

# The claim takes pending tasks by priority (highest first), then age: an index in exactly that
# order lets it read the first ready row instead of sorting every pending one.
Index(
    "ix_task_master_ready",
    Task.__table__.c.status,  # type: ignore[attr-defined]
    Task.__table__.c.priority.desc(),  # type: ignore[attr-defined]
    Task.__table__.c.created_at,  # type: ignore[attr-defined]
    Task.__table__.c.task_id,  # type: ignore[attr-defined]
)


class Worker(SQLModel, table=True):
    """One worker process, as it reports itself. Rows of stopped workers stay as ``offline``."""

    __tablename__ = "workers"

    worker_id: str = Field(primary_key=True, max_length=128)
    status: str = Field(default=WorkerStatus.STARTING, max_length=16)
    current_task: str | None = Field(default=None, max_length=64)
    tasks_completed: int = Field(default=0)
    tasks_failed: int = Field(default=0)
    host: str = Field(default="", max_length=255)
    pid: int | None = Field(default=None)
    last_heartbeat: datetime = Field(default_factory=utcnow, sa_type=DateTime)
    #: when the worker last became idle; the supervisor retires it after idle_timeout
    idle_since: datetime | None = Field(default=None, sa_type=DateTime)
    created_at: datetime = Field(default_factory=utcnow, sa_type=DateTime)
    stopped_at: datetime | None = Field(default=None, sa_type=DateTime)
    #: PostgreSQL: when new work last woke this worker (``store.WAKE_IDLE_WORKERS``); the
    #: idle worker woken longest ago is woken first, so two tasks in a row wake two workers
    woken_at: datetime | None = Field(default=None, sa_type=DateTime)


class ModelServer(SQLModel, table=True):
    """What the pool learned about one model server: its slot limit and speeds
    (``admission.Capacity``). Slots themselves are the in-progress tasks holding them."""

    __tablename__ = "model_servers"

    url: str = Field(primary_key=True, max_length=500)
    slot_limit: int = Field(default=1)
    pinned: bool = Field(default=False)
    good: int = Field(default=0)
    ceiling: int | None = Field(default=None)
    ceiling_at: datetime | None = Field(default=None, sa_type=DateTime)
    baseline_ttft_s: float | None = Field(default=None)
    baseline_tps: float | None = Field(default=None)
    last_ttft_s: float | None = Field(default=None)
    last_tps: float | None = Field(default=None)
    busy_events: int = Field(default=0)
    updated_at: datetime = Field(default_factory=utcnow, sa_type=DateTime)


class Meta(SQLModel, table=True):
    """Key/value facts about the store itself, such as the schema version."""

    __tablename__ = "koubou_meta"

    key: str = Field(primary_key=True, max_length=64)
    value: str = Field(max_length=255)


# -- snapshots ----------------------------------------------------------------------------
# What the queue hands out: plain, immutable copies of a row. Building an instance of a table
# model goes through the ORM's instrumentation and cost a third of an enqueue; these cost
# next to nothing, and nobody can mistake them for live rows.

@dataclass(frozen=True, slots=True)
class TaskSnapshot:
    task_id: str
    type: str
    prompt: str
    status: str
    priority: int
    result: str | None
    error: str | None
    error_kind: str | None
    attempts: int
    max_attempts: int
    timeout_s: float
    worker_id: str | None
    lease_expires_at: datetime | None
    not_before: datetime | None
    cancel_requested: bool
    idempotency_key: str | None
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    model_url: str | None = None
    partial_result: str | None = None
    tokens: int | None = None
    first_token_s: float | None = None
    progress_at: datetime | None = None
    workdir: str | None = None
    files: str | None = None
    model: str | None = None
    system_prompt: str | None = None
    model_options: str | None = None
    output_schema: str | None = None

    @property
    def file_list(self) -> list[str]:
        """The paths of ``files``."""
        return list(json.loads(self.files)) if self.files else []

    @property
    def options(self) -> dict[str, Any] | None:
        return dict(json.loads(self.model_options)) if self.model_options else None

    @property
    def schema(self) -> dict[str, Any] | None:
        return dict(json.loads(self.output_schema)) if self.output_schema else None


@dataclass(frozen=True, slots=True)
class WorkerSnapshot:
    worker_id: str
    status: str
    current_task: str | None
    tasks_completed: int
    tasks_failed: int
    host: str
    pid: int | None
    last_heartbeat: datetime
    idle_since: datetime | None
    created_at: datetime
    stopped_at: datetime | None
    woken_at: datetime | None = None
