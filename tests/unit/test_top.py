"""`koubou-mcp top`'s reads and its view, without a terminal (tests/e2e/test_top_terminal.py runs the
real command under tmux)."""

from __future__ import annotations

from datetime import timedelta

from rich.console import Console

from koubou_mcp import queue, top
from koubou_mcp.config import Settings
from koubou_mcp.models import TaskStatus, utcnow
from koubou_mcp.store import Store
from tests.support.top_seed import seed_pool


def test_pending_by_priority_counts_waiting_tasks_highest_priority_first(
    store: Store, settings: Settings
) -> None:
    seed_pool(store, settings)
    assert list(queue.pending_by_priority(store).items()) == [(9, 3), (5, 2), (1, 1)]


def test_recently_finished_lists_the_latest_of_the_asked_statuses_newest_first(
    store: Store, settings: Settings
) -> None:
    seeded = seed_pool(store, settings)
    done = queue.recently_finished(store, [TaskStatus.COMPLETED.value], 5)
    assert [t.task_id for t in done] == [seeded.completed_task]
    both = queue.recently_finished(store, [TaskStatus.COMPLETED.value, TaskStatus.FAILED.value], 5)
    assert [t.task_id for t in both] == [seeded.failed_task, seeded.completed_task]
    assert queue.recently_finished(store, [TaskStatus.COMPLETED.value], 0) == []


def _text(renderable: object, width: int = 160) -> str:
    console = Console(width=width, record=True, color_system=None, file=open("/dev/null", "w"))
    console.print(renderable)
    return console.export_text()


def test_the_view_shows_workers_the_queue_slots_and_recent_outcomes(
    sqlite_store: Store, settings: Settings
) -> None:
    seeded = seed_pool(sqlite_store, settings)
    shown = _text(top.render(top.read_view(sqlite_store, utcnow()), settings))
    alpha = next(line for line in shown.splitlines() if "w-alpha" in line)
    assert "busy" in alpha and seeded.running_task in alpha and "host-a" in alpha
    beta = next(line for line in shown.splitlines() if "w-beta" in line)
    assert "idle" in beta and "host-b" in beta
    assert "Workers: 2 (1 busy)" in shown
    queue_lines = shown[shown.index("Queue by priority"):shown.index("pending: ")]
    cells = [line.split() for line in queue_lines.splitlines()]
    rows = [c for c in cells if c and c[0].isdigit()]  # the slots sit on the right of the queue
    assert [r[:2] for r in rows] == [["9", "3"], ["5", "2"], ["1", "1"]]
    assert "pending: 6" in shown and "completed: 1" in shown and "failed: 1" in shown
    slots = _text(top.slots_section())
    assert "Model-server slots" in shown and top.NO_DATA in slots.splitlines()[-2], \
        "no slot data in the store yet: shown as a dash"
    results = shown[shown.index("Recent results"):shown.index("Recent failures")]
    assert seeded.completed_task in results and "CHANGELOG-SUMMARY-OK" in results
    failures = shown[shown.index("Recent failures"):]
    assert seeded.failed_task in failures and "backend: model said no" in failures


def test_a_worker_silent_for_longer_than_a_lease_is_shown_as_silent(
    sqlite_store: Store, settings: Settings
) -> None:
    seed_pool(sqlite_store, settings)
    later = utcnow() + timedelta(seconds=settings.lease_s + 5)
    shown = _text(top.render(top.read_view(sqlite_store, later), settings))
    assert all("silent" in line for line in shown.splitlines() if line.strip().startswith("w-"))


def test_an_unreadable_store_is_reported_above_the_last_view(
    sqlite_store: Store, settings: Settings
) -> None:
    seed_pool(sqlite_store, settings)
    last = top.read_view(sqlite_store, utcnow())
    shown = _text(top.render(last, settings, "database is locked"))
    assert "cannot read the store: database is locked" in shown and "w-alpha" in shown


def test_the_slots_show_each_model_server_in_use_and_its_limit(sqlite_store: Store,
                                                                settings: Settings) -> None:
    url = "http://127.0.0.1:11434"
    queue.configure_model_server(sqlite_store, url, 2, utcnow())
    view = top.read_view(sqlite_store, utcnow())
    shown = _text(top.slots_section(view.servers))
    assert url in shown and "2 pinned" in shown
