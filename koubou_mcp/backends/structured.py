"""Checking an answer against the JSON Schema its task asked for (``output_schema``).

The model server is asked for output in that format (Ollama's ``format``), which constrains
what it generates, but a model can still stop early or produce a value outside the schema's
bounds: the answer is parsed and validated here, and a misfit says exactly where it fails.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from jsonschema.exceptions import best_match
from jsonschema.validators import validator_for

_FENCE = "```"
#: How much of an answer goes into a misfit's message
EXCERPT_CHARS = 200


class Misfit(ValueError):
    """An answer that is not JSON, or not of the schema; the message says why."""


def parse_structured(text: str, schema: Mapping[str, Any]) -> Any:
    """The JSON value of ``text``, which must fit ``schema``; Misfit otherwise."""
    body = _unfenced(text.strip())
    try:
        value = json.loads(body)
    except ValueError as exc:
        raise Misfit(f"the answer is not JSON ({exc}): {_excerpt(body)!r}") from None
    validator = validator_for(schema)(schema)
    error = best_match(validator.iter_errors(value))
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "the top level"
        raise Misfit(f"the answer does not fit output_schema at {where}: {error.message}")
    return value


def loads(text: str) -> Any:
    """The JSON value of an answer that was checked already (None when it is not JSON)."""
    try:
        return json.loads(_unfenced(text.strip()))
    except ValueError:
        return None


def _unfenced(text: str) -> str:
    """A reply wrapped in a Markdown code fence (```json ... ```) without the fence."""
    if text.startswith(_FENCE) and text.endswith(_FENCE) and len(text) > 2 * len(_FENCE):
        inner = text[len(_FENCE):-len(_FENCE)]
        first, _, rest = inner.partition("\n")
        return (rest if first.strip().isalpha() or not first.strip() else inner).strip()
    return text


def _excerpt(text: str) -> str:
    return text if len(text) <= EXCERPT_CHARS else text[:EXCERPT_CHARS] + "…"


__all__ = ["Misfit", "loads", "parse_structured"]
