"""The MCP server: four tools and three resources over the task queue, and the lifespan that
opens the store and runs (or joins) the worker pool.

A thin layer: arguments are checked (types by the SDK against each tool's input schema, the
domain rules by ``queue.validate_request``), the plain functions of ``queue`` do the work, and
their results are translated into structured tool results. The server never runs a task
itself; a ``sync`` call only waits, polling the store, while a worker process runs the task.

This module deliberately does not use ``from __future__ import annotations``: the tool
signatures carry limits taken from the settings (the longest prompt, the largest timeout);
as strings, the SDK would evaluate them in module scope, where the settings are not visible.

Nothing may reach stdout but JSON-RPC: the SDK's stdio transport points fd 1 at stderr while it
serves, so stray prints and the children we start cannot corrupt the protocol stream.

Over HTTP (``serve_http``) the same server answers at ``/mcp`` on one Starlette app with the
REST API and ``/metrics`` of ``http_api`` (which reuses ``submit``, ``wait_for_task`` and
``health_document`` from here), behind its ``Guard``; this module only wires them.
"""

import json
import logging
import os
import signal
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Protocol, TypeVar

import anyio
import anyio.to_thread
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ResourceError, ResourceNotFoundError, ToolError
from mcp_types import CallToolResult, TextContent, ToolAnnotations
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
from pydantic_core import PydanticCustomError
from sqlalchemy.exc import SQLAlchemyError

from koubou_mcp import __version__, health, queue
from koubou_mcp.config import PRIORITY_MAX, PRIORITY_MIN, ConfigError, Settings
from koubou_mcp.models import FINAL_STATUSES, TaskSnapshot, TaskStatus, utcnow
from koubou_mcp.store import Store, StoreError, open_store

log = logging.getLogger("koubou_mcp.server")

#: A sync ``delegate_task`` never waits longer than this, s. Claude Code moves a tool call to
#: the background after 120 s; returning well before keeps the call in the foreground.
MAX_SYNC_WAIT_S = 100.0
#: How often a sync wait looks at the task at most, s (a primary-key read: cheap). It starts
#: at SYNC_FIRST_POLL_S and grows to this, so quick tasks are seen quickly.
SYNC_POLL_S = 0.05
SYNC_FIRST_POLL_S = 0.01
#: How often a sync wait reports progress to the client, s
PROGRESS_EVERY_S = 1.0
#: Most tasks ``list_tasks`` returns at once
MAX_LIST_LIMIT = 200
#: How long shutting down waits for the pool: idle workers exit at once; busy ones go on
#: draining by themselves (they finish their task, or give it back, then exit), s
POOL_STOP_WAIT_S = 0.5
#: After a stop signal, how long the server may take to shut down before it exits anyway, s
SHUTDOWN_GRACE_S = 1.5

TaskType = Literal["general", "code"]
StatusName = Literal["pending", "in_progress", "completed", "failed", "cancelled"]

def instructions(default_wait_s: float) -> str:
    """What the server tells the model it is for, and when delegating pays."""
    return INSTRUCTIONS.format(default_wait_s=default_wait_s, max_wait_s=MAX_SYNC_WAIT_S)


INSTRUCTIONS = """\
koubou runs prompts on local models on this machine: `general` tasks on an Ollama model, \
`code` tasks with the Codex CLI (which can read and edit files in its working directory). \
A durable queue feeds a pool of worker processes that grows with the backlog. Local models \
cost nothing per call but are slower and less capable than you.

Delegate work that is self-contained and well specified: bulk or repetitive edits, \
boilerplate, test scaffolding, summaries of long text, first drafts, docstrings, translations. \
The local model sees only the prompt: put into it everything it needs (it cannot see this \
conversation). Review what comes back before you use it. Keep work that needs your judgement, \
this conversation's context, or that is quicker to do than to explain.

How to call:
- Short tasks (under a minute): delegate_task(prompt, sync=true) waits up to wait_s (default \
{default_wait_s:g} s, at most {max_wait_s:g} s) and returns the result.
- Long tasks, or several at once: delegate_task(prompt) returns a task_id immediately; do \
other work, then call get_status(task_id). Submitting several before polling runs them in \
parallel.
- A sync call that returns status pending or in_progress has not failed: the task goes on; \
poll get_status.
- list_tasks shows recent tasks and counts; cancel_task stops one. Priority 1-10, higher \
runs first (default 5).
- If tasks do not progress, read the koubou://health resource: it says what is wrong."""


# -- structured results -------------------------------------------------------------------

class DelegateResult(BaseModel):
    """What ``delegate_task`` returns."""

    model_config = ConfigDict(extra="allow")

    task_id: str = Field(description="id for get_status / cancel_task")
    status: StatusName = Field(description="pending, in_progress, completed, failed, cancelled")
    type: TaskType
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


class TaskRecord(BaseModel):
    """The full record of one task (the prompt only when asked for)."""

    model_config = ConfigDict(extra="allow")

    task_id: str
    type: TaskType
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
    duration_s: float | None
    prompt: str | None = None


class TaskSummary(BaseModel):
    """One line of ``list_tasks``: no result text (get_status has it)."""

    task_id: str
    type: TaskType
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


class TaskList(BaseModel):
    """What ``list_tasks`` returns."""

    tasks: list[TaskSummary] = Field(description="newest first")
    counts: dict[str, int] = Field(description="number of tasks in each status")


# -- argument types -----------------------------------------------------------------------

def _no_bool(value: Any) -> Any:
    """JSON ``true`` is not a number, whatever Python thinks."""
    if isinstance(value, bool):
        raise PydanticCustomError("bool_not_number", "Input should be a number, not true/false")
    return value


NotBool = BeforeValidator(_no_bool)


TaskId = Annotated[str, Field(description="a task id from delegate_task or list_tasks, "
                                          "like task_20250101_120000_1a2b3c4d")]


# -- the pool -----------------------------------------------------------------------------

class PoolHandle(Protocol):
    """What the server needs from the pool supervisor it runs (``pool.PoolHandle``)."""

    def stop(self, drain: bool = True, timeout_s: float | None = None) -> bool: ...

    def health(self) -> dict[str, Any]: ...


def start_pool(settings: Settings) -> PoolHandle:
    """Run the scaling supervisor for this home in a thread of this process. When another
    process supervises the home already, this one stands by and takes over if it goes away."""
    from koubou_mcp import pool

    return pool.start_in_thread(settings, role="server")


# -- server state -------------------------------------------------------------------------

class StoreUnavailable(ToolError):
    """The task store is not open, or a call to it failed. The message says which and what to
    do; the REST API answers it with 503."""


@dataclass
class ServerState:
    """What the lifespan opens and the tools use."""

    settings: Settings
    store: Store | None = None
    store_error: str | None = None
    pool: PoolHandle | None = None
    pool_error: str | None = None

    def require_store(self) -> Store:
        if self.store is None:
            reason = (self.store_error or "not open").rstrip(".")
            raise StoreUnavailable(f"the task store is unavailable: {reason}. Fix it "
                                   "(koubou-mcp doctor says how) and restart the server.")
        return self.store


class KoubouServer(MCPServer[Any]):
    """MCPServer whose argument errors say what is wrong and what is accepted.

    The SDK reports a failed argument check as a raw pydantic dump (with a link, and the
    offending value in full) and silently ignores unknown arguments; a model calling a tool
    needs one plain sentence per bad argument instead, and to hear about a misspelt one.
    """

    _schemas: dict[str, dict[str, Any]] | None = None
    #: what the lifespan opens (set by ``build_server``); the HTTP routes read it too
    state: ServerState

    async def _input_schema(self, name: str) -> dict[str, Any] | None:
        if self._schemas is None:
            self._schemas = {t.name: t.input_schema for t in await self.list_tools()}
        return self._schemas.get(name)

    async def call_tool(self, name: str, arguments: dict[str, Any],
                        context: Context[Any, Any] | None = None) -> Any:
        schema = await self._input_schema(name)
        if schema is not None:
            known = schema.get("properties", {})
            unknown = sorted(set(arguments) - set(known))
            if unknown:
                raise ToolError(
                    f"Error executing tool {name}: unknown argument(s) {', '.join(unknown)}; "
                    f"{name} accepts {', '.join(known)}"
                )
        try:
            return await super().call_tool(name, arguments, context)
        except ToolError as exc:
            if schema is not None and isinstance(exc.__cause__, ValidationError):
                raise ToolError(explain_validation(name, exc.__cause__, schema)) from None
            raise


def explain_validation(tool: str, error: ValidationError, schema: dict[str, Any]) -> str:
    """One sentence per bad argument: what is wrong, what was given, what is accepted."""
    properties = schema.get("properties", {})
    seen: dict[str, str] = {}
    for item in error.errors(include_url=False):
        field = str(item["loc"][0]) if item["loc"] else "arguments"
        if field in seen:
            continue  # a union reports once per branch; the first says enough
        if item["type"] == "missing":
            problem = "is required"
        else:
            problem = f"is invalid: {item['msg']} (got {_short(item.get('input'))})"
        accepted = describe_schema(properties.get(field, {}))
        seen[field] = f"{field} {problem}" + (f"; accepted: {accepted}" if accepted else "")
    return f"Error executing tool {tool}: " + ". ".join(seen.values())


def describe_schema(prop: dict[str, Any]) -> str:
    """A JSON schema property in words: 'an integer from 1 to 10 (default 5)'."""
    if "anyOf" in prop:
        words = " or ".join(describe_schema(p) for p in prop["anyOf"])
    elif "enum" in prop:
        words = "one of " + ", ".join(json.dumps(v) for v in prop["enum"])
    else:
        kind = prop.get("type")
        words = {"integer": "an integer", "number": "a number", "string": "a string",
                 "boolean": "true or false", "null": "null", "array": "a list",
                 "object": "an object"}.get(str(kind), str(kind or "a value"))
        if kind in ("integer", "number"):
            if "exclusiveMinimum" in prop:
                words += f" greater than {prop['exclusiveMinimum']:g}"
            elif "minimum" in prop:
                words += f" from {prop['minimum']:g}"
            if "maximum" in prop:
                words += f" {'to' if 'minimum' in prop else 'up to'} {prop['maximum']:g}"
        if kind == "string":
            short, long_ = prop.get("minLength"), prop.get("maxLength")
            if short and long_:
                words = f"a non-empty string of at most {long_} characters"
            elif long_:
                words += f" of at most {long_} characters"
    if "default" in prop:
        words += f" (default {json.dumps(prop['default'])})"
    return words


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, default=repr) if not isinstance(value, float) else repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


# -- rendering ----------------------------------------------------------------------------

def _next_step(task: TaskSnapshot) -> str:
    if task.status == TaskStatus.COMPLETED.value:
        return "done: the result is in `result`"
    if task.status == TaskStatus.FAILED.value:
        return "failed: read `error`; fix the prompt or the backend and delegate again"
    if task.status == TaskStatus.CANCELLED.value:
        return "cancelled: nothing more will happen"
    return (f"still {task.status}: call get_status(task_id={task.task_id!r}) later for the "
            "result (the task goes on without you)")


def _headline(record: dict[str, Any]) -> str:
    parts = [f"{record['task_id']}: {record['status']}", f"type={record['type']}",
             f"priority={record['priority']}", f"attempts={record['attempts']}"]
    if record.get("worker_id"):
        parts.append(f"worker={record['worker_id']}")
    if record.get("duration_s") is not None:
        parts.append(f"ran {record['duration_s']:g} s")
    return "  ".join(parts)


def _render(record: dict[str, Any], next_step: str | None = None) -> str:
    lines = [_headline(record)]
    if record.get("error") and record["status"] != TaskStatus.COMPLETED.value:
        lines.append(f"error: {record['error']}")
    if next_step and record["status"] not in (TaskStatus.COMPLETED.value,):
        lines.append(next_step)
    text = "\n".join(lines)
    if record.get("result") is not None:
        text += "\n\n" + record["result"]
    return text


def _result(model: BaseModel, text: str) -> CallToolResult:
    """Structured content for programs, readable text (the result verbatim) for the model."""
    return CallToolResult(content=[TextContent(type="text", text=text)],
                          structured_content=model.model_dump(mode="json"))


# -- the store, off the event loop --------------------------------------------------------

T = TypeVar("T")


async def in_thread(fn: Callable[..., T], *args: Any) -> T:
    """Run a store call in a worker thread. A database failure becomes a ToolError that says
    what failed (instead of the SDK's bare "Error executing tool")."""
    try:
        return await anyio.to_thread.run_sync(fn, *args)
    except SQLAlchemyError as exc:
        detail = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        log.error("store call %s failed: %s", getattr(fn, "__name__", fn), detail)
        raise StoreUnavailable(f"the task store failed: {detail}; read koubou://health or "
                               "run `koubou-mcp doctor`") from None


# -- waiting ------------------------------------------------------------------------------

ProgressFn = Callable[[queue.Progress, float], Awaitable[None]]


async def wait_for_task(store: Store, task_id: str, wait_s: float,
                        on_progress: ProgressFn | None = None, *,
                        poll_s: float = SYNC_POLL_S,
                        progress_every_s: float = PROGRESS_EVERY_S) -> tuple[TaskSnapshot, float]:
    """Watch a task until it ends or ``wait_s`` passes; return it and the time waited.

    Calls ``on_progress(task, elapsed)`` about every ``progress_every_s`` while waiting.
    """
    start = anyio.current_time()
    next_report = start + progress_every_s
    delay = min(SYNC_FIRST_POLL_S, poll_s)
    while True:
        # poll the light status only; the full record is read once, at the end
        progress = await in_thread(queue.task_progress, store, task_id)
        now = anyio.current_time()
        elapsed = now - start
        if progress.status in FINAL_STATUSES or elapsed >= wait_s:
            return await in_thread(queue.get_task, store, task_id), elapsed
        if on_progress is not None and now >= next_report:
            await on_progress(progress, elapsed)
            next_report = now + progress_every_s
        await anyio.sleep(max(0.0, min(delay, wait_s - elapsed, next_report - now)))
        delay = min(delay * 1.5, poll_s)


def _progress_message(task: queue.Progress, elapsed: float, wait_s: float) -> str:
    where = f" on {task.worker_id}" if task.worker_id and task.status != "pending" else ""
    return (f"{task.task_id} {task.status}{where}, {elapsed:.0f} s elapsed "
            f"(waiting up to {wait_s:g} s)")


# -- shared by the tools and the REST API -------------------------------------------------

async def submit(store: Store, settings: Settings, request: queue.TaskRequest, *,
                 wait_s: float | None = None,
                 on_progress: ProgressFn | None = None) -> DelegateResult:
    """Queue a validated request; with ``wait_s``, wait up to that long for it to end (a sync
    delegate). What ``delegate_task`` and ``POST /task/delegate`` answer."""
    enqueued = await in_thread(lambda: queue.enqueue(store, request, settings, utcnow()))
    task, waited = enqueued.task, None
    if wait_s is not None:
        task, elapsed = await wait_for_task(store, task.task_id, wait_s, on_progress)
        waited = round(elapsed, 3)
    record = queue.task_record(task, include_prompt=False)
    return DelegateResult(
        task_id=task.task_id, status=record["status"], type=record["type"],
        priority=task.priority, created=enqueued.created, result=task.result,
        error=task.error, worker_id=task.worker_id, attempts=task.attempts,
        duration_s=record["duration_s"], waited_s=waited, next_step=_next_step(task),
    )


def default_wait_s(settings: Settings) -> float:
    """How long a sync delegate waits when the caller does not say, s."""
    return min(settings.sync_wait_s, MAX_SYNC_WAIT_S)


async def health_document(state: ServerState, pool: bool) -> dict[str, Any]:
    """The ``koubou://health`` document (``GET /health`` too)."""
    supervisor = None
    if state.pool is not None:
        supervisor = await anyio.to_thread.run_sync(state.pool.health)
    document = await health.collect_health(
        state.settings, state.store, supervisor=supervisor, store_error=state.store_error,
        pool_error=state.pool_error)
    document["server"] = {"pid": os.getpid(), "pool": "in this process" if pool
                          else "not started (--no-pool)"}
    return document


# -- the server ---------------------------------------------------------------------------

def build_server(settings: Settings, *, pool: bool = True) -> KoubouServer:
    """The MCP server for ``settings``. With ``pool``, its lifespan starts (or joins) the
    worker pool for this home; without, it is the front end only."""
    state = ServerState(settings)

    @asynccontextmanager
    async def lifespan(_server: MCPServer[Any]) -> AsyncIterator[ServerState]:
        try:
            state.store = await anyio.to_thread.run_sync(
                open_store, settings.database_url, settings.run_dir)
        except StoreError as exc:
            state.store_error = str(exc)
            log.error("cannot open the task store: %s", exc)
        if pool and state.store is not None:
            try:
                state.pool = await anyio.to_thread.run_sync(start_pool, settings)
            except Exception as exc:  # serve anyway: health and every status call still work
                state.pool_error = f"{type(exc).__name__}: {exc}"
                log.exception("cannot start the worker pool")
        try:
            log.info("koubou-mcp %s serving (home %s, pool %s)", __version__, settings.home,
                     "on" if state.pool else "off")
            yield state
        finally:
            with anyio.CancelScope(shield=True):
                await _shutdown(state)

    default_wait = default_wait_s(settings)
    server = KoubouServer(
        "koubou",
        title="koubou: delegate work to local models",
        instructions=instructions(default_wait),
        version=__version__,
        lifespan=lifespan,
    )
    server.state = state

    @server.tool(
        title="Delegate a task to a local model",
        annotations=ToolAnnotations(read_only_hint=False, destructive_hint=False,
                                    idempotent_hint=False, open_world_hint=False),
    )
    async def delegate_task(
        prompt: Annotated[str, Field(
            description="everything the local model needs: it sees nothing else",
            json_schema_extra={"minLength": 1, "maxLength": settings.max_prompt_chars},
        )],
        ctx: Context[Any, Any],
        type: Annotated[TaskType, Field(
            description="general: Ollama model (text, summaries, drafts); code: Codex CLI "
                        "working in the configured directory")] = "general",
        priority: Annotated[int, Field(ge=PRIORITY_MIN, le=PRIORITY_MAX), NotBool, Field(
            description="higher runs first")] = 5,
        sync: Annotated[bool, Field(
            description="wait for the result (up to wait_s) instead of returning at once"
        )] = False,
        timeout_s: Annotated[Annotated[float, Field(
            gt=0, le=settings.max_timeout_s, allow_inf_nan=False), NotBool] | None, Field(
            description=f"time limit of one run, s (default {settings.general_timeout_s:g} "
                        f"for general, {settings.code_timeout_s:g} for code)")] = None,
        wait_s: Annotated[Annotated[float, Field(
            ge=0, le=MAX_SYNC_WAIT_S, allow_inf_nan=False), NotBool] | None, Field(
            description=f"sync only: longest wait for the result, s (default "
                        f"{default_wait:g}); the task goes on after it")] = None,
        idempotency_key: Annotated[str | None, Field(
            max_length=queue.MAX_IDEMPOTENCY_KEY,
            description="retrying with the same key returns the unfinished task instead of "
                        "adding a duplicate")] = None,
    ) -> Annotated[CallToolResult, DelegateResult]:
        """Queue a prompt for a local model. Async by default: returns a task_id at once;
        poll get_status. With sync=true, waits for the result (sending progress) and returns
        it; if the wait runs out, returns the current status and the task goes on."""
        store = state.require_store()
        try:
            request = queue.validate_request(settings, prompt, type, priority, timeout_s,
                                             idempotency_key)
        except queue.InvalidTask as exc:
            raise ToolError(str(exc)) from None
        limit = (default_wait if wait_s is None else wait_s) if sync else None

        async def progress(current: queue.Progress, elapsed: float) -> None:
            await ctx.report_progress(round(elapsed, 1), limit,
                                      _progress_message(current, elapsed, limit or 0.0))

        result = await submit(store, settings, request, wait_s=limit, on_progress=progress)
        prefix = "" if result.created else "(an unfinished task with this idempotency_key " \
                                           "already existed)\n"
        return _result(result, prefix + _render(result.model_dump(mode="json"),
                                                result.next_step))

    @server.tool(
        title="Get a delegated task's status and result",
        annotations=ToolAnnotations(read_only_hint=True, open_world_hint=False),
    )
    async def get_status(
        task_id: TaskId,
        include_prompt: Annotated[bool, Field(
            description="also return the prompt (it can be long)")] = False,
    ) -> Annotated[CallToolResult, TaskRecord]:
        """The full record of a task: status, result, error, attempts, worker, timestamps."""
        store = state.require_store()
        try:
            task = await in_thread(queue.get_task, store, task_id)
        except queue.TaskNotFound as exc:
            raise ToolError(str(exc)) from None
        record = queue.task_record(task, include_prompt=include_prompt)
        return _result(TaskRecord(**record), _render(record, _next_step(task)))

    @server.tool(
        title="List delegated tasks",
        annotations=ToolAnnotations(read_only_hint=True, open_world_hint=False),
    )
    async def list_tasks(
        status: Annotated[StatusName | None, Field(
            description="only tasks in this status")] = None,
        limit: Annotated[int, Field(ge=1, le=MAX_LIST_LIMIT), NotBool] = 20,
    ) -> TaskList:
        """Tasks, newest first, with counts by status. Results are left out: get_status has
        them."""
        store = state.require_store()

        def read() -> tuple[list[TaskSnapshot], dict[str, int]]:
            return queue.list_tasks(store, status, limit), queue.counts_by_status(store)

        tasks, counts = await in_thread(read)
        return TaskList(tasks=[task_summary(t) for t in tasks], counts=counts)

    @server.tool(
        title="Cancel a delegated task",
        annotations=ToolAnnotations(read_only_hint=False, destructive_hint=True,
                                    idempotent_hint=True, open_world_hint=False),
    )
    async def cancel_task(task_id: TaskId) -> Annotated[CallToolResult, TaskRecord]:
        """Cancel a pending task at once, or ask the worker running it to stop (within about
        a second). Completed and failed tasks cannot be cancelled."""
        store = state.require_store()
        try:
            task = await in_thread(lambda: queue.cancel(store, task_id, utcnow()))
        except (queue.TaskNotFound, queue.TaskStateError) as exc:
            raise ToolError(str(exc)) from None
        record = queue.task_record(task, include_prompt=False)
        note = ("cancelled" if task.status == TaskStatus.CANCELLED.value else
                "cancel requested: its worker stops it within about a second")
        return _result(TaskRecord(**record), f"{_headline(record)}\n{note}")

    @server.resource("koubou://health", name="health", mime_type="application/json",
                     title="koubou health",
                     description="ok/degraded/down; database, pool and workers, queue depth, "
                                 "Ollama and Codex, each with the reason when not ok")
    async def health_resource() -> str:
        return json.dumps(await health_document(state, pool), indent=2)

    @server.resource("koubou://stats", name="stats", mime_type="application/json",
                     title="koubou statistics",
                     description="tasks by status, queue depth, average run and wait times, "
                                 "per-worker counters")
    async def stats_resource() -> str:
        if state.store is None:
            raise ResourceError(f"the task store is unavailable: {state.store_error}")
        stats = await anyio.to_thread.run_sync(queue.stats, state.store)
        return json.dumps(stats.as_dict(), indent=2)

    @server.resource("koubou://tasks/{task_id}", name="task", mime_type="application/json",
                     title="A delegated task",
                     description="the full record of one task, prompt included")
    async def task_resource(task_id: str) -> str:
        if state.store is None:
            raise ResourceError(f"the task store is unavailable: {state.store_error}")
        try:
            task = await anyio.to_thread.run_sync(queue.get_task, state.store, task_id)
        except queue.TaskNotFound as exc:
            raise ResourceNotFoundError(str(exc)) from None
        return json.dumps(queue.task_record(task), indent=2)

    return server


def task_summary(task: TaskSnapshot) -> TaskSummary:
    record = queue.task_record(task, include_prompt=False)
    preview = " ".join(task.prompt.split())
    return TaskSummary(
        task_id=task.task_id, type=record["type"], status=record["status"],
        priority=task.priority, prompt_preview=preview[:80] + ("…" if len(preview) > 80 else ""),
        has_result=task.result is not None, error=task.error, worker_id=task.worker_id,
        attempts=task.attempts, created_at=record["created_at"],
        finished_at=record["finished_at"], duration_s=record["duration_s"],
    )


async def _shutdown(state: ServerState) -> None:
    """Stop what the lifespan started, quickly: the client kills us about 2 s after closing
    stdin. Every worker is told to drain; idle ones exit at once, busy ones finish their task
    (or give it back after ``drain_grace_s``) and exit by themselves, in their own sessions,
    after this process is gone. No task is lost either way."""
    if state.pool is not None:
        pool, state.pool = state.pool, None
        try:
            stopped = await anyio.to_thread.run_sync(
                lambda: pool.stop(drain=True, timeout_s=POOL_STOP_WAIT_S))
            if not stopped:
                log.info("busy workers go on draining after the server exits")
        except Exception:
            log.exception("stopping the pool failed")
    if state.store is not None:
        store, state.store = state.store, None
        store.close()
    log.info("koubou-mcp server stopped")


# -- running ------------------------------------------------------------------------------

def run_server(settings: Settings, *, pool: bool = True, transport: str = "stdio",
               host: str = "127.0.0.1", port: int = 8765) -> None:
    """Serve MCP on stdio (what Claude Code starts) or streamable HTTP until the client goes
    away or a stop signal arrives."""
    if transport == "stdio":
        server = build_server(settings, pool=pool)
        anyio.run(_serve_until_signal, server.run_stdio_async)
    elif transport == "streamable-http":
        serve_http(settings, pool=pool, host=host, port=port)
    else:
        raise ValueError(f"unknown transport {transport!r}; use stdio or streamable-http")


# -- over HTTP ----------------------------------------------------------------------------

#: After a stop signal, how long open HTTP requests (a sync wait, an MCP stream) may go on, s
HTTP_DRAIN_S = 3.0


def _http_api() -> Any:
    """The HTTP modules, or a ConfigError saying which extra to install."""
    try:
        import uvicorn  # noqa: F401

        from koubou_mcp import http_api
    except ImportError as exc:  # prometheus_client and uvicorn are in the `http` extra
        raise ConfigError(f"the HTTP transport needs {exc.name}, which is not installed: "
                          "pip install 'koubou-mcp[http]'") from None
    return http_api


def build_http_app(settings: Settings, *, pool: bool = True) -> Any:
    """One ASGI application for the HTTP transport: MCP at ``/mcp`` and the REST API and
    ``/metrics`` (``http_api``) beside it, on one Starlette app whose lifespan is the MCP
    server's, all behind ``http_api.Guard`` (token or loopback checks, body size limit)."""
    http_api = _http_api()
    from mcp.server.transport_security import TransportSecuritySettings
    from starlette.exceptions import HTTPException

    server = build_server(settings, pool=pool)
    state = server.state
    api = http_api.RestApi(state, lambda: health_document(state, pool))
    for endpoint in api.endpoints():
        server.custom_route(endpoint.path, endpoint.methods)(endpoint.handler)
    limit = http_api.max_body_bytes(settings)
    app = server.streamable_http_app(
        max_request_body_size=limit,
        # the Guard checks Host and Origin for every route (the SDK's check covers only /mcp,
        # and would refuse a reverse proxy's Host even when a token protects the server)
        transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False),
    )
    app.add_exception_handler(HTTPException, http_api.http_error)
    return http_api.Guard(app, token=settings.http_token, max_body=limit)


def serve_http(settings: Settings, *, pool: bool, host: str, port: int) -> None:
    """Serve the HTTP transport until SIGTERM/SIGINT/SIGHUP (a second one forces).

    Refuses (ConfigError) to bind a non-loopback address without ``KOUBOU_HTTP_TOKEN``, and
    binds before anything starts, so a port in use is reported before a pool is spawned.
    """
    http_api = _http_api()
    import uvicorn

    http_api.check_bind(host, settings.http_token)
    app = build_http_app(settings, pool=pool)
    sock = _listen(host, port)
    config = uvicorn.Config(
        app, log_config=None, log_level=settings.log_level.lower(), lifespan="on", ws="none",
        access_log=settings.log_level == "DEBUG", server_header=False,
        timeout_graceful_shutdown=int(HTTP_DRAIN_S),
    )
    where = f"[{host}]" if ":" in host else host
    log.info("serving MCP at http://%s:%d/mcp, the REST API and /metrics (%s)", where, port,
             "bearer token required" if settings.http_token else "loopback only, no token")
    try:
        anyio.run(_serve_uvicorn, config, sock)
    finally:
        sock.close()


async def _serve_uvicorn(config: Any, sock: Any) -> None:
    """Run uvicorn on ``sock``, stopping on SIGTERM/SIGINT/SIGHUP like the stdio server: the
    first signal drains (open requests get ``HTTP_DRAIN_S``, then the lifespan stops the pool),
    a second one forces. uvicorn's own handling would re-raise the signal after a clean
    shutdown, so the process would seem killed; here it exits 0."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield  # the watcher below handles the signals

    server = Server(config)
    async with anyio.create_task_group() as tg:
        async def watch() -> None:
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT,
                                            signal.SIGHUP) as signals:
                async for signum in signals:
                    name = signal.Signals(signum).name
                    if server.should_exit:
                        log.warning("received %s again: stopping now", name)
                        server.force_exit = True
                        continue
                    log.info("received %s: shutting down", name)
                    server.should_exit = True
                    _arm_watchdog(HTTP_DRAIN_S + SHUTDOWN_GRACE_S + 5.0)

        tg.start_soon(watch)
        await server.serve(sockets=[sock])
        tg.cancel_scope.cancel()


def _listen(host: str, port: int) -> Any:
    import socket

    sock = None
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        if sock is not None:
            sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; is another "
                          "server using it? Choose another --port (KOUBOU_HTTP_PORT) or "
                          "--host (KOUBOU_HTTP_HOST)") from None
    sock.setblocking(False)
    return sock


async def _serve_until_signal(serve: Callable[[], Awaitable[None]]) -> None:
    """Run ``serve``; on SIGTERM/SIGINT/SIGHUP stop it (its lifespan cleans up).

    The stdio transport reads stdin in a thread that a cancellation cannot interrupt; should
    stdin stay open after a stop signal, a watchdog ends the process once the lifespan has had
    ``SHUTDOWN_GRACE_S`` to clean up.
    """
    async with anyio.create_task_group() as tg:
        async def watch() -> None:
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT,
                                            signal.SIGHUP) as signals:
                async for signum in signals:
                    log.info("received %s: shutting down", signal.Signals(signum).name)
                    _arm_watchdog(SHUTDOWN_GRACE_S)
                    tg.cancel_scope.cancel()
                    return

        tg.start_soon(watch)
        await serve()
        tg.cancel_scope.cancel()


def _arm_watchdog(delay_s: float) -> None:
    def expire() -> None:
        log.warning("shutdown took longer than %.1f s; exiting now", delay_s)
        for handler in logging.getLogger().handlers:
            with suppress(Exception):
                handler.flush()
        with suppress(Exception):
            sys.stderr.flush()
        os._exit(0)

    timer = threading.Timer(delay_s, expire)
    timer.daemon = True
    timer.start()


__all__ = [
    "MAX_SYNC_WAIT_S", "instructions", "DelegateResult", "KoubouServer", "ServerState",
    "StoreUnavailable", "TaskList", "TaskRecord", "TaskSummary", "build_http_app",
    "build_server", "default_wait_s", "describe_schema", "explain_validation",
    "health_document", "run_server", "serve_http", "start_pool", "submit", "task_summary",
    "wait_for_task",
]
