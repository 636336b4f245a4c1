"""The application both transports share: open the store and attach to the pool (started in
the background when none runs), submit a task and optionally wait for it, read, list and
cancel tasks, and the health document.

``server.py`` (MCP) and ``http_api.py`` (REST) are thin layers over :class:`Service`; the CLI
uses the plain functions (``read_task``, ``cancel_task``, ``TaskRecord.of``) on a store it
opened itself. The records it answers with are ``results``'s. Nothing here imports ``mcp`` or
starlette: failures are this module's own exceptions (:class:`ServiceError` and its kinds),
which each transport translates (a tool error, an HTTP status, an exit code). Every message
says what is wrong and what to do.

The service never runs a task: a sync ``submit`` only waits, polling the store, while a worker
process runs the task.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import datetime
from typing import Any, Protocol, TypeVar

import anyio
import anyio.to_thread
from sqlalchemy.exc import SQLAlchemyError

from koubou_mcp import health, queue
from koubou_mcp.config import Settings
from koubou_mcp.models import FINAL_STATUSES, TaskSnapshot, TaskStatus, WorkerStatus, utcnow
from koubou_mcp.modelset import ModelSet
from koubou_mcp.request import InvalidTask, validate_task
from koubou_mcp.results import (
    WAIT_MODES,
    DelegateResult,
    TaskList,
    TaskRecord,
    TaskSummary,
    WaitResult,
    next_step,
)
from koubou_mcp.store import Store, StoreError, open_store

log = logging.getLogger("koubou_mcp.service")

#: A sync submit never waits longer than this, s. Claude Code moves a tool call to the
#: background after 120 s; returning well before keeps the call in the foreground.
MAX_SYNC_WAIT_S = 100.0
#: How often a sync wait looks at the task at most, s (a primary-key read: cheap). It starts
#: at SYNC_FIRST_POLL_S and grows to this, so quick tasks are seen quickly.
SYNC_POLL_S = 0.05
SYNC_FIRST_POLL_S = 0.01
#: How often a sync wait reports progress, s
PROGRESS_EVERY_S = 1.0
#: Most tasks one listing returns (MCP and REST)
MAX_LIST_LIMIT = 200



# -- errors -------------------------------------------------------------------------------

class ServiceError(Exception):
    """A request the service cannot carry out; the message says why and what to do."""


class StoreUnavailable(ServiceError):
    """The task store is not open, or a call to it failed."""


class InvalidRequest(ServiceError):
    """A field of a request is bad; ``field`` names it when one field is to blame, ``index``
    the task of a batch that is."""

    def __init__(self, message: str, field: str | None = None,
                 index: int | None = None) -> None:
        super().__init__(message)
        self.field = field
        self.index = index


class TaskNotFound(ServiceError):
    """No task has this id."""


class TaskFinished(ServiceError):
    """The task already ended, so it cannot be cancelled."""


# -- plain operations on an open store (the CLI's, and the Service's in a thread) -----------

#: The fields a new task may have (``prompt`` is required), in the order they are checked
TASK_FIELDS = ("prompt", "type", "priority", "timeout_s", "idempotency_key", "workdir", "files",
               "model", "system", "options", "output_schema")
#: Most tasks one ``delegate_tasks`` call may submit
MAX_BATCH_TASKS = 50
#: Most tasks one ``wait_tasks`` call may wait on
MAX_WAIT_TASKS = 100

Models = Callable[[], Sequence[str]]


def validate(settings: Settings, prompt: Any, type: Any = "general", priority: Any = 5,
             timeout_s: Any = None, idempotency_key: Any = None, *, workdir: Any = None,
             files: Any = None, model: Any = None, system: Any = None, options: Any = None,
             output_schema: Any = None, models: Models | None = None) -> queue.TaskRequest:
    """Check every field of a new task; InvalidRequest names the first bad one. ``workdir``
    defaults to ``settings.workdir`` (the delegating process's directory); ``models`` gives
    the models a task may name (asked only when it names one). Reads the files (to check
    them) and may ask Ollama for its models: call it off the event loop."""
    try:
        return validate_task(settings, prompt, type, priority, timeout_s, idempotency_key,
                             workdir=workdir, files=files, model=model, system=system,
                             options=options, output_schema=output_schema, models=models)
    except InvalidTask as exc:
        raise InvalidRequest(str(exc), field=exc.field) from None


def request_from(settings: Settings, fields: Any, models: Models | None = None) -> queue.TaskRequest:
    """A task from an object of ``TASK_FIELDS`` (a REST body, an item of a batch)."""
    if not isinstance(fields, Mapping):
        raise InvalidRequest(f"a task must be an object with at least a prompt, got "
                             f"{_kind(fields)}")
    unknown = sorted(str(k) for k in fields if k not in TASK_FIELDS)
    if unknown:
        raise InvalidRequest(f"unknown field(s) {', '.join(unknown)}; a task accepts "
                             f"{', '.join(TASK_FIELDS)}", field=unknown[0])
    if "prompt" not in fields:
        raise InvalidRequest("prompt is required: everything the local model needs",
                             field="prompt")
    return validate(settings, **fields, models=models)


def batch_from(settings: Settings, tasks: Any,
               models: Models | None = None) -> list[queue.TaskRequest]:
    """The tasks of a batch, every one checked before any is stored; InvalidRequest says
    the index and the reason of the first bad one."""
    if isinstance(tasks, str | bytes) or not isinstance(tasks, Sequence) or not tasks:
        raise InvalidRequest("tasks must be a non-empty list of tasks, each an object with "
                             "the fields of delegate_task", field="tasks")
    if len(tasks) > MAX_BATCH_TASKS:
        raise InvalidRequest(f"tasks holds {len(tasks)} tasks; at most {MAX_BATCH_TASKS} go in "
                             "one batch (send the rest in another)", field="tasks")
    out = []
    for index, item in enumerate(tasks):
        try:
            out.append(request_from(settings, item, models))
        except InvalidRequest as exc:
            field = f"tasks[{index}]" + (f".{exc.field}" if exc.field else "")
            raise InvalidRequest(f"tasks[{index}]: {exc}; nothing was stored", field=field,
                                 index=index) from None
    return out


def check_task_ids(task_ids: Any) -> list[str]:
    """The ids of a wait, each once, in the order given."""
    if isinstance(task_ids, str) or not isinstance(task_ids, Sequence) or not task_ids:
        raise InvalidRequest("task_ids must be a non-empty list of task ids", field="task_ids")
    if len(task_ids) > MAX_WAIT_TASKS:
        raise InvalidRequest(f"task_ids holds {len(task_ids)} ids; at most {MAX_WAIT_TASKS} "
                             "can be waited on at once", field="task_ids")
    for index, task_id in enumerate(task_ids):
        if not isinstance(task_id, str) or not task_id.strip() or len(task_id) > 64:
            raise InvalidRequest(f"task_ids[{index}] must be a task id such as "
                                 f"task_20250101_120000_1a2b3c4d, got {_kind(task_id)}",
                                 field="task_ids")
    return list(dict.fromkeys(task_ids))


def _kind(value: Any) -> str:
    if isinstance(value, str):
        return repr(value[:60])
    return {dict: "an object", list: "a list", bool: "true/false",
            type(None): "null"}.get(type(value), type(value).__name__)


def find_task(store: Store, task_id: str) -> TaskSnapshot:
    """The task with this id; TaskNotFound says how to find one."""
    try:
        return queue.get_task(store, task_id)
    except queue.TaskNotFound as exc:
        raise TaskNotFound(str(exc)) from None


def read_task(store: Store, task_id: str, *, include_prompt: bool = True) -> TaskRecord:
    """The record of one task."""
    return TaskRecord.of(find_task(store, task_id), include_prompt=include_prompt)


def cancel_task(store: Store, task_id: str, now: datetime) -> TaskRecord:
    """Cancel a pending task at once, or ask the worker running it to stop; TaskFinished when
    it already ended."""
    try:
        task = queue.cancel(store, task_id, now)
    except queue.TaskNotFound as exc:
        raise TaskNotFound(str(exc)) from None
    except queue.TaskStateError as exc:
        raise TaskFinished(str(exc)) from None
    return TaskRecord.of(task, include_prompt=False)


def list_task_records(store: Store, status: str | None,
                      limit: int) -> tuple[list[TaskRecord], dict[str, int]]:
    """The newest ``limit`` tasks (in ``status``, if given) and the counts by status."""
    tasks = queue.list_tasks(store, status, limit)
    return [TaskRecord.of(t, include_prompt=False) for t in tasks], queue.counts_by_status(store)


def default_wait_s(settings: Settings) -> float:
    """How long a sync submit waits when the caller does not say, s."""
    return min(settings.sync_wait_s, MAX_SYNC_WAIT_S)


# -- the pool -----------------------------------------------------------------------------

class PoolHandle(Protocol):
    """What the service needs from the pool it is attached to (``attachment.PoolLink``)."""

    def ensure(self, *, explicit: bool = True) -> None:
        """Make sure a pool runs for the home (start one when none does)."""
        ...

    def detach(self) -> None:
        """Leave the pool; it goes on without this process."""
        ...

    def health(self) -> dict[str, Any]: ...


def start_pool(settings: Settings) -> PoolHandle:
    """Attach to the pool of this home, which runs in a process of its own: started in the
    background (its own session) when none runs, so that it outlives this server."""
    from koubou_mcp import attachment

    return attachment.attach(settings)


# -- the service --------------------------------------------------------------------------

T = TypeVar("T")
ProgressFn = Callable[[queue.Progress, float], Awaitable[None]]
#: told where each waited-on task stands, and the time waited so far
ManyProgressFn = Callable[[list[queue.Progress], float], Awaitable[None]]


class Service:
    """One koubou application: its settings, the store it opened (or why it could not) and
    the pool it runs (or why it could not). ``start`` and ``stop`` bracket its life (the MCP
    server's lifespan calls them); every other method may be called in between, from any
    task of the event loop. Store calls run in worker threads."""

    def __init__(self, settings: Settings, *, run_pool: bool = True,
                 pool_starter: Callable[[Settings], PoolHandle] = start_pool) -> None:
        self.settings = settings
        self.run_pool = run_pool
        self._pool_starter = pool_starter
        self.store: Store | None = None
        self.store_error: str | None = None
        self.pool: PoolHandle | None = None
        self.pool_error: str | None = None
        #: set by whoever runs the service once ``stop`` has finished and been logged: the
        #: process may exit without waiting for more
        self.stopped = threading.Event()
        #: the models a task may name (Ollama's list is cached briefly)
        self.models = ModelSet(settings)

    # -- life ----------------------------------------------------------------------------
    async def start(self) -> None:
        """Open the store and, with ``run_pool``, start (or join) the pool. Neither failure
        raises: the service goes on, its health says what is wrong and each call that needs
        the store says so."""
        settings = self.settings
        try:
            self.store = await anyio.to_thread.run_sync(
                open_store, settings.database_url, settings.run_dir)
        except StoreError as exc:
            self.store_error = str(exc)
            log.error("cannot open the task store: %s", exc)
        if self.run_pool and self.store is not None:
            try:
                self.pool = await anyio.to_thread.run_sync(self._pool_starter, settings)
            except Exception as exc:  # serve anyway: health and every status call still work
                self.pool_error = f"{type(exc).__name__}: {exc}"
                log.exception("cannot start the worker pool")

    async def stop(self) -> None:
        """Close what ``start`` opened, quickly (a stdio client kills the server about 2 s
        after closing stdin). The pool is only left: it runs in its own process and goes on
        with every running and queued task, then exits by itself once idle with no server
        attached (``KOUBOU_POOL_LINGER``)."""
        if self.pool is not None:
            pool, self.pool = self.pool, None
            try:
                await anyio.to_thread.run_sync(pool.detach)
            except Exception:
                log.exception("leaving the pool failed")
        if self.store is not None:
            store, self.store = self.store, None
            store.close()

    def require_store(self) -> Store:
        if self.store is None:
            reason = (self.store_error or "not open").rstrip(".")
            raise StoreUnavailable(f"the task store is unavailable: {reason}. Fix it "
                                   "(koubou-mcp doctor says how) and restart the server.")
        return self.store

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a store call in a worker thread. A database failure becomes StoreUnavailable
        saying what failed."""
        store = self.require_store()
        try:
            return await anyio.to_thread.run_sync(fn, store, *args)
        except SQLAlchemyError as exc:
            detail = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
            log.error("store call %s failed: %s", getattr(fn, "__name__", fn), detail)
            raise StoreUnavailable(f"the task store failed: {detail}; read koubou://health "
                                   "or run `koubou-mcp doctor`") from None

    @property
    def default_wait_s(self) -> float:
        return default_wait_s(self.settings)

    # -- tasks ---------------------------------------------------------------------------
    def validate(self, prompt: Any, type: Any = "general", priority: Any = 5,
                 timeout_s: Any = None, idempotency_key: Any = None,
                 **fields: Any) -> queue.TaskRequest:
        """See :func:`validate` (blocking: ``prepare`` is the event loop's way)."""
        return validate(self.settings, prompt, type, priority, timeout_s, idempotency_key,
                        models=self.models.names, **fields)

    async def prepare(self, fields: Mapping[str, Any]) -> queue.TaskRequest:
        """A checked request from the fields of one task (``TASK_FIELDS``), checked in a
        thread: its files are read and Ollama may be asked for its models."""
        return await anyio.to_thread.run_sync(request_from, self.settings, fields,
                                              self.models.names)

    async def prepare_batch(self, tasks: Any) -> list[queue.TaskRequest]:
        """See :func:`batch_from`."""
        return await anyio.to_thread.run_sync(batch_from, self.settings, tasks,
                                              self.models.names)

    async def submit_many(self, requests: Sequence[queue.TaskRequest]) -> list[DelegateResult]:
        """Queue checked requests in one transaction (all or none); their results in order."""
        settings = self.settings
        enqueued = await self._call(
            lambda store: queue.enqueue_many(store, requests, settings, utcnow()))
        await self._ensure_pool()
        return [DelegateResult.of(TaskRecord.of(e.task, include_prompt=False),
                                  created=e.created, waited_s=None) for e in enqueued]

    async def wait_many(self, task_ids: Any, mode: str = "all", wait_s: float | None = None,
                        on_progress: ManyProgressFn | None = None, *,
                        poll_s: float = SYNC_POLL_S,
                        progress_every_s: float = PROGRESS_EVERY_S) -> WaitResult:
        """Watch several tasks until all of them (``mode="all"``) or any of them (``"any"``)
        ended, or ``wait_s`` passed (default ``default_wait_s``, at most MAX_SYNC_WAIT_S);
        return their records, results included. An unknown id is TaskNotFound, at once."""
        ids = check_task_ids(task_ids)
        if mode not in WAIT_MODES:
            raise InvalidRequest(f"mode must be \"all\" or \"any\", got {mode!r}", field="mode")
        if wait_s is None:
            wait_s = self.default_wait_s
        if isinstance(wait_s, bool) or not isinstance(wait_s, int | float) or \
                not (math.isfinite(wait_s) and 0 <= wait_s <= MAX_SYNC_WAIT_S):
            raise InvalidRequest(f"wait_s must be a number of seconds from 0 to "
                                 f"{MAX_SYNC_WAIT_S:g}, got {wait_s!r}", field="wait_s")
        start = anyio.current_time()
        next_report = start + progress_every_s
        delay = min(SYNC_FIRST_POLL_S, poll_s)
        while True:
            progress = await self._call(_progress_of_many, ids)
            ended = [p.status in FINAL_STATUSES for p in progress]
            now = anyio.current_time()
            elapsed = now - start
            done = all(ended) if mode == "all" else any(ended)
            if done or elapsed >= wait_s:
                tasks = await self._call(_find_many, ids)
                records = [TaskRecord.of(t, include_prompt=False) for t in tasks]
                return WaitResult.of(mode, records, round(elapsed, 3))
            if on_progress is not None and now >= next_report:
                await on_progress(progress, elapsed)
                next_report = now + progress_every_s
            await anyio.sleep(max(0.0, min(delay, wait_s - elapsed, next_report - now)))
            delay = min(delay * 1.5, poll_s)

    async def submit(self, request: queue.TaskRequest, *, wait_s: float | None = None,
                     on_progress: ProgressFn | None = None) -> DelegateResult:
        """Queue a validated request; with ``wait_s``, wait up to that long for it to end
        (a sync submit), calling ``on_progress`` about every second meanwhile."""
        if wait_s is not None and not (math.isfinite(wait_s) and 0 <= wait_s <= MAX_SYNC_WAIT_S):
            raise InvalidRequest(f"wait_s must be a number of seconds from 0 to "
                                 f"{MAX_SYNC_WAIT_S:g}, got {wait_s!r}", field="wait_s")
        settings = self.settings
        enqueued = await self._call(
            lambda store: queue.enqueue(store, request, settings, utcnow()))
        await self._ensure_pool()
        record, waited = TaskRecord.of(enqueued.task, include_prompt=False), None
        if wait_s is not None:
            record, elapsed = await self.wait(record.task_id, wait_s, on_progress)
            waited = round(elapsed, 3)
        return DelegateResult.of(record, created=enqueued.created, waited_s=waited)

    async def _ensure_pool(self) -> None:
        """New work: make sure a pool runs to take it (it may have been stopped or died).
        A failure is logged, never the caller's: the task is queued."""
        pool = self.pool
        if pool is None:
            return
        try:
            await anyio.to_thread.run_sync(pool.ensure)
            self.pool_error = None
        except Exception as exc:
            self.pool_error = f"{type(exc).__name__}: {exc}"
            log.exception("cannot start the worker pool")

    async def wait(self, task_id: str, wait_s: float, on_progress: ProgressFn | None = None, *,
                   poll_s: float = SYNC_POLL_S,
                   progress_every_s: float = PROGRESS_EVERY_S) -> tuple[TaskRecord, float]:
        """Watch a task until it ends or ``wait_s`` passes; return its record and the time
        waited. Calls ``on_progress(progress, elapsed)`` about every ``progress_every_s``."""
        start = anyio.current_time()
        next_report = start + progress_every_s
        delay = min(SYNC_FIRST_POLL_S, poll_s)
        while True:
            # poll the light status only; the full record is read once, at the end
            progress = await self._call(_progress_of, task_id)
            now = anyio.current_time()
            elapsed = now - start
            if progress.status in FINAL_STATUSES or elapsed >= wait_s:
                task = await self._call(find_task, task_id)
                return TaskRecord.of(task, include_prompt=False), elapsed
            if on_progress is not None and now >= next_report:
                await on_progress(progress, elapsed)
                next_report = now + progress_every_s
            await anyio.sleep(max(0.0, min(delay, wait_s - elapsed, next_report - now)))
            delay = min(delay * 1.5, poll_s)

    async def read(self, task_id: str, *, include_prompt: bool = False) -> TaskRecord:
        """The record of one task."""
        return await self._call(lambda store: read_task(store, task_id,
                                                        include_prompt=include_prompt))

    async def list_tasks(self, status: str | None = None, limit: int = 20) -> TaskList:
        """Tasks newest first (in ``status``, if given), with the counts by status."""
        statuses = [s.value for s in TaskStatus]
        if status is not None and status not in statuses:
            raise InvalidRequest(f"status must be one of {', '.join(statuses)}, got "
                                 f"{status!r}", field="status")
        if isinstance(limit, bool) or not 1 <= limit <= MAX_LIST_LIMIT:
            raise InvalidRequest(f"limit must be an integer from 1 to {MAX_LIST_LIMIT}, got "
                                 f"{limit!r}", field="limit")

        def read(store: Store) -> TaskList:
            tasks = queue.list_tasks(store, status, limit)
            return TaskList(tasks=[TaskSummary.of(t) for t in tasks],
                            counts=queue.counts_by_status(store))

        return await self._call(read)

    async def cancel(self, task_id: str) -> TaskRecord:
        """See :func:`cancel_task`."""
        return await self._call(lambda store: cancel_task(store, task_id, utcnow()))

    # -- the installation ----------------------------------------------------------------
    async def stats(self) -> dict[str, Any]:
        """Tasks by status, queue depth, run and wait times, per-worker counters."""
        stats = await self._call(queue.stats)
        return stats.as_dict()

    async def workers(self) -> dict[str, Any]:
        """Live workers, with counts by status and by host."""
        live = await self._call(lambda store: health.live_workers(store, self.settings,
                                                                  utcnow()))
        by_status = {s: 0 for s in (WorkerStatus.STARTING.value, WorkerStatus.IDLE.value,
                                    WorkerStatus.BUSY.value, WorkerStatus.STOPPING.value)}
        by_host: dict[str, dict[str, int]] = {}
        for w in live:
            by_status[w["status"]] = by_status.get(w["status"], 0) + 1
            host = by_host.setdefault(w["host"], {})
            host[w["status"]] = host.get(w["status"], 0) + 1
        return {"live": len(live), "by_status": by_status, "by_host": by_host, "workers": live}

    def pool_health(self) -> dict[str, Any] | None:
        """Where the pool this server is attached to runs, or None when it is attached to
        none."""
        return self.pool.health() if self.pool is not None else None

    async def health(self) -> dict[str, Any]:
        """The health document (``koubou://health``, ``GET /health``): ok/degraded/down with
        the reason for each part that is not ok."""
        supervisor = await anyio.to_thread.run_sync(self.pool_health)
        document = await health.collect_health(
            self.settings, self.store, supervisor=supervisor, store_error=self.store_error,
            pool_error=self.pool_error)
        document["server"] = {"pid": os.getpid(), "pool": "attached" if self.pool is not None
                              else "not started (--no-pool)" if not self.run_pool
                              else "not attached"}
        return document


def _progress_of_many(store: Store, task_ids: Sequence[str]) -> list[queue.Progress]:
    try:
        return queue.tasks_progress(store, task_ids)
    except queue.TaskNotFound as exc:
        raise TaskNotFound(str(exc)) from None


def _find_many(store: Store, task_ids: Sequence[str]) -> list[TaskSnapshot]:
    try:
        return queue.get_tasks(store, task_ids)
    except queue.TaskNotFound as exc:
        raise TaskNotFound(str(exc)) from None


def _progress_of(store: Store, task_id: str) -> queue.Progress:
    try:
        return queue.task_progress(store, task_id)
    except queue.TaskNotFound as exc:
        raise TaskNotFound(str(exc)) from None


__all__ = [
    "MAX_BATCH_TASKS", "MAX_LIST_LIMIT", "MAX_SYNC_WAIT_S", "MAX_WAIT_TASKS", "TASK_FIELDS",
    "WAIT_MODES", "DelegateResult", "InvalidRequest", "ManyProgressFn", "PoolHandle",
    "ProgressFn", "Service", "ServiceError", "StoreUnavailable", "TaskFinished", "TaskList",
    "TaskNotFound", "TaskRecord", "TaskSummary", "WaitResult", "batch_from", "cancel_task",
    "check_task_ids", "default_wait_s", "find_task", "list_task_records", "next_step",
    "read_task", "request_from", "start_pool", "validate",
]
