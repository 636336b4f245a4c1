"""What the MCP tools accept and say, without the MCP SDK: the argument types (their limits
and descriptions become the tools' input schemas; the service checks the rules), the server's
instructions, the batch result and the progress lines. ``server.py`` registers the tools.
"""

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, Field
from pydantic_core import PydanticCustomError

from koubou_mcp import queue
from koubou_mcp.config import PRIORITY_MAX, PRIORITY_MIN, Settings
from koubou_mcp.models import FINAL_STATUSES, TaskStatus
from koubou_mcp.results import DelegateResult
from koubou_mcp.service import MAX_SYNC_WAIT_S
from koubou_mcp.taskfields import MAX_MODEL_CHARS, OPTIONS
from koubou_mcp.taskfiles import MAX_FILES


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
- Pass files instead of pasting them: delegate_task(prompt, files=["src/app.py"]) has the \
worker read them (relative to workdir, default this server's directory) when the task runs \
and hand each to the model under a header; your context pays only for the paths.
- Short tasks (under a minute): delegate_task(prompt, sync=true) waits up to wait_s (default \
{default_wait_s:g} s, at most {max_wait_s:g} s) and returns the result.
- Several tasks: fan out with delegate_tasks(tasks=[{{"prompt": ..., "files": [...]}}, ...]) \
(one call, all or none stored; they run in parallel), then wait_tasks(task_ids, mode="all") \
returns every result in one call (mode="any" returns as soon as one ends). Call wait_tasks \
again with the unfinished ids if it runs out.
- A long task: delegate_task(prompt) returns a task_id immediately; do other work, then \
wait_tasks([task_id]) or get_status(task_id).
- A sync call or a wait that returns pending or in_progress has not failed: the task goes \
on; wait again.
- Want data, not prose? output_schema (a JSON Schema, general tasks) makes the model answer \
in that shape; the parsed value comes back in result_json. model runs a task on another \
model (an unknown name is refused with the names that work); system and options (\
temperature, top_p, num_ctx, seed) shape general tasks.
- Code tasks run Codex in workdir: pass the project's absolute path when it is not this \
server's directory.
- list_tasks shows recent tasks and counts; cancel_task stops one. Priority 1-10, higher \
runs first (default 5).
- If tasks do not progress, read the koubou://health resource: it says what is wrong."""




# -- argument types -----------------------------------------------------------------------

def _no_bool(value: Any) -> Any:
    """JSON ``true`` is not a number, whatever Python thinks."""
    if isinstance(value, bool):
        raise PydanticCustomError("bool_not_number", "Input should be a number, not true/false")
    return value


NotBool = BeforeValidator(_no_bool)

TaskId = Annotated[str, Field(description="a task id from delegate_task or list_tasks, "
                                          "like task_20250101_120000_1a2b3c4d")]


def prompt_type(settings: Settings) -> Any:
    return Annotated[str, Field(
        description="everything the local model needs: it sees nothing else",
        json_schema_extra={"minLength": 1, "maxLength": settings.max_prompt_chars},
    )]


def timeout_type(settings: Settings) -> Any:
    return Annotated[Annotated[float, Field(
        gt=0, le=settings.max_timeout_s, allow_inf_nan=False), NotBool] | None, Field(
        description=f"time limit of one run, s (default {settings.general_timeout_s:g} "
                    f"for general, {settings.code_timeout_s:g} for code)")]


def wait_type(default_wait_s: float) -> Any:
    return Annotated[Annotated[float, Field(
        ge=0, le=MAX_SYNC_WAIT_S, allow_inf_nan=False), NotBool] | None, Field(
        description=f"sync only: longest wait for the result, s (default "
                    f"{default_wait_s:g}); the task goes on after it")]


def wait_many_type(default_wait_s: float) -> Any:
    return Annotated[Annotated[float, Field(
        ge=0, le=MAX_SYNC_WAIT_S, allow_inf_nan=False), NotBool] | None, Field(
        description=f"longest wait, s (default {default_wait_s:g}, at most "
                    f"{MAX_SYNC_WAIT_S:g}); the tasks go on after it")]



def progress_message(task: queue.Progress, elapsed: float, wait_s: float) -> str:
    if task.status == TaskStatus.IN_PROGRESS and task.tokens:
        # what Claude Code shows the user: the model is visibly working
        return (f"{task.task_id} generating on {task.worker_id}: {task.tokens} tokens, "
                f"{elapsed:.0f} s (waiting up to {wait_s:g} s)")
    where = f" on {task.worker_id}" if task.worker_id and task.status != TaskStatus.PENDING else ""
    why = " (waiting for a model slot)" if task.status == TaskStatus.PENDING and \
        task.error_kind == "busy" else ""
    return (f"{task.task_id} {task.status}{where}{why}, {elapsed:.0f} s elapsed "
            f"(waiting up to {wait_s:g} s)")


def many_message(tasks: list[queue.Progress], elapsed: float, wait_s: float,
                  mode: str) -> str:
    ended = sum(1 for t in tasks if t.status in FINAL_STATUSES)
    running = [t for t in tasks if t.status == TaskStatus.IN_PROGRESS]
    tokens = sum(t.tokens or 0 for t in running)
    working = f", {len(running)} generating ({tokens} tokens)" if running else ""
    return (f"{ended} of {len(tasks)} ended{working}, {elapsed:.0f} s elapsed (waiting up to "
            f"{wait_s:g} s for {mode})")


class DelegateBatch(BaseModel):
    """What ``delegate_tasks`` answers."""

    task_ids: list[str] = Field(description="the ids, in the order of the tasks given")
    tasks: list[DelegateResult]
    next_step: str


# -- the tools ----------------------------------------------------------------------------

WorkdirArg = Annotated[str | None, Field(
    description="absolute path of the project the task belongs to: Codex works there and "
                "files are read from there (default: the directory this server runs in)")]
FilesArg = Annotated[list[str] | None, Field(
    max_length=MAX_FILES,
    description="text files (relative to workdir, or absolute inside it) the worker reads "
                "when the task runs and gives the model, each under a header: pass paths "
                "instead of pasting contents into the prompt")]
ModelArg = Annotated[str | None, Field(
    max_length=MAX_MODEL_CHARS,
    description="run on this model instead of the type's default (one of KOUBOU_MODELS, or "
                "of what Ollama lists)")]
SystemArg = Annotated[str | None, Field(description="general only: a system prompt")]
OptionsArg = Annotated[dict[str, Any] | None, Field(
    description="general only: " + ", ".join(
        f"{name} ({'an integer' if kind is int else 'a number'} {low:g}..{high:g})"
        for name, (kind, low, high) in OPTIONS.items()))]
SchemaArg = Annotated[dict[str, Any] | None, Field(
    description="general only: a JSON Schema the answer must fit; the parsed value comes "
                "back in result_json (an answer that does not fit is asked for once more, "
                "then the task fails saying why)")]

#: What each task of a batch may carry (documentation for the caller; the service checks)
BATCH_ITEM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["prompt"],
    "properties": {
        "prompt": {"type": "string", "description": "everything the local model needs"},
        "type": {"enum": ["general", "code"], "default": "general"},
        "priority": {"type": "integer", "minimum": PRIORITY_MIN, "maximum": PRIORITY_MAX,
                     "default": 5},
        "timeout_s": {"type": "number", "exclusiveMinimum": 0},
        "idempotency_key": {"type": "string"},
        "workdir": {"type": "string", "description": "absolute project directory"},
        "files": {"type": "array", "items": {"type": "string"},
                  "description": "text files the worker reads when the task runs"},
        "model": {"type": "string"},
        "system": {"type": "string", "description": "general only"},
        "options": {"type": "object", "description": "general only: "
                    + ", ".join(OPTIONS)},
        "output_schema": {"type": "object", "description": "general only: a JSON Schema"},
    },
}

