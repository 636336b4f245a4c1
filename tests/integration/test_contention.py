"""Heavy contention: many worker processes and many submitting processes on one store at once.
No "database is locked" surfaces anywhere and nothing is lost or run twice."""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from koubou_mcp import queue
from koubou_mcp.config import Settings
from koubou_mcp.models import utcnow
from koubou_mcp.store import open_store
from tests.fakes.ollama_server import FakeOllama
from tests.support.processes import Processes, processes
from tests.support.waiting import wait_until

WORKERS, SUBMITTERS, PER_SUBMITTER = 6, 4, 40


@pytest.fixture
def procs() -> Iterator[Processes]:
    with processes() as p:
        yield p


def _submit_many(settings: Settings, name: str, barrier: Any, out: Any) -> None:
    store = open_store(settings.database_url, settings.run_dir)
    barrier.wait()  # all submitters start together, while the workers are claiming
    ids, errors = [], []
    for i in range(PER_SUBMITTER):
        try:
            request = queue.validate_request(settings, f"{name}-{i}", priority=1 + i % 10)
            ids.append(queue.enqueue(store, request, settings, utcnow()).task.task_id)
        except Exception as exc:  # reported to the test, which fails on any
            errors.append(repr(exc))
    store.close()
    out.put((ids, errors))


def test_many_workers_and_submitters_lose_nothing_and_never_see_a_locked_database(
    store_settings: Settings, procs: Processes, tmp_path: Path
) -> None:
    with FakeOllama(models=["gpt-oss:20b"]) as ollama:
        ollama.configure(latency_s=0.002, jitter_s=0.004)
        settings = store_settings.with_overrides(ollama_url=ollama.url)
        store = open_store(settings.database_url, settings.run_dir)
        for n in range(WORKERS):
            procs.worker(settings, f"w{n}")
        wait_until(lambda: len(queue.list_workers(store)) == WORKERS, timeout=20,
                   message="all workers registered")

        ctx = multiprocessing.get_context("fork")
        barrier, out = ctx.Barrier(SUBMITTERS), ctx.Queue()
        submitters = [ctx.Process(target=_submit_many, args=(settings, f"s{n}", barrier, out))
                      for n in range(SUBMITTERS)]
        for p in submitters:
            p.start()
        results = [out.get(timeout=120) for _ in submitters]
        for p in submitters:
            p.join(timeout=30)
        submitted = [tid for ids, _ in results for tid in ids]
        assert [e for _, errors in results for e in errors] == []
        assert len(submitted) == SUBMITTERS * PER_SUBMITTER

        total = len(submitted)
        wait_until(lambda: queue.counts_by_status(store)["completed"] == total, timeout=120,
                   message=f"{total} tasks completed")
        tasks = [queue.get_task(store, tid) for tid in submitted]
        assert all(t.status == "completed" for t in tasks)
        assert all(t.result == f"echo: {t.prompt}" for t in tasks)
        assert all(t.attempts == 1 for t in tasks), "no task ran twice"
        per_worker = {w.worker_id: w.tasks_completed for w in queue.list_workers(store)}
        assert sum(per_worker.values()) == total
        assert sum(1 for n in per_worker.values() if n) > 1, "the work was shared"
        assert len(ollama.stats()["prompts"]) == total, "each task reached the model once"
        logs = "".join(p.read_text() for p in settings.worker_logs_dir.glob("*.log"))
        assert "database is locked" not in logs
        assert "Traceback" not in logs
        store.close()
