"""A request for a new task: its fields, and the one check that turns raw input (MCP
arguments, a REST body, CLI flags) into a :class:`TaskRequest` or an :class:`InvalidTask`
naming the first bad field. The queue stores only requests that passed through here.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from koubou_mcp import taskfields, taskfiles
from koubou_mcp.config import PRIORITY_MAX, PRIORITY_MIN, Settings
from koubou_mcp.models import TaskType

MAX_IDEMPOTENCY_KEY = 200
#: the task types, as stored and as the tools, the REST API and the CLI accept them
TASK_TYPES = tuple(t.value for t in TaskType)


class InvalidTask(ValueError):
    """Input a task cannot be made from. The message says what is wrong and what is accepted;
    ``field`` names the field (``prompt``, ``files``...)."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


def default_timeout_s(settings: Settings, task_type: str) -> float:
    """The time limit of a task of ``task_type`` that names none."""
    return settings.code_timeout_s if task_type == TaskType.CODE else settings.general_timeout_s


@dataclass(frozen=True)
class TaskRequest:
    """A validated request for a new task (the fields after ``idempotency_key`` are checked by
    :func:`validate_task` with ``taskfiles`` and ``taskfields``: they need the file system and
    the models Ollama lists)."""

    prompt: str
    type: str
    priority: int
    timeout_s: float
    idempotency_key: str | None
    #: the task's project directory, absolute, links resolved
    workdir: str | None = None
    #: paths of files the worker reads when the task runs, relative to ``workdir`` or inside it
    files: tuple[str, ...] = ()
    model: str | None = None
    system: str | None = None
    options: Mapping[str, int | float] | None = None
    output_schema: Mapping[str, Any] | None = None

    def columns(self) -> dict[str, Any]:
        """The request's fields as the task's columns store them."""
        return {
            "type": self.type, "prompt": self.prompt, "priority": self.priority,
            "timeout_s": self.timeout_s, "idempotency_key": self.idempotency_key,
            "workdir": self.workdir, "files": _json(list(self.files)) if self.files else None,
            "model": self.model, "system_prompt": self.system,
            "model_options": _json(dict(self.options)) if self.options else None,
            "output_schema": _json(dict(self.output_schema))
            if self.output_schema is not None else None,
        }


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def validate_request(
    settings: Settings,
    prompt: Any,
    type: Any = "general",
    priority: Any = 5,
    timeout_s: Any = None,
    idempotency_key: Any = None,
) -> TaskRequest:
    """Check the fields every task has; raise InvalidTask naming the first bad one. (A task
    with the delegation fields too: :func:`validate_task`.)"""
    if not isinstance(prompt, str):
        raise InvalidTask(f"prompt must be a string, got {_type_name(prompt)}", "prompt")
    if not prompt.strip():
        raise InvalidTask("prompt must not be empty or only whitespace", "prompt")
    if len(prompt) > settings.max_prompt_chars:
        raise InvalidTask(
            f"prompt is {len(prompt)} characters; the limit is {settings.max_prompt_chars} "
            "(KOUBOU_MAX_PROMPT_CHARS). Split the work or send a file path instead.", "prompt"
        )
    if "\x00" in prompt:
        raise InvalidTask("prompt contains a NUL character (\\x00); remove it", "prompt")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidTask("prompt is not valid Unicode text (lone surrogate characters)", "prompt") from None
    if not isinstance(type, str) or type not in TASK_TYPES:
        raise InvalidTask(f"type must be one of {', '.join(TASK_TYPES)}, got {type!r}", "type")
    if isinstance(priority, bool) or not isinstance(priority, int):
        if isinstance(priority, float) and priority.is_integer():
            priority = int(priority)
        else:
            raise InvalidTask(
                f"priority must be an integer from {PRIORITY_MIN} to {PRIORITY_MAX}, got {priority!r}",
                "priority")
    if not PRIORITY_MIN <= priority <= PRIORITY_MAX:
        raise InvalidTask(
            f"priority must be from {PRIORITY_MIN} (lowest) to {PRIORITY_MAX} (highest), got {priority}",
            "priority")
    if timeout_s is None:
        timeout = default_timeout_s(settings, type)
    else:
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, int | float):
            raise InvalidTask(f"timeout_s must be a number of seconds, got {_type_name(timeout_s)}",
                              "timeout_s")
        timeout = float(timeout_s)
        if not math.isfinite(timeout) or timeout <= 0 or timeout > settings.max_timeout_s:
            raise InvalidTask(
                f"timeout_s must be more than 0 and at most {settings.max_timeout_s:g} "
                f"(KOUBOU_MAX_TIMEOUT), got {timeout_s!r}", "timeout_s"
            )
    key = idempotency_key
    if key is not None:
        if not isinstance(key, str) or not key.strip() or len(key) > MAX_IDEMPOTENCY_KEY:
            raise InvalidTask(
                f"idempotency_key must be a non-empty string of at most {MAX_IDEMPOTENCY_KEY} "
                f"characters, got {_short(key)}", "idempotency_key"
            )
        if "\x00" in key or not key.isprintable():
            raise InvalidTask("idempotency_key must be printable text", "idempotency_key")
    return TaskRequest(prompt, type, priority, timeout, key)


def validate_task(settings: Settings, prompt: Any, type: Any = "general", priority: Any = 5,
                  timeout_s: Any = None, idempotency_key: Any = None, *, workdir: Any = None,
                  files: Any = None, model: Any = None, system: Any = None, options: Any = None,
                  output_schema: Any = None,
                  models: Callable[[], Sequence[str]] | None = None) -> TaskRequest:
    """Check every field of a new task, the delegation fields too; raise InvalidTask naming the
    first bad one. ``workdir`` defaults to ``settings.workdir`` (the delegating process's
    directory); ``models`` gives the models a task may name (asked only when it names one).
    Reads the files (to check them) and may ask Ollama for its models: blocking."""
    request = validate_request(settings, prompt, type, priority, timeout_s, idempotency_key)
    try:
        directory = taskfiles.check_workdir(workdir, settings.workdir)
        names = taskfiles.check_files(files, directory, settings.max_files_bytes)
        chosen = None if model is None else taskfields.check_model(
            model, (models or (lambda: [settings.general_model, settings.code_model]))())
        system_prompt = taskfields.check_system(system, request.type, settings.max_prompt_chars)
        chosen_options = taskfields.check_options(options, request.type)
        schema = taskfields.check_output_schema(output_schema, request.type)
    except (taskfiles.FileRefused, taskfields.InvalidField) as exc:
        raise InvalidTask(str(exc), exc.field) from None
    return replace(request, workdir=directory, files=names, model=chosen, system=system_prompt,
                   options=chosen_options, output_schema=schema)


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _short(value: Any) -> str:
    text_ = repr(value)
    return text_ if len(text_) <= 60 else text_[:57] + "..."
