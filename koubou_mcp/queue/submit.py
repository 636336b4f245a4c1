"""Checking a request for a new task and storing it."""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select

from koubou_mcp.config import PRIORITY_MAX, PRIORITY_MIN, TASK_TYPES, Settings
from koubou_mcp.models import TaskSnapshot, TaskStatus
from koubou_mcp.queue.errors import InvalidTask
from koubou_mcp.queue.records import task_snapshot
from koubou_mcp.queue.statements import FINAL, IDEMPOTENCY_LOCK, INSERT_TASK, T
from koubou_mcp.store import Store

MAX_IDEMPOTENCY_KEY = 200


def new_task_id(now: datetime) -> str:
    return f"task_{now:%Y%m%d_%H%M%S}_{secrets.token_hex(4)}"


@dataclass(frozen=True)
class TaskRequest:
    """A validated request for a new task."""

    prompt: str
    type: str
    priority: int
    timeout_s: float
    idempotency_key: str | None


def validate_request(
    settings: Settings,
    prompt: Any,
    type: Any = "general",
    priority: Any = 5,
    timeout_s: Any = None,
    idempotency_key: Any = None,
) -> TaskRequest:
    """Check every field of a new task; raise InvalidTask naming the first bad one."""
    if not isinstance(prompt, str):
        raise InvalidTask(f"prompt must be a string, got {_type_name(prompt)}")
    if not prompt.strip():
        raise InvalidTask("prompt must not be empty or only whitespace")
    if len(prompt) > settings.max_prompt_chars:
        raise InvalidTask(
            f"prompt is {len(prompt)} characters; the limit is {settings.max_prompt_chars} "
            "(KOUBOU_MAX_PROMPT_CHARS). Split the work or send a file path instead."
        )
    if "\x00" in prompt:
        raise InvalidTask("prompt contains a NUL character (\\x00); remove it")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidTask("prompt is not valid Unicode text (lone surrogate characters)") from None
    if not isinstance(type, str) or type not in TASK_TYPES:
        raise InvalidTask(f"type must be one of {', '.join(TASK_TYPES)}, got {type!r}")
    if isinstance(priority, bool) or not isinstance(priority, int):
        if isinstance(priority, float) and priority.is_integer():
            priority = int(priority)
        else:
            raise InvalidTask(
                f"priority must be an integer from {PRIORITY_MIN} to {PRIORITY_MAX}, got {priority!r}"
            )
    if not PRIORITY_MIN <= priority <= PRIORITY_MAX:
        raise InvalidTask(
            f"priority must be from {PRIORITY_MIN} (lowest) to {PRIORITY_MAX} (highest), got {priority}"
        )
    if timeout_s is None:
        timeout = settings.timeout_for(type)
    else:
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, int | float):
            raise InvalidTask(f"timeout_s must be a number of seconds, got {_type_name(timeout_s)}")
        timeout = float(timeout_s)
        if not math.isfinite(timeout) or timeout <= 0 or timeout > settings.max_timeout_s:
            raise InvalidTask(
                f"timeout_s must be more than 0 and at most {settings.max_timeout_s:g} "
                f"(KOUBOU_MAX_TIMEOUT), got {timeout_s!r}"
            )
    key = idempotency_key
    if key is not None:
        if not isinstance(key, str) or not key.strip() or len(key) > MAX_IDEMPOTENCY_KEY:
            raise InvalidTask(
                f"idempotency_key must be a non-empty string of at most {MAX_IDEMPOTENCY_KEY} "
                f"characters, got {_short(key)}"
            )
        if "\x00" in key or not key.isprintable():
            raise InvalidTask("idempotency_key must be printable text")
    return TaskRequest(prompt, type, priority, timeout, key)


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _short(value: Any) -> str:
    text_ = repr(value)
    return text_ if len(text_) <= 60 else text_[:57] + "..."


@dataclass(frozen=True)
class Enqueued:
    task: TaskSnapshot
    #: False when an unfinished task with the same idempotency key was returned instead
    created: bool


def enqueue(store: Store, request: TaskRequest, settings: Settings, now: datetime) -> Enqueued:
    """Store a new pending task and wake the workers.

    With an idempotency key, an unfinished task carrying the same key is returned instead of a
    new one (clients that retry a call do not create duplicates).
    """
    with store.write() as conn:
        if request.idempotency_key is not None:
            if store.is_postgres:
                conn.execute(IDEMPOTENCY_LOCK,
                             {"k": request.idempotency_key})
            existing = conn.execute(
                select(T).where(
                    T.c.idempotency_key == request.idempotency_key,
                    T.c.status.not_in(FINAL),
                ).order_by(T.c.created_at.desc()).limit(1)
            ).first()
            if existing is not None:
                return Enqueued(task_snapshot(existing), created=False)
        values = {
            "task_id": new_task_id(now),
            "type": request.type,
            "prompt": request.prompt,
            "status": TaskStatus.PENDING.value,
            "priority": request.priority,
            "attempts": 0,
            "max_attempts": settings.max_attempts,
            "timeout_s": request.timeout_s,
            "cancel_requested": False,
            "idempotency_key": request.idempotency_key,
            "created_at": now,
            "updated_at": now,
        }
        row = conn.execute(INSERT_TASK, values).one()
        notified = store.notify_within(conn)
    if not notified:
        store.notify_new_work()
    return Enqueued(task_snapshot(row), created=True)

