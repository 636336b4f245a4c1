"""The statistics block of the seed's Worker Pool Manager, as text."""

from __future__ import annotations

from itertools import groupby

from koubou_mcp.models import TaskStatus, WorkerSnapshot
from koubou_mcp.queue import Stats

RULE = "=" * 50


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
