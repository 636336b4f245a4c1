"""Which models a task may name: ``KOUBOU_MODELS`` when it is set; otherwise the configured
general and code models plus what the Ollama server lists (``GET /api/tags``).

The list from Ollama is kept for ``ttl_s`` so that a burst of submits asks once. When Ollama
cannot be reached the configured two are still accepted (a task for them would wait for Ollama
anyway); a model Ollama does not list is refused at submit with the names that work.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import httpx

from koubou_mcp.config import Settings

#: How long the list Ollama gave is trusted, s
MODELS_TTL_S = 30.0
#: After Ollama could not be asked, how long until it is asked again, s
RETRY_AFTER_S = 5.0
#: How long asking Ollama for its list may take, s (a submit waits for it)
FETCH_TIMEOUT_S = 2.0

Fetch = Callable[[str, float], "list[str] | None"]


def list_ollama_models(url: str, timeout_s: float = FETCH_TIMEOUT_S) -> list[str] | None:
    """The names ``/api/tags`` of the Ollama server at ``url`` lists; None when it cannot be
    asked (unreachable, an error status, an unexpected reply)."""
    try:
        response = httpx.get(f"{url.rstrip('/')}/api/tags", timeout=timeout_s)
        if response.status_code != 200:
            return None
        entries = response.json().get("models") or []
    except (httpx.HTTPError, ValueError, AttributeError):
        return None
    if not isinstance(entries, list):
        return None
    return [str(e.get("name") or e.get("model")) for e in entries
            if isinstance(e, dict) and (e.get("name") or e.get("model"))]


class ModelSet:
    """The models a task may name, for one set of settings; safe to share between threads."""

    def __init__(self, settings: Settings, *, ttl_s: float = MODELS_TTL_S,
                 fetch: Fetch = list_ollama_models,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.ttl_s = ttl_s
        self._fetch = fetch
        self._clock = clock
        self._lock = threading.Lock()
        self._listed: list[str] | None = None
        self._fetched_at: float | None = None
        self._failed_at: float | None = None

    def names(self) -> list[str]:
        """The names, configured ones first, each once."""
        configured = self.settings.model_list
        if configured:
            return list(dict.fromkeys(configured))
        base = [self.settings.general_model, self.settings.code_model]
        return list(dict.fromkeys(base + (self._ollama() or [])))

    def _ollama(self) -> list[str] | None:
        with self._lock:
            now = self._clock()
            stale = self._fetched_at is None or now - self._fetched_at >= self.ttl_s
            # an unreachable server is asked again soon, not after the whole ttl, and not at
            # every submit of a burst either (each ask may take FETCH_TIMEOUT_S)
            failed_lately = self._failed_at is not None and now - self._failed_at < RETRY_AFTER_S
            if stale and not failed_lately:
                listed = self._fetch(self.settings.ollama_url, FETCH_TIMEOUT_S)
                if listed is not None:
                    self._listed, self._fetched_at, self._failed_at = listed, now, None
                else:
                    self._failed_at = now
            return self._listed


__all__ = ["FETCH_TIMEOUT_S", "MODELS_TTL_S", "ModelSet", "list_ollama_models"]
