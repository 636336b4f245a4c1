"""The stand-in Ollama of the tests (``tests.fakes.ollama_server``) as the benchmarks use it.

``http.server`` writes a reply's headers and body in two ``send`` calls; with Nagle's algorithm
on, the second waits for the client's delayed ACK, which adds about 40 ms to every request on
Linux, and every number here would measure that stall. Real Ollama (Go's net/http) sets
TCP_NODELAY; the stand-in now does too, and this module insists on it, so the benchmarks never
depend on that detail of the tests' fake. ``python -m benchmarks._fake_ollama`` runs it as a
process, with the same arguments as ``python -m tests.fakes.ollama_server``.
"""

from __future__ import annotations

import sys
from typing import Any

from tests.fakes import ollama_server

ollama_server._Handler.disable_nagle_algorithm = True


def in_process(**kwargs: Any) -> ollama_server.FakeOllama:
    """A started in-process fake (stop it with ``.stop()`` or use it as a context manager)."""
    return ollama_server.FakeOllama(**kwargs)


def as_process(**kwargs: Any) -> ollama_server.FakeOllamaProcess:
    """A fake in a child process of its own (not competing with this one for the GIL)."""
    proc = ollama_server.FakeOllamaProcess(**kwargs)
    proc.argv[proc.argv.index("tests.fakes.ollama_server")] = "benchmarks._fake_ollama"
    return proc


if __name__ == "__main__":
    sys.exit(ollama_server.main())
