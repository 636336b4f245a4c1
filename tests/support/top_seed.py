"""A store with something to watch: waiting tasks at three priorities, a busy and an idle
worker on two hosts, one completed and one failed task. Shared by the unit test of `top`'s
view and the end-to-end test that runs `koubou-mcp top` under tmux."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from koubou_mcp import queue
from koubou_mcp.config import Settings
from koubou_mcp.models import WorkerStatus, utcnow
from koubou_mcp.store import Store


@dataclass(frozen=True)
class Seeded:
    running_task: str
    completed_task: str
    failed_task: str


def seed_pool(store: Store, settings: Settings) -> Seeded:
    now = utcnow()
    added = 0

    def add(prompt: str, priority: int) -> str:
        nonlocal added  # one millisecond apart, so that the claims' order (oldest first) is known
        added += 1
        request = queue.validate_request(settings, prompt, "general", priority, None, None)
        at = now - timedelta(seconds=10) + timedelta(milliseconds=added)
        return queue.enqueue(store, request, settings, at).task.task_id

    done, broken = add("summarise the changelog", 10), add("a task that breaks", 10)
    queue.register_worker(store, "w-alpha", 1111, now, host="host-a")
    queue.register_worker(store, "w-beta", 2222, now, host="host-b")
    for task_id, outcome in ((done, "complete"), (broken, "fail")):
        claimed = queue.claim_next(store, "w-alpha", now, settings.lease_s)
        assert claimed is not None and claimed.task_id == task_id
        if outcome == "complete":
            queue.complete(store, task_id, "w-alpha", "CHANGELOG-SUMMARY-OK", now + timedelta(seconds=2))
        else:
            queue.fail(store, task_id, "w-alpha", "model said no", now + timedelta(seconds=3),
                       kind="backend")
    running = add("the long one", 10)
    claimed = queue.claim_next(store, "w-alpha", now, settings.lease_s)
    assert claimed is not None and claimed.task_id == running
    queue.set_worker_status(store, "w-beta", WorkerStatus.IDLE, now)
    for priority, count in ((9, 3), (5, 2), (1, 1)):
        for i in range(count):
            add(f"waiting p{priority} #{i}", priority)
    return Seeded(running, done, broken)
