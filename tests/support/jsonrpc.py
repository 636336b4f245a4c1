"""Raw JSON-RPC lines, for talking to the stdio server byte by byte (without the SDK's client)."""

from __future__ import annotations

import json
from typing import Any


def rpc_line(id_: int | None, method: str, params: dict[str, Any] | None = None) -> bytes:
    """One newline-terminated JSON-RPC message; without ``id_`` it is a notification."""
    message: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
    if id_ is not None:
        message["id"] = id_
    if params is not None:
        message["params"] = params
    return (json.dumps(message) + "\n").encode()
