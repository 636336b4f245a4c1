"""Backends turn one task into a result string: Ollama over HTTP, Codex CLI as a child process.

The worker builds the concrete backends from its settings; this package only exports them and
the contract they share (see ``base``).
"""

from koubou_mcp.backends.base import (
    MAX_RESULT_CHARS,
    Backend,
    BackendError,
    BackendRequest,
    GenerationProgress,
    PermanentBackendError,
    ProgressCallback,
    TransientBackendError,
    bound_result,
)
from koubou_mcp.backends.codex import CodexBackend
from koubou_mcp.backends.ollama import OllamaBackend, model_present

__all__ = [
    "MAX_RESULT_CHARS",
    "Backend",
    "BackendError",
    "BackendRequest",
    "CodexBackend",
    "GenerationProgress",
    "OllamaBackend",
    "PermanentBackendError",
    "ProgressCallback",
    "TransientBackendError",
    "bound_result",
    "model_present",
]
