"""How many MCP-over-HTTP sessions each client address holds open, so that one client's loop
of ``initialize`` cannot use up every session and lock the others out.

A session opens with the response that carries a new ``mcp-session-id``; it stays open while a
request of it is in flight and for ``idle_s`` after the last one ended (the MCP SDK closes it
after the same idle time), and it closes with a DELETE or a 404 for its id. Pure bookkeeping:
the caller passes ``now`` (monotonic seconds); ``http_api.Guard`` feeds it.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class _Use:
    in_flight: int = 0
    last_end: float = 0.0


@dataclass
class _Client:
    sessions: dict[str, _Use] = field(default_factory=dict)
    opening: int = 0  # new-session requests admitted whose response has not come yet


class SessionLimiter:
    """Open MCP sessions per client address, at most ``per_client`` each."""

    def __init__(self, per_client: int, idle_s: float) -> None:
        self.per_client = per_client
        self.idle_s = idle_s
        self._clients: dict[str, _Client] = {}

    def open_count(self, client: str, now: float) -> int:
        """Sessions of ``client`` open at ``now`` (forgetting those idle too long)."""
        entry = self._clients.get(client)
        if entry is None:
            return 0
        for session_id, use in list(entry.sessions.items()):
            if use.in_flight == 0 and now - use.last_end >= self.idle_s:
                del entry.sessions[session_id]
        if not entry.sessions and not entry.opening:
            del self._clients[client]
            return 0
        return len(entry.sessions)

    def admit(self, client: str, now: float) -> bool:
        """A request to open a session: True (and a place reserved) unless the client is at
        its limit. Every True must be followed by ``opened`` or ``abandoned``."""
        if self.open_count(client, now) + self._opening(client) >= self.per_client:
            return False
        self._clients.setdefault(client, _Client()).opening += 1
        return True

    def opened(self, client: str, session_id: str, now: float) -> None:
        """The server answered an admitted request with a new session id."""
        entry = self._clients.setdefault(client, _Client())
        entry.opening = max(0, entry.opening - 1)
        entry.sessions.setdefault(session_id, _Use(last_end=now))

    def abandoned(self, client: str) -> None:
        """An admitted request ended without opening a session."""
        entry = self._clients.get(client)
        if entry is not None:
            entry.opening = max(0, entry.opening - 1)

    def begin(self, client: str, session_id: str) -> None:
        """A request of a known session starts."""
        entry = self._clients.get(client)
        if entry is not None and session_id in entry.sessions:
            entry.sessions[session_id].in_flight += 1

    def end(self, client: str, session_id: str, now: float, *, closed: bool) -> None:
        """That request ended; ``closed``: the session is gone (DELETE, or unknown to the
        server)."""
        entry = self._clients.get(client)
        if entry is None or session_id not in entry.sessions:
            return
        if closed:
            del entry.sessions[session_id]
            return
        use = entry.sessions[session_id]
        use.in_flight = max(0, use.in_flight - 1)
        use.last_end = now

    def _opening(self, client: str) -> int:
        entry = self._clients.get(client)
        return entry.opening if entry is not None else 0


__all__ = ["SessionLimiter"]
