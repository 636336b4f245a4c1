"""`koubou-mcp load-test`: the seed's load_test.py as a command.

Sends N tasks of mixed types and priorities, either straight into the store or through a
running server's REST API (``--url``), shows a live progress line with the pool's size, then a
summary: throughput, wait and run time percentiles, failures, peak workers.
"""

from __future__ import annotations

import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TextIO

import httpx

from koubou_mcp import queue
from koubou_mcp.config import Settings
from koubou_mcp.models import FINAL_STATUSES, TaskStatus, TaskType, utcnow
from koubou_mcp.service import read_task
from koubou_mcp.store import Store

PROMPTS = {
    TaskType.GENERAL.value: ["Summarise the benefits of write-ahead logging in two sentences.",
                             "List three uses of a priority queue.",
                             "Explain exponential backoff to a new engineer."],
    TaskType.CODE.value: ["Write a Python function that reverses a linked list.",
                          "Write a shell-free Python snippet that counts lines in a file."],
}


@dataclass
class LoadResult:
    submitted: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    elapsed_s: float = 0.0
    waits_s: list[float] = field(default_factory=list)
    runs_s: list[float] = field(default_factory=list)
    peak_workers: int = 0
    pool_sizes: list[tuple[float, int]] = field(default_factory=list)
    finished: bool = True

    @property
    def throughput(self) -> float:
        done = sum(self.statuses.values())
        return done / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "submitted": self.submitted, "statuses": self.statuses,
            "elapsed_s": round(self.elapsed_s, 3), "throughput_per_s": round(self.throughput, 2),
            "wait_s": percentiles(self.waits_s), "run_s": percentiles(self.runs_s),
            "peak_workers": self.peak_workers, "finished": self.finished,
        }


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None, "p99": None, "max": None}
    ordered = sorted(values)

    def pick(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 4)

    return {"p50": pick(0.50), "p95": pick(0.95), "p99": pick(0.99), "max": round(ordered[-1], 4)}


class Target(Protocol):
    """Where tasks go and where their state is read from."""

    def submit(self, prompt: str, task_type: str, priority: int) -> str: ...
    def task(self, task_id: str) -> dict[str, Any]: ...
    def busy_and_live_workers(self) -> tuple[int, int]: ...
    def close(self) -> None: ...


class StoreTarget:
    def __init__(self, store: Store, settings: Settings) -> None:
        self.store, self.settings = store, settings

    def submit(self, prompt: str, task_type: str, priority: int) -> str:
        request = queue.validate_request(self.settings, prompt, task_type, priority)
        return queue.enqueue(self.store, request, self.settings, utcnow()).task.task_id

    def task(self, task_id: str) -> dict[str, Any]:
        return read_task(self.store, task_id, include_prompt=False).as_json()

    def busy_and_live_workers(self) -> tuple[int, int]:
        workers = queue.list_workers(self.store)
        return sum(1 for w in workers if w.status == "busy"), len(workers)

    def close(self) -> None:
        pass


class RestTarget:
    """A running `koubou-mcp serve --transport streamable-http` (the seed's REST API)."""

    def __init__(self, url: str, token: str | None) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.client = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=30)

    def submit(self, prompt: str, task_type: str, priority: int) -> str:
        reply = self.client.post("/task/delegate", json={"type": task_type, "prompt": prompt,
                                                         "priority": priority, "sync": False})
        reply.raise_for_status()
        return str(reply.json()["task_id"])

    def task(self, task_id: str) -> dict[str, Any]:
        reply = self.client.get(f"/task/{task_id}/status")
        reply.raise_for_status()
        data: dict[str, Any] = reply.json()
        return data

    def busy_and_live_workers(self) -> tuple[int, int]:
        # /workers, not /health: health probes Ollama and runs `codex --version` each time
        reply = self.client.get("/workers")
        reply.raise_for_status()
        data = reply.json()
        return int(data["by_status"].get("busy", 0)), int(data["live"])

    def close(self) -> None:
        self.client.close()


def run_load(target: Target, count: int, *, code_share: float = 0.3, seed: int | None = None,
             timeout_s: float = 600.0, out: TextIO = sys.stderr,
             clock: Callable[[], float] = time.monotonic) -> LoadResult:
    """Submit ``count`` tasks, follow them to the end (or ``timeout_s``), and measure."""
    rng = random.Random(seed)
    result = LoadResult()
    start = clock()
    ids = []
    for i in range(count):
        task_type = TaskType.CODE.value if rng.random() < code_share else TaskType.GENERAL.value
        prompt = f"[load {i}] {rng.choice(PROMPTS[task_type])}"
        ids.append(target.submit(prompt, task_type, rng.randint(1, 10)))
    result.submitted = len(ids)
    pending = set(ids)
    records: dict[str, dict[str, Any]] = {}
    final = {s.value for s in FINAL_STATUSES}
    while pending:
        for task_id in list(pending):
            record = target.task(task_id)
            if record["status"] in final:
                records[task_id] = record
                pending.discard(task_id)
        busy, live = target.busy_and_live_workers()
        result.peak_workers = max(result.peak_workers, live)
        result.pool_sizes.append((clock() - start, live))
        done = len(records)
        bar = "#" * int(30 * done / max(count, 1))
        out.write(f"\r[{bar:<30}] {done}/{count} done | workers {live} (busy {busy}) "
                  f"| {clock() - start:6.1f}s")
        out.flush()
        if clock() - start > timeout_s:
            result.finished = False
            break
        if pending:
            time.sleep(0.2)  # a progress display's refresh rate, not a test wait
    out.write("\n")
    result.elapsed_s = clock() - start
    for record in records.values():
        result.statuses[record["status"]] = result.statuses.get(record["status"], 0) + 1
        if record.get("duration_s") is not None:
            result.runs_s.append(float(record["duration_s"]))
        waited = _wait_s(record)
        if waited is not None:
            result.waits_s.append(waited)
    if pending:
        result.statuses["unfinished"] = len(pending)
    return result


def _wait_s(record: dict[str, Any]) -> float | None:
    from datetime import datetime

    if not record.get("started_at") or not record.get("created_at"):
        return None
    started = datetime.fromisoformat(record["started_at"].rstrip("Z"))
    created = datetime.fromisoformat(record["created_at"].rstrip("Z"))
    return (started - created).total_seconds()


def summary(result: LoadResult) -> str:
    """The summary table of a load test."""
    wait, run = percentiles(result.waits_s), percentiles(result.runs_s)

    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    failures = sum(n for s, n in result.statuses.items() if s != TaskStatus.COMPLETED.value)
    rows = [
        ("tasks submitted", str(result.submitted)),
        ("by status", ", ".join(f"{k}: {v}" for k, v in sorted(result.statuses.items()))),
        ("failures", str(failures)),
        ("elapsed", f"{result.elapsed_s:.2f} s"),
        ("throughput", f"{result.throughput:.2f} tasks/s"),
        ("wait p50 / p95 / p99", f"{fmt(wait['p50'])} / {fmt(wait['p95'])} / {fmt(wait['p99'])} s"),
        ("run p50 / p95 / p99", f"{fmt(run['p50'])} / {fmt(run['p95'])} / {fmt(run['p99'])} s"),
        ("peak workers", str(result.peak_workers)),
    ]
    width = max(len(k) for k, _ in rows)
    lines = ["Load test summary", "-" * (width + 30)]
    lines += [f"{k:<{width}}  {v}" for k, v in rows]
    return "\n".join(lines)
