"""The backend fault matrix: one real worker process per row, each fault ending in a defined
state with a clear error, and the same worker still healthy afterwards."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from koubou_mcp import queue
from koubou_mcp.config import Settings
from koubou_mcp.models import utcnow
from koubou_mcp.store import open_store
from tests.fakes.ollama_server import FakeOllama
from tests.support.paths import FAKE_CODEX_PATH
from tests.support.processes import Processes, processes, wait_dead
from tests.support.tasks import ended
from tests.support.waiting import wait_until


def dead_url() -> str:
    """A local URL where nothing listens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@dataclass
class Fault:
    name: str
    task_type: str = "general"
    fake: dict[str, Any] = field(default_factory=dict)  # FakeOllama.configure(...)
    env: dict[str, str] = field(default_factory=dict)  # the worker's environment
    settings: dict[str, Any] = field(default_factory=dict)
    timeout_s: float | None = None
    status: str = "failed"
    kind: str | None = None
    says: str = ""
    attempts: int | None = None


FAULTS = [
    Fault("ollama unreachable", settings={"ollama_url": "DEAD"}, kind="unreachable",
          says="gave up after 3 attempts", attempts=3),
    Fault("ollama 500", fake={"mode": "error500"}, kind="server_error", says="HTTP 500",
          attempts=3),
    # 503 "busy" is backpressure: the task waits and goes again without using an attempt
    Fault("ollama 503 busy, then recovers", fake={"fail_next": 2, "fail_next_mode": "busy503"},
          status="completed", attempts=1),
    Fault("ollama busy for longer than the attempts", fake={"fail_next": 4,
                                                            "fail_next_mode": "busy503"},
          status="completed", attempts=1),
    Fault("ollama hangs past the task timeout", fake={"mode": "hang"}, timeout_s=1.0,
          kind="timeout", says="timed out after 1 s", attempts=1),
    Fault("model not found", settings={"general_model": "no-such-model:1b"},
          kind="model_not_found", says="ollama pull no-such-model:1b", attempts=1),
    Fault("malformed body", fake={"mode": "malformed"}, kind="malformed", attempts=1),
    Fault("truncated body", fake={"mode": "truncated"}, kind="malformed", attempts=1),
    Fault("codex missing", task_type="code", settings={"codex_bin": "/nonexistent/codex"},
          kind="codex_missing", says="npm i -g @openai/codex", attempts=1),
    Fault("codex exits non-zero", task_type="code", env={"FAKE_CODEX_MODE": "fail"},
          kind="codex_exit", says="exit", attempts=1),
    # long enough for the stand-in to start and reach its hang on a loaded machine
    Fault("codex hangs", task_type="code", env={"FAKE_CODEX_MODE": "hang"}, timeout_s=4.0,
          kind="timeout", says="timed out after 4 s", attempts=1),
    Fault("codex killed by a signal", task_type="code", env={"FAKE_CODEX_MODE": "signal"},
          kind="codex_signal", says="SIGKILL", attempts=1),
    Fault("codex huge output", task_type="code",
          env={"FAKE_CODEX_MODE": "huge", "FAKE_CODEX_HUGE_CHARS": "3000000"},
          status="completed", says="", attempts=1),
    Fault("codex floods stdout and stderr", task_type="code",
          env={"FAKE_CODEX_MODE": "noise", "FAKE_CODEX_NOISE_BYTES": str(20 * 2**20)},
          status="completed", attempts=1),
    Fault("ollama huge answer", fake={"mode": "huge", "huge_chars": 3_000_000},
          status="completed", attempts=1),
]



@pytest.fixture
def procs() -> Iterator[Processes]:
    with processes() as p:
        yield p


@pytest.mark.parametrize("fault", FAULTS, ids=[f.name for f in FAULTS])
def test_each_backend_fault_ends_defined_and_leaves_the_worker_healthy(
    fault: Fault, settings: Settings, fake_ollama: FakeOllama, procs: Processes, tmp_path: Path
) -> None:
    overrides = {"ollama_url": fake_ollama.url, "codex_bin": str(FAKE_CODEX_PATH), "workdir": tmp_path}
    overrides |= {k: (dead_url() if v == "DEAD" else v) for k, v in fault.settings.items()}
    wsettings = settings.with_overrides(**overrides)
    store = open_store(wsettings.database_url, wsettings.run_dir)
    pidfile = tmp_path / "codex.pids"
    try:
        if fault.fake:
            fake_ollama.configure(**fault.fake)
        worker = procs.worker(wsettings, "w1", {"FAKE_CODEX_PIDFILE": str(pidfile), **fault.env})
        request = queue.validate_request(wsettings, f"fault: {fault.name}", fault.task_type,
                                         timeout_s=fault.timeout_s)
        task_id = queue.enqueue(store, request, wsettings, utcnow()).task.task_id
        done = wait_until(lambda: ended(store, task_id), timeout=30, message=fault.name)

        assert done.status == fault.status, done.error
        if fault.kind:
            assert done.error_kind == fault.kind
        assert fault.says in (done.error or done.result or "")
        if fault.attempts is not None:
            assert done.attempts == fault.attempts
        if fault.status == "completed":
            assert done.result and len(done.result) <= 1_100_000, "output is bounded"
        if fault.env.get("FAKE_CODEX_MODE") == "hang":
            pids = json.loads(pidfile.read_text())
            wait_dead(pids["parent"])
            wait_dead(pids["child"])

        # The same worker goes on serving.
        assert worker.poll() is None, "the worker survived the fault"
        fake_ollama.configure(mode="ok", fail_next=0)
        fake_ollama.release()
        # check with a task the fault does not break: faults that disable Ollama for good are
        # checked with a code task, all others (fake reset above) with a general one
        breaks_general = "ollama_url" in fault.settings or "general_model" in fault.settings
        healthy_type = "code" if breaks_general else "general"
        check = queue.enqueue(store, queue.validate_request(wsettings, "still there?", healthy_type),
                              wsettings, utcnow()).task.task_id
        after = wait_until(lambda: ended(store, check), timeout=30, message="the health check")
        assert after.status == "completed", after.error
        assert queue.list_workers(store)[0].worker_id == "w1"
    finally:
        store.close()
