"""The statistics block of the seed's Worker Pool Manager, as text."""

from __future__ import annotations

from koubou_mcp.models import TaskStatus
from koubou_mcp.queue import Stats

RULE = "=" * 50


def stats_block(stats: Stats) -> str:
    """Render ``stats`` in the seed's format: active workers, then tasks by status."""
    lines = [RULE, "Worker Pool Statistics", RULE, "", "Active Workers:"]
    if not stats.workers:
        lines.append("  (none)")
    for w in stats.workers:
        done = w.tasks_completed + w.tasks_failed
        rate = f"{100.0 * w.tasks_completed / done:.1f}% success" if done else "no tasks yet"
        lines.append(
            f"  • {w.worker_id}: {w.status} | Tasks: {w.tasks_completed} completed, "
            f"{w.tasks_failed} failed ({rate})"
        )
    lines += ["", "Task Statistics:"]
    for status in TaskStatus:
        lines.append(f"  • {status.value}: {stats.counts.get(status.value, 0)} tasks")
    if stats.avg_duration_s is not None:
        lines.append(f"  • average run time: {stats.avg_duration_s:.2f} s")
    lines.append(RULE)
    return "\n".join(lines)
