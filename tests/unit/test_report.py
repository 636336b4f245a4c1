"""The statistics block keeps the seed's format, and groups workers by host when there are many."""

from __future__ import annotations

import logging
from datetime import datetime

import pytest

from koubou_mcp.models import WorkerSnapshot
from koubou_mcp.queue import Stats
from koubou_mcp.report import STATS_LOGGER_NAME, StatsLog, stats_block

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


def test_the_pool_s_statistics_are_due_every_interval_starting_from_the_first_look(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from datetime import timedelta

    stats_log = StatsLog("/some/home", interval_s=5.0)
    assert not stats_log.due(T0)  # the first look starts the interval
    assert not stats_log.due(T0 + timedelta(seconds=4.9))
    assert stats_log.due(T0 + timedelta(seconds=5))
    stats = Stats(COUNTS, [], avg_duration_s=None, avg_wait_s=None)
    with caplog.at_level(logging.INFO, logger=STATS_LOGGER_NAME):
        stats_log.write(stats, T0 + timedelta(seconds=6))
    (record,) = [r for r in caplog.records if r.name == STATS_LOGGER_NAME]
    assert record.levelno == logging.INFO and record.koubou_home == "/some/home"
    assert stats_block(stats) in record.getMessage()
    assert not stats_log.due(T0 + timedelta(seconds=10.9))  # the interval restarts at a write
    assert stats_log.due(T0 + timedelta(seconds=11))
    stats_log.restart()
    assert not stats_log.due(T0 + timedelta(seconds=30))
