"""Stand-in worker processes, for driving a supervisor's ``tick(now)`` by hand (no real workers;
tests/integration runs real ones)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from datetime import datetime

from koubou_mcp import queue
from koubou_mcp.models import WorkerStatus
from koubou_mcp.store import Store

_pids = itertools.count(900_000)


@dataclass
class FakeProcess:
    """A worker process that exits only when the test (or a signal it obeys) says so."""

    worker_id: str
    pid: int = field(default_factory=lambda: next(_pids))
    code: int | None = None
    obeys_sigterm: bool = True
    signals: list[str] = field(default_factory=list)

    def poll(self) -> int | None:
        return self.code

    def terminate(self) -> None:
        self.signals.append("TERM")
        if self.obeys_sigterm and self.code is None:
            self.code = 0

    def kill(self) -> None:
        self.signals.append("KILL")
        if self.code is None:
            self.code = -9


class FakeLauncher:
    """A supervisor's launcher that starts ``FakeProcess``es (or fails, when told to)."""

    def __init__(self) -> None:
        self.started: list[FakeProcess] = []
        self.fail_with: OSError | None = None
        self.obey_sigterm = True

    def __call__(self, worker_id: str) -> FakeProcess:
        if self.fail_with is not None:
            raise self.fail_with
        process = FakeProcess(worker_id, obeys_sigterm=self.obey_sigterm)
        self.started.append(process)
        return process


def become_ready(store: Store, process: FakeProcess, now: datetime) -> None:
    """What a real worker does when it starts: register, then report idle."""
    queue.register_worker(store, process.worker_id, process.pid, now)
    queue.set_worker_status(store, process.worker_id, WorkerStatus.IDLE, now)
