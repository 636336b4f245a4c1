"""The MCP server: six tools and three resources over :mod:`koubou_mcp.service`.

A thin layer: the SDK checks each argument's type against the tool's input schema (and
``KoubouServer`` turns its failures into one plain sentence per argument), the service does
the work, and its results and errors are translated into structured tool results and
``ToolError``/``ResourceError``. The tools are plain module-level functions; each reads the
:class:`~koubou_mcp.service.Service` from the lifespan context of its request.

This module deliberately does not use ``from __future__ import annotations``: the tool
signatures carry limits taken from the settings (the longest prompt, the largest timeout),
set per server by ``build_server``; as strings, the SDK would evaluate them in module scope.

Nothing may reach stdout but JSON-RPC: the SDK's stdio transport points fd 1 at stderr while it
serves, so stray prints and the children we start cannot corrupt the protocol stream. Running
the transports (stdio, Streamable HTTP), signals and shutdown live in ``serve.py``.
"""

import functools
import inspect
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from typing import Annotated, Any, Literal, TypeVar

import anyio
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ResourceError, ResourceNotFoundError, ToolError
from mcp_types import CallToolResult, TextContent, ToolAnnotations
from pydantic import BaseModel, Field, ValidationError

from koubou_mcp import __version__, queue
from koubou_mcp.config import PRIORITY_MAX, PRIORITY_MIN, Settings
from koubou_mcp.models import TaskStatus
from koubou_mcp.prompts import PROMPTS
from koubou_mcp.results import StatusName, TaskTypeName, WaitResult
from koubou_mcp.service import (
    MAX_BATCH_TASKS,
    MAX_LIST_LIMIT,
    MAX_SYNC_WAIT_S,
    MAX_WAIT_TASKS,
    DelegateResult,
    Service,
    ServiceError,
    TaskList,
    TaskNotFound,
    TaskRecord,
    default_wait_s,
    next_step,
)
from koubou_mcp.tool_args import (
    BATCH_ITEM_SCHEMA,
    DelegateBatch,
    FilesArg,
    ModelArg,
    NotBool,
    OptionsArg,
    SchemaArg,
    SystemArg,
    TaskId,
    WorkdirArg,
    instructions,
    many_message,
    progress_message,
    prompt_type,
    timeout_type,
    wait_many_type,
    wait_type,
)

log = logging.getLogger("koubou_mcp.server")
T = TypeVar("T")


# -- argument errors in words ---------------------------------------------------------------

class KoubouServer(MCPServer[Any]):
    """MCPServer whose argument errors say what is wrong and what is accepted.

    The SDK reports a failed argument check as a raw pydantic dump (with a link, and the
    offending value in full) and silently ignores unknown arguments; a model calling a tool
    needs one plain sentence per bad argument instead, and to hear about a misspelt one.
    """

    _schemas: dict[str, dict[str, Any]] | None = None
    #: what the lifespan starts and stops (set by ``build_server``)
    service: Service

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


def _with_settings(fn: Callable[..., Any], settings: Settings) -> Callable[..., Any]:
    """``fn`` as registered on a server for ``settings``: the parameters whose limits come
    from the settings get them in their annotations, so the input schema
    publishes them and the SDK checks them (the domain rules are the service's)."""
    bound = {"prompt": prompt_type(settings), "timeout_s": timeout_type(settings),
             "wait_s": wait_type(default_wait_s(settings))}
    if fn is wait_tasks:
        bound["wait_s"] = wait_many_type(default_wait_s(settings))

    @functools.wraps(fn)
    async def tool(*args: Any, **kwargs: Any) -> Any:
        return await fn(*args, **kwargs)

    signature = inspect.signature(fn)
    parameters = [p.replace(annotation=bound[p.name]) if p.name in bound else p
                  for p in signature.parameters.values()]
    tool.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
    tool.__annotations__ = {**fn.__annotations__,
                            **{name: bound[name] for name in signature.parameters
                               if name in bound}}
    return tool


def tool_description(fn: Callable[..., Any]) -> str:
    """``fn``'s docstring as a client shows it: no source indentation, each paragraph on one
    line (the SDK passes a docstring on as it is written)."""
    paragraphs = inspect.cleandoc(fn.__doc__ or "").split("\n\n")
    return "\n\n".join(" ".join(p.split()) for p in paragraphs)


# -- translating --------------------------------------------------------------------------

def service_of(ctx: Context[Any, Any]) -> Service:
    """The service the lifespan started, from the request's context."""
    service = ctx.request_context.lifespan_context
    assert isinstance(service, Service), service
    return service


@contextmanager
def _tool_errors() -> Iterator[None]:
    """The service's errors as tool errors: their message is the whole answer."""
    try:
        yield
    except ServiceError as exc:
        raise ToolError(str(exc)) from None


def _headline(record: TaskRecord | DelegateResult) -> str:
    parts = [f"{record.task_id}: {record.status}", f"type={record.type}",
             f"priority={record.priority}", f"attempts={record.attempts}"]
    if record.worker_id:
        parts.append(f"worker={record.worker_id}")
    if record.duration_s is not None:
        parts.append(f"ran {record.duration_s:g} s")
    return "  ".join(parts)


def _render(record: TaskRecord | DelegateResult, step: str | None = None) -> str:
    """The text the model reads: a headline, the error and next step, the result verbatim."""
    lines = [_headline(record)]
    if record.error and record.status != TaskStatus.COMPLETED:
        lines.append(f"error: {record.error}")
    if step and record.status != TaskStatus.COMPLETED:
        lines.append(step)
    text = "\n".join(lines)
    if record.result is not None:
        text += "\n\n" + record.result
    return text


def _result(model: BaseModel, text: str) -> CallToolResult:
    """Structured content for programs, readable text (the result verbatim) for the model."""
    data = model.as_json() if isinstance(model, TaskRecord | WaitResult) else \
        model.model_dump(mode="json")
    return CallToolResult(content=[TextContent(type="text", text=text)],
                          structured_content=data)


async def _while_client_stays(ctx: Context[Any, Any], tool: str,
                              call: Callable[[], Awaitable[T]]) -> T | None:
    """``call()``'s answer, or None when the HTTP client whose request carried this tool call
    goes away first (the wait stops; the tasks go on).

    Over Streamable HTTP the SDK runs a 2025-era tool call in the MCP session, not in the
    request that carried it: a client that closes that request's connection only ends the
    response stream, and a sync wait would poll the store until its wait_s ran out. So the
    request's own ``receive`` is watched: once the body is read, the next message is the
    disconnect. Over stdio there is no request (the client leaving ends the whole server).
    """
    request = getattr(ctx.request_context, "request", None)
    receive = getattr(request, "receive", None)
    if receive is None:
        return await call()
    answer: list[T] = []
    failed: Exception | None = None
    async with anyio.create_task_group() as tg:
        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            log.info("the MCP client left during %s; stopped waiting (the tasks go on)", tool)
            tg.cancel_scope.cancel()

        tg.start_soon(watch)
        try:
            answer.append(await call())
        except Exception as exc:  # raised out here, not wrapped in the group's exceptions
            failed = exc
        tg.cancel_scope.cancel()
    if failed is not None:
        raise failed
    return answer[0] if answer else None


def _client_left() -> CallToolResult:
    """The answer to a call whose client left: nobody reads it, the SDK needs one."""
    return CallToolResult(content=[TextContent(type="text", text="the client left; the "
                                               "tasks go on")], is_error=True)


async def delegate_task(
    prompt: str,
    ctx: Context[Any, Any],
    type: Annotated[TaskTypeName, Field(
        description="general: Ollama model (text, summaries, drafts); code: Codex CLI "
                    "working in the configured directory")] = "general",
    priority: Annotated[int, Field(ge=PRIORITY_MIN, le=PRIORITY_MAX), NotBool, Field(
        description="higher runs first")] = 5,
    sync: Annotated[bool, Field(
        description="wait for the result (up to wait_s) instead of returning at once"
    )] = False,
    timeout_s: float | None = None,
    wait_s: float | None = None,
    idempotency_key: Annotated[str | None, Field(
        max_length=queue.MAX_IDEMPOTENCY_KEY,
        description="retrying with the same key returns the unfinished task instead of "
                    "adding a duplicate")] = None,
    workdir: WorkdirArg = None,
    files: FilesArg = None,
    model: ModelArg = None,
    system: SystemArg = None,
    options: OptionsArg = None,
    output_schema: SchemaArg = None,
) -> Annotated[CallToolResult, DelegateResult]:
    """Queue a prompt for a local model. Async by default: returns a task_id at once;
    wait_tasks or get_status gives the result. With sync=true, waits for the result
    (sending progress) and returns it; if the wait runs out, returns the current status
    and the task goes on. Give files by path (files=[...]) rather than pasting them; for
    several tasks use delegate_tasks."""
    service = service_of(ctx)
    with _tool_errors():
        service.require_store()
        request = await service.prepare({
            "prompt": prompt, "type": type, "priority": priority, "timeout_s": timeout_s,
            "idempotency_key": idempotency_key, "workdir": workdir, "files": files,
            "model": model, "system": system, "options": options,
            "output_schema": output_schema})
        limit = (service.default_wait_s if wait_s is None else wait_s) if sync else None

        async def progress(current: queue.Progress, elapsed: float) -> None:
            await ctx.report_progress(round(elapsed, 1), limit,
                                      progress_message(current, elapsed, limit or 0.0))

        result = await _while_client_stays(
            ctx, "delegate_task", lambda: service.submit(request, wait_s=limit,
                                                         on_progress=progress))
    if result is None:
        return _client_left()
    prefix = "" if result.created else "(an unfinished task with this idempotency_key " \
                                       "already existed)\n"
    return _result(result, prefix + _render(result, result.next_step))


async def delegate_tasks(
    tasks: Annotated[list[dict[str, Any]], Field(
        min_length=1, max_length=MAX_BATCH_TASKS,
        description=f"up to {MAX_BATCH_TASKS} tasks, each an object with the fields of "
                    "delegate_task (prompt required; type, priority, timeout_s, "
                    "idempotency_key, workdir, files, model, system, options, output_schema)",
        json_schema_extra={"items": BATCH_ITEM_SCHEMA})],
    ctx: Context[Any, Any],
) -> Annotated[CallToolResult, DelegateBatch]:
    """Queue several tasks at once (fan out): every task is checked first and all are
    stored in one go, or none (the error names the index and reason of the first bad one).
    Returns the task ids in order at once; they run in parallel. Then call wait_tasks with
    the ids to get the results in one call."""
    service = service_of(ctx)
    with _tool_errors():
        service.require_store()
        requests = await service.prepare_batch(tasks)
        results = await service.submit_many(requests)
    batch = DelegateBatch(task_ids=[r.task_id for r in results], tasks=results,
                          next_step=f"wait_tasks(task_ids=[...{len(results)} ids]) returns "
                                    "their results when they end")
    lines = [f"queued {len(results)} task(s):"] + [
        f"- {r.task_id}: {r.status}" + ("" if r.created else " (existing, same idempotency_key)")
        for r in results]
    return _result(batch, "\n".join(lines + [batch.next_step]))


async def wait_tasks(
    task_ids: Annotated[list[str], Field(
        min_length=1, max_length=MAX_WAIT_TASKS,
        description="ids from delegate_task / delegate_tasks")],
    ctx: Context[Any, Any],
    mode: Annotated[Literal["all", "any"], Field(
        description="all: return when every task ended; any: as soon as one did")] = "all",
    wait_s: float | None = None,
) -> Annotated[CallToolResult, WaitResult]:
    """Wait until all (or any) of the tasks end, sending progress meanwhile, and return
    their records, results included. Bounded by wait_s: when it runs out the tasks go on
    and unfinished lists the ids to wait on again. An unknown id is an error."""
    service = service_of(ctx)
    limit = service.default_wait_s if wait_s is None else wait_s

    async def progress(current: list[queue.Progress], elapsed: float) -> None:
        await ctx.report_progress(round(elapsed, 1), limit,
                                  many_message(current, elapsed, limit, mode))

    with _tool_errors():
        waited = await _while_client_stays(
            ctx, "wait_tasks", lambda: service.wait_many(task_ids, mode, limit, progress))
    if waited is None:
        return _client_left()
    parts = [f"{len(waited.ended)} of {len(waited.tasks)} ended after {waited.waited_s:g} s "
             f"(mode {mode}); {waited.next_step}"]
    parts += [_render(record, next_step(record)) for record in waited.tasks]
    return _result(waited, "\n\n---\n".join(parts))


async def get_status(
    task_id: TaskId,
    ctx: Context[Any, Any],
    include_prompt: Annotated[bool, Field(
        description="also return the prompt (it can be long)")] = False,
) -> Annotated[CallToolResult, TaskRecord]:
    """The full record of a task: status, result, error, attempts, worker, timestamps."""
    with _tool_errors():
        record = await service_of(ctx).read(task_id, include_prompt=include_prompt)
    return _result(record, _render(record, next_step(record)))


async def list_tasks(
    ctx: Context[Any, Any],
    status: Annotated[StatusName | None, Field(
        description="only tasks in this status")] = None,
    limit: Annotated[int, Field(ge=1, le=MAX_LIST_LIMIT), NotBool] = 20,
) -> TaskList:
    """Tasks, newest first, with counts by status. Results are left out: get_status has
    them."""
    with _tool_errors():
        return await service_of(ctx).list_tasks(status, limit)


async def cancel_task(task_id: TaskId,
                      ctx: Context[Any, Any]) -> Annotated[CallToolResult, TaskRecord]:
    """Cancel a pending task at once, or ask the worker running it to stop (within about
    a second). Completed and failed tasks cannot be cancelled."""
    with _tool_errors():
        record = await service_of(ctx).cancel(task_id)
    note = ("cancelled" if record.status == TaskStatus.CANCELLED else
            "cancel requested: its worker stops it within about a second")
    return _result(record, f"{_headline(record)}\n{note}")


#: name → (the function, its title, its annotations)
TOOLS: dict[str, tuple[Callable[..., Awaitable[Any]], str, ToolAnnotations]] = {
    "delegate_task": (delegate_task, "Delegate a task to a local model", ToolAnnotations(
        read_only_hint=False, destructive_hint=False, idempotent_hint=False,
        open_world_hint=False)),
    "delegate_tasks": (delegate_tasks, "Delegate several tasks at once", ToolAnnotations(
        read_only_hint=False, destructive_hint=False, idempotent_hint=False,
        open_world_hint=False)),
    "wait_tasks": (wait_tasks, "Wait for delegated tasks and get their results",
                   ToolAnnotations(read_only_hint=True, open_world_hint=False)),
    "get_status": (get_status, "Get a delegated task's status and result", ToolAnnotations(
        read_only_hint=True, open_world_hint=False)),
    "list_tasks": (list_tasks, "List delegated tasks", ToolAnnotations(
        read_only_hint=True, open_world_hint=False)),
    "cancel_task": (cancel_task, "Cancel a delegated task", ToolAnnotations(
        read_only_hint=False, destructive_hint=True, idempotent_hint=True,
        open_world_hint=False)),
}


# -- the resources ------------------------------------------------------------------------

async def health_resource(service: Service) -> str:
    return json.dumps(await service.health(), indent=2)


async def stats_resource(service: Service) -> str:
    try:
        return json.dumps(await service.stats(), indent=2)
    except ServiceError as exc:
        raise ResourceError(str(exc)) from None


async def task_resource(task_id: str, ctx: Context[Any, Any]) -> str:
    try:
        record = await service_of(ctx).read(task_id, include_prompt=True)
    except TaskNotFound as exc:
        raise ResourceNotFoundError(str(exc)) from None
    except ServiceError as exc:
        raise ResourceError(str(exc)) from None
    return json.dumps(record.as_json(), indent=2)


# -- the server ---------------------------------------------------------------------------

@asynccontextmanager
async def _lifespan(server: MCPServer[Any]) -> AsyncIterator[Service]:
    assert isinstance(server, KoubouServer)
    service = server.service
    await service.start()
    try:
        log.info("koubou-mcp %s serving (home %s, pool %s)", __version__,
                 service.settings.home, "on" if service.pool else "off")
        yield service
    finally:
        with anyio.CancelScope(shield=True):
            await service.stop()
        log.info("koubou-mcp server stopped")
        # only now: the stdio watchdog ends the process at once when this is set, and the
        # line above would race it
        service.stopped.set()


def build_server(settings: Settings, *, pool: bool = True,
                 service: Service | None = None) -> KoubouServer:
    """The MCP server for ``settings`` over ``service`` (a new one by default). With
    ``pool``, its lifespan starts (or joins) the worker pool for this home; without, it is
    the front end only."""
    service = service if service is not None else Service(settings, run_pool=pool)
    server = KoubouServer(
        "koubou",
        title="koubou: delegate work to local models",
        instructions=instructions(service.default_wait_s),
        version=__version__,
        lifespan=_lifespan,
    )
    server.service = service
    for name, (fn, title, annotations) in TOOLS.items():
        server.add_tool(_with_settings(fn, settings), name=name, title=title,
                        description=tool_description(fn), annotations=annotations)
    for name, (prompt_fn, title) in PROMPTS.items():
        server.prompt(name=name, title=title,
                      description=tool_description(prompt_fn))(prompt_fn)
    server.resource("koubou://health", name="health", mime_type="application/json",
                    title="koubou health",
                    description="ok/degraded/down; database, pool and workers, queue depth, "
                                "Ollama and Codex, each with the reason when not ok",
                    )(functools.partial(health_resource, service))
    server.resource("koubou://stats", name="stats", mime_type="application/json",
                    title="koubou statistics",
                    description="tasks by status, queue depth, average run and wait times, "
                                "per-worker counters",
                    )(functools.partial(stats_resource, service))
    server.resource("koubou://tasks/{task_id}", name="task", mime_type="application/json",
                    title="A delegated task",
                    description="the full record of one task, prompt included")(task_resource)
    return server


Route = tuple[str, list[str], Callable[[Any], Awaitable[Any]]]


def http_app(server: KoubouServer, routes: Sequence[Route], *, max_body: int,
             session_idle_s: float | None = None) -> Any:
    """The Starlette application serving MCP at ``/mcp`` and ``routes`` (path, methods,
    handler) beside it; its lifespan is the server's. The SDK's Host/Origin check is off:
    the caller's guard checks them for every route (the SDK's covers only /mcp, and would
    refuse a reverse proxy's Host even when a token protects the server)."""
    from mcp.server.transport_security import TransportSecuritySettings

    for path, methods, handler in routes:
        server.custom_route(path, methods)(handler)
    return server.streamable_http_app(
        max_request_body_size=max_body,
        # a session nobody uses for this long is closed (the SDK's default is 30 minutes)
        session_idle_timeout=session_idle_s if session_idle_s is not None else 30 * 60,
        transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False),
    )


__all__ = [
    "MAX_SYNC_WAIT_S", "TOOLS", "KoubouServer", "build_server", "cancel_task", "delegate_task",
    "delegate_tasks", "describe_schema", "wait_tasks",
    "explain_validation", "get_status", "http_app", "instructions", "list_tasks", "service_of",
    "tool_description",
]
