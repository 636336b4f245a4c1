"""What the stand-in Ollama answers when a request asks for a ``format``: JSON that fits it.

Real Ollama constrains generation to the request's ``format`` (``"json"``, or a JSON Schema):
the answer is a JSON document of that shape. The stand-in builds the simplest value that
fits the schema, deterministic and carrying the echo of the prompt in its strings, so tests can
tell what reached the model. ``misfit`` builds one that does not fit (a model that stopped
early or ignored a bound), for the stand-in's ``misfit_next`` setting.
"""

from __future__ import annotations

import json
from typing import Any

#: Strings in a formatted answer keep at most this much of the echo
ECHO_CHARS = 200


def formatted_reply(fmt: Any, echo: str) -> str:
    """The answer text for a request with ``format`` (a schema or ``"json"``)."""
    if fmt == "json" or not isinstance(fmt, dict):
        return json.dumps({"echo": echo[:ECHO_CHARS]})
    return json.dumps(value_for(fmt, echo[:ECHO_CHARS]))


def misfit_reply(fmt: Any) -> str:
    """An answer that is JSON but does not fit ``fmt``: the wrong type at the top level."""
    if isinstance(fmt, dict) and fmt.get("type") == "array":
        return json.dumps({"not": "an array"})
    if isinstance(fmt, dict) and fmt.get("type") in ("string", "integer", "number", "boolean"):
        return json.dumps([])
    return json.dumps(["not", "an", "object"])


def value_for(schema: Any, echo: str) -> Any:
    """The simplest value that fits ``schema``."""
    if not isinstance(schema, dict):
        return echo
    if "const" in schema:
        return schema["const"]
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    for key in ("anyOf", "oneOf"):
        if isinstance(schema.get(key), list) and schema[key]:
            return value_for(schema[key][0], echo)
    if isinstance(schema.get("allOf"), list) and schema["allOf"]:
        merged: dict[str, Any] = {}
        for part in schema["allOf"]:
            if isinstance(part, dict):
                merged.update(part)
        return value_for(merged, echo)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), kind[0] if kind else None)
    if kind is None:
        kind = "object" if "properties" in schema else "string"
    if kind == "object":
        properties = schema.get("properties") or {}
        return {name: value_for(sub, echo) for name, sub in properties.items()}
    if kind == "array":
        count = max(1, int(schema.get("minItems", 1)))
        if "maxItems" in schema:
            count = min(count, int(schema["maxItems"]))
        return [value_for(schema.get("items", {}), echo) for _ in range(count)]
    if kind == "string":
        text = echo
        if "maxLength" in schema:
            text = text[: int(schema["maxLength"])]
        if "minLength" in schema:
            text = text.ljust(int(schema["minLength"]), ".")
        return text
    if kind in ("integer", "number"):
        low = schema.get("minimum", schema.get("exclusiveMinimum"))
        value = 0 if low is None else (low + 1 if "exclusiveMinimum" in schema else low)
        high = schema.get("maximum")
        if high is not None and value > high:
            value = high
        return int(value) if kind == "integer" else float(value)
    if kind == "boolean":
        return True
    if kind == "null":
        return None
    return echo
