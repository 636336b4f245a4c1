"""`koubou-mcp top` in a real terminal: tmux runs it, capture-pane reads the screen, send-keys
types. The exit code and stderr are written to files by the shell tmux runs it in."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from datetime import timedelta

import pytest

from koubou_mcp import queue
from koubou_mcp.config import Settings
from koubou_mcp.models import utcnow
from koubou_mcp.store import open_store
from tests.support.env import child_env
from tests.support.processes import koubou_command
from tests.support.terminal import Terminal, terminal
from tests.support.top_seed import Seeded, seed_pool
from tests.support.waiting import wait_until


@pytest.fixture
def e2e_settings(e2e_settings: Settings) -> Settings:
    # The seeded heartbeats are not renewed: with the e2e lease (3 s) a slow start of `top`
    # would show the seeded busy worker as silent before the test reads the first view.
    return e2e_settings.with_overrides(lease_s=300.0)


@pytest.fixture
def seeded(e2e_settings: Settings) -> Seeded:
    store = open_store(e2e_settings.database_url, e2e_settings.run_dir, create=True)
    try:
        return seed_pool(store, e2e_settings)
    finally:
        store.close()


@pytest.fixture
def term(e2e_settings: Settings, seeded: Seeded) -> Iterator[Terminal]:
    """`koubou-mcp top` running in a 120x50 tmux window on a private tmux server."""
    with terminal([koubou_command(), "top"], child_env(e2e_settings)) as t:
        yield t


@pytest.mark.parametrize("key", ["q", "C-c"])
def test_top_shows_the_pool_follows_changes_and_exits_cleanly_on_a_key(
    e2e_settings: Settings, seeded: Seeded, term: Terminal, key: str
) -> None:
    def shows(*texts: str) -> bool:
        screen = term.screen()
        return all(t in screen for t in texts)

    wait_until(lambda: shows("Workers: 2 (1 busy)", "w-alpha", seeded.running_task, "host-a",
                             "w-beta", "Queue by priority", "Model-server slots",
                             "CHANGELOG-SUMMARY-OK", "backend: model said no"),
               timeout=30, interval=0.1, message="the first view of the pool")
    running_row = next(line for line in term.screen().splitlines() if "w-alpha" in line)
    assert "busy" in running_row

    # The view refreshes by itself: the running task finishes and shows up among the results.
    store = open_store(e2e_settings.database_url, e2e_settings.run_dir, create=False)
    try:
        assert queue.complete(store, seeded.running_task, "w-alpha", "LONG-ONE-DONE",
                              utcnow() + timedelta(seconds=1))
    finally:
        store.close()
    wait_until(lambda: shows("LONG-ONE-DONE", "completed: 2", "Workers: 2 (0 busy)"),
               timeout=15, interval=0.1, message="the view to show the finished task")

    term.keys(key)
    code = wait_until(lambda: term.exit_code() is not None and (term.exit_code(),),
                      timeout=15, interval=0.1, message="top to exit")[0]
    stderr = term.stderr_file.read_text()
    assert code == 0, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr


def test_top_once_prints_one_view_without_a_terminal(e2e_settings: Settings,
                                                     seeded: Seeded) -> None:
    done = subprocess.run([koubou_command(), "top", "--once"], env=child_env(e2e_settings),
                          capture_output=True, text=True, timeout=60, check=False,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    assert seeded.running_task in done.stdout and "CHANGELOG-SUMMARY-OK" in done.stdout


def test_top_on_a_home_without_a_database_says_so_without_a_traceback(
    e2e_settings: Settings,
) -> None:
    done = subprocess.run([koubou_command(), "top", "--once"], env=child_env(e2e_settings),
                          capture_output=True, text=True, timeout=60, check=False,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "koubou-mcp: error:" in done.stderr
