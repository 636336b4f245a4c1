"""The statistics block keeps the seed's format, and groups workers by host when there are many."""

from __future__ import annotations

from datetime import datetime

from koubou_mcp.models import WorkerSnapshot
from koubou_mcp.queue import Stats
from koubou_mcp.report import stats_block

T0 = datetime(2026, 11, 28, 12, 0, 0)
COUNTS = {"pending": 8, "in_progress": 3, "completed": 45, "failed": 2, "cancelled": 0}


def worker(worker_id: str, status: str, done: int, failed: int,
           host: str = "a") -> WorkerSnapshot:
    return WorkerSnapshot(worker_id=worker_id, status=status, current_task=None,
                          tasks_completed=done, tasks_failed=failed, host=host, pid=1,
                          last_heartbeat=T0, idle_since=None, created_at=T0, stopped_at=None)


def test_the_block_reads_like_the_seeds() -> None:
    stats = Stats(COUNTS, [worker("worker_001", "busy", 5, 0), worker("worker_002", "idle", 3, 1)],
                  avg_duration_s=None, avg_wait_s=None)
    assert stats_block(stats) == "\n".join([
        "=" * 50, "Worker Pool Statistics", "=" * 50, "", "Active Workers:",
        "  • worker_001: busy | Tasks: 5 completed, 0 failed (100.0% success)",
        "  • worker_002: idle | Tasks: 3 completed, 1 failed (75.0% success)",
        "", "Task Statistics:",
        "  • pending: 8 tasks", "  • in_progress: 3 tasks", "  • completed: 45 tasks",
        "  • failed: 2 tasks", "  • cancelled: 0 tasks", "=" * 50,
    ])


def test_workers_on_several_hosts_are_grouped_under_each_host() -> None:
    stats = Stats(COUNTS, [worker("w2", "idle", 0, 0, host="gpu-b"),
                           worker("w1", "busy", 1, 0, host="gpu-a")], 1.5, 0.1)
    text = stats_block(stats)
    assert text.index("[gpu-a]") < text.index("w1") < text.index("[gpu-b]") < text.index("w2")
    assert "w2: idle | Tasks: 0 completed, 0 failed (no tasks yet)" in text
    assert "average run time: 1.50 s" in text
