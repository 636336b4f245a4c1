"""koubou-mcp: delegate work from a coding agent to local models through a durable queue."""

__version__ = "0.1.0"
