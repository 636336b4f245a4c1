"""The fields a task may carry beyond its prompt that shape the model's run: another model
than its type's default, a system prompt, sampling options, and a JSON Schema its answer must
fit. Each check takes the raw value and returns what the task stores, or raises InvalidField
saying what is wrong and what is accepted. No I/O: the models that may be named come in as an
argument (``modelset`` finds them).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

from jsonschema import SchemaError
from jsonschema.validators import validator_for

#: The options a general task may set, with what each accepts: (kind, lowest, highest).
#: Ollama takes many more; these are the ones that change an answer without risking the
#: server (num_ctx is bounded so a task cannot ask for more memory than a model could use).
OPTIONS: dict[str, tuple[type, float, float]] = {
    "temperature": (float, 0.0, 2.0),
    "top_p": (float, 0.0, 1.0),
    "num_ctx": (int, 256, 1_048_576),
    "seed": (int, -(2**31), 2**31 - 1),
}
#: The largest output schema accepted, in bytes of compact JSON.
MAX_SCHEMA_BYTES = 32 * 1024
#: The longest model name accepted, characters.
MAX_MODEL_CHARS = 200


class InvalidField(ValueError):
    """A field of a task is bad; ``field`` names it."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


def canonical_model(name: str) -> str:
    """Ollama reads a model name without a tag as ``name:latest``."""
    name = name.strip()
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


def check_model(value: Any, known: Sequence[str]) -> str | None:
    """The model a task names (None: its type's default), which must be one of ``known``
    (compared as Ollama does: ``llama3.2`` is ``llama3.2:latest``)."""
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_MODEL_CHARS \
            or not value.isprintable():
        raise InvalidField(f"model must be a model name of at most {MAX_MODEL_CHARS} "
                           f"characters, got {_short(value)}", "model")
    wanted = canonical_model(value)
    for name in known:
        if canonical_model(name) == wanted:
            return value.strip()
    names = ", ".join(known) if known else "none (is Ollama running?)"
    raise InvalidField(f"model {value!r} is not one this server may use; the models that "
                       f"work: {names} (KOUBOU_MODELS sets the list; `ollama pull` adds to "
                       "what Ollama lists)", "model")


def check_system(value: Any, task_type: str, max_chars: int) -> str | None:
    """A system prompt for a general task."""
    if value is None:
        return None
    _general_only("system", task_type)
    if not isinstance(value, str):
        raise InvalidField(f"system must be a string, got {_short(value)}", "system")
    if not value.strip():
        raise InvalidField("system must not be empty or only whitespace (leave it out for "
                           "none)", "system")
    if len(value) > max_chars:
        raise InvalidField(f"system is {len(value)} characters; the limit is {max_chars} "
                           "(KOUBOU_MAX_PROMPT_CHARS)", "system")
    if "\x00" in value:
        raise InvalidField("system contains a NUL character (\\x00); remove it", "system")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidField("system is not valid Unicode text (lone surrogate characters)",
                           "system") from None
    return value


def check_options(value: Any, task_type: str) -> dict[str, int | float] | None:
    """Sampling options for a general task, from the allow-list ``OPTIONS``."""
    if value is None:
        return None
    _general_only("options", task_type)
    if not isinstance(value, dict):
        raise InvalidField(f"options must be an object such as {{\"temperature\": 0.2}}, got "
                           f"{_short(value)}", "options")
    allowed = ", ".join(OPTIONS)
    unknown = sorted(str(k) for k in value if k not in OPTIONS)
    if unknown:
        raise InvalidField(f"options has unknown key(s) {', '.join(unknown)}; accepted: "
                           f"{allowed}", "options")
    out: dict[str, int | float] = {}
    for key, raw in value.items():
        kind, low, high = OPTIONS[key]
        what = "an integer" if kind is int else "a number"
        number: int | float
        if isinstance(raw, bool) or not isinstance(raw, int | float):
            raise InvalidField(f"options.{key} must be {what} from {low:g} to {high:g}, got "
                               f"{_short(raw)}", "options")
        if kind is int:
            if isinstance(raw, float) and not raw.is_integer():
                raise InvalidField(f"options.{key} must be an integer, got {raw!r}", "options")
            number = int(raw)
        else:
            number = float(raw)
        if not math.isfinite(number) or not low <= number <= high:
            raise InvalidField(f"options.{key} must be {what} from {low:g} to {high:g}, got "
                               f"{raw!r}", "options")
        out[key] = number
    return out or None


def check_output_schema(value: Any, task_type: str) -> dict[str, Any] | None:
    """A JSON Schema the answer of a general task must fit (Ollama's ``format``)."""
    if value is None:
        return None
    _general_only("output_schema", task_type)
    if not isinstance(value, dict):
        raise InvalidField(f"output_schema must be a JSON Schema object such as "
                           f"{{\"type\": \"object\", \"properties\": {{...}}}}, got "
                           f"{_short(value)}", "output_schema")
    try:
        encoded = json.dumps(value, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidField(f"output_schema must be plain JSON: {exc}", "output_schema") from None
    if len(encoded.encode("utf-8")) > MAX_SCHEMA_BYTES:
        raise InvalidField(f"output_schema is larger than {MAX_SCHEMA_BYTES} bytes",
                           "output_schema")
    try:
        validator_for(value).check_schema(value)
    except SchemaError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "the top level"
        raise InvalidField(f"output_schema is not a valid JSON Schema at {where}: "
                           f"{exc.message}", "output_schema") from None
    parsed: dict[str, Any] = json.loads(encoded)
    return parsed


def _general_only(field: str, task_type: str) -> None:
    if task_type != "general":
        raise InvalidField(f"{field} applies to general tasks only (Codex runs code tasks "
                           "with its own prompts and output)", field)


def _short(value: Any, limit: int = 60) -> str:
    if value is None:
        return "null"
    text = json.dumps(value, default=repr, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 1] + "…"


__all__ = ["MAX_SCHEMA_BYTES", "OPTIONS", "InvalidField", "canonical_model", "check_model",
           "check_options", "check_output_schema", "check_system"]
