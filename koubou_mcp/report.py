"""The statistics block of the seed's Worker Pool Manager, as text, and the pool's log of it."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from itertools import groupby

from koubou_mcp.models import TaskStatus, WorkerSnapshot
from koubou_mcp.queue import Stats

RULE = "=" * 50
#: a child of the supervisor's logger, so the pool log receives it
STATS_LOGGER_NAME = "koubou_mcp.supervisor.stats"


def _worker_line(w: WorkerSnapshot) -> str:
    done = w.tasks_completed + w.tasks_failed
    rate = f"{100.0 * w.tasks_completed / done:.1f}% success" if done else "no tasks yet"
    return (f"  • {w.worker_id}: {w.status} | Tasks: {w.tasks_completed} completed, "
            f"{w.tasks_failed} failed ({rate})")


def stats_block(stats: Stats) -> str:
    """Render ``stats`` in the seed's format: active workers, then tasks by status. Workers on
    several machines (a shared PostgreSQL store) are grouped under their host."""
    lines = [RULE, "Worker Pool Statistics", RULE, "", "Active Workers:"]
    if not stats.workers:
        lines.append("  (none)")
    workers = sorted(stats.workers, key=lambda w: (w.host, w.created_at))
    several_hosts = len({w.host for w in workers}) > 1
    for host, group in groupby(workers, key=lambda w: w.host):
        if several_hosts:
            lines.append(f"  [{host}]")
        lines.extend(_worker_line(w) for w in group)
    lines += ["", "Task Statistics:"]
    for status in TaskStatus:
        lines.append(f"  • {status.value}: {stats.counts.get(status.value, 0)} tasks")
    if stats.avg_duration_s is not None:
        lines.append(f"  • average run time: {stats.avg_duration_s:.2f} s")
    lines.append(RULE)
    return "\n".join(lines)


class StatsLog:
    """The statistics block, written to the pool log every ``interval_s``.

    Its records carry ``koubou_home`` (several pools may share a process, in tests) and go out
    at INFO whatever the configured log level: the block is the pool log's reason to exist.
    Time is an argument: the first ``due`` only starts the interval.
    """

    def __init__(self, home: str, interval_s: float) -> None:
        logger = logging.getLogger(STATS_LOGGER_NAME)
        logger.setLevel(logging.INFO)
        self.log = logging.LoggerAdapter(logger, {"koubou_home": home})
        self.interval_s = interval_s
        self._next: datetime | None = None

    def restart(self) -> None:
        """Begin a new interval at the next ``due`` (a supervisor that just took the lead)."""
        self._next = None

    def due(self, now: datetime) -> bool:
        if self._next is None:
            self._next = now + timedelta(seconds=self.interval_s)
            return False
        return now >= self._next

    def write(self, stats: Stats, now: datetime) -> None:
        self.log.info("pool statistics\n%s", stats_block(stats))
        self._next = now + timedelta(seconds=self.interval_s)
