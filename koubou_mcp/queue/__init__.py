"""Every operation on tasks and workers, each one short transaction; the SQL is in ``statements``.

Callers pass ``now`` (naive UTC): the queue never reads the clock, so leases, backoff and
expiry are tested by handing it a fake time. Guarantees:

* ``claim_next`` is one atomic ``UPDATE … RETURNING`` (with ``FOR UPDATE SKIP LOCKED`` on
  PostgreSQL): a task is held by one worker at a time, highest priority first, then oldest.
* A claimed task carries a lease that the worker renews with ``heartbeat``. A lease that ran out
  means the worker is gone: ``requeue_expired`` gives the task back (at-least-once).
* Transient failures are retried with exponential backoff and jitter up to the task's
  ``max_attempts``; permanent ones and timeouts fail at once.

The modules: ``statements`` (the SQL), ``submit`` (storing a new task),
``claim`` (a task with a model-server slot), ``handover`` (a task's end and the next
claim in one transaction), ``lifecycle`` (heartbeat, complete, fail, cancel,
release, recovery), ``workers`` (the workers' rows), ``servers`` (model-server slots),
``reads`` (everything that only reads), ``records`` and ``errors``. Callers use the names
re-exported here: ``from koubou_mcp import queue; queue.enqueue(...)``. Checking a new
task's fields is ``koubou_mcp.request``'s job (re-exported here too).
"""

from __future__ import annotations

from koubou_mcp.models import TaskSnapshot, Worker, WorkerSnapshot
from koubou_mcp.queue.claim import Admitted, admit_next, claim_next
from koubou_mcp.queue.errors import TaskNotFound, TaskStateError
from koubou_mcp.queue.handover import HandedOver, NextClaim, complete_and_admit
from koubou_mcp.queue.lifecycle import (
    Beat,
    Generated,
    Recovered,
    cancel,
    complete,
    expire_waiting,
    fail,
    heartbeat,
    mark_cancelled,
    release,
    requeue_expired,
    requeue_worker,
)
from koubou_mcp.queue.reads import (
    FinishedTask,
    Progress,
    RunningTask,
    Stats,
    autovacuum_setting,
    counts_by_status,
    finished_since,
    get_task,
    get_tasks,
    list_tasks,
    next_ready_in,
    pending_by_priority,
    ready_pending_count,
    recently_finished,
    retrying_by_kind,
    running_task_deadlines,
    stats,
    task_progress,
    tasks_progress,
)
from koubou_mcp.queue.records import worker_record
from koubou_mcp.queue.servers import (
    ServerUse,
    configure_model_server,
    model_server,
    model_servers,
    observe_model_server,
)
from koubou_mcp.queue.submit import Enqueued, enqueue, enqueue_many, new_task_id
from koubou_mcp.queue.workers import (
    get_worker,
    list_workers,
    mark_silent_workers_offline,
    mark_worker_offline,
    new_worker_id,
    register_worker,
    set_worker_status,
)
from koubou_mcp.request import MAX_IDEMPOTENCY_KEY, InvalidTask, TaskRequest, validate_request
from koubou_mcp.store import Store

__all__ = [
    "Admitted",
    "Beat",
    "Enqueued",
    "FinishedTask",
    "HandedOver",
    "NextClaim",
    "Generated",
    "InvalidTask",
    "MAX_IDEMPOTENCY_KEY",
    "Progress",
    "Recovered",
    "RunningTask",
    "ServerUse",
    "Stats",
    "Store",
    "TaskNotFound",
    "TaskRequest",
    "TaskSnapshot",
    "TaskStateError",
    "Worker",
    "WorkerSnapshot",
    "admit_next",
    "cancel",
    "claim_next",
    "complete",
    "complete_and_admit",
    "configure_model_server",
    "autovacuum_setting",
    "counts_by_status",
    "enqueue",
    "enqueue_many",
    "expire_waiting",
    "fail",
    "finished_since",
    "get_task",
    "get_tasks",
    "get_worker",
    "heartbeat",
    "list_tasks",
    "list_workers",
    "mark_cancelled",
    "mark_silent_workers_offline",
    "mark_worker_offline",
    "model_server",
    "model_servers",
    "new_task_id",
    "new_worker_id",
    "next_ready_in",
    "observe_model_server",
    "pending_by_priority",
    "ready_pending_count",
    "recently_finished",
    "register_worker",
    "release",
    "requeue_expired",
    "requeue_worker",
    "retrying_by_kind",
    "running_task_deadlines",
    "set_worker_status",
    "stats",
    "task_progress",
    "tasks_progress",
    "validate_request",
    "worker_record",
]
