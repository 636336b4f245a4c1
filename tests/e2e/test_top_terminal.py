"""`koubou-mcp top` in a real terminal: tmux runs it, capture-pane reads the screen, send-keys
types. The exit code and stderr are written to files by the shell tmux runs it in."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest

from koubou_mcp import queue
from koubou_mcp.config import Settings
from koubou_mcp.models import utcnow
from koubou_mcp.store import open_store
from tests.support.env import child_env
from tests.support.processes import koubou_command
from tests.support.top_seed import Seeded, seed_pool
from tests.support.waiting import wait_until

TMUX = shutil.which("tmux")


@dataclass
class Terminal:
    socket: Path
    exit_file: Path
    stderr_file: Path

    def tmux(self, *args: str) -> str:
        assert TMUX is not None
        return subprocess.run([TMUX, "-S", str(self.socket), *args], capture_output=True,
                              text=True, timeout=10, check=True).stdout

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-t", "top")

    def exit_code(self) -> int | None:
        text = self.exit_file.read_text() if self.exit_file.exists() else ""
        return int(text) if text.strip() else None


@pytest.fixture
def seeded(e2e_settings: Settings) -> Seeded:
    store = open_store(e2e_settings.database_url, e2e_settings.run_dir, create=True)
    try:
        return seed_pool(store, e2e_settings)
    finally:
        store.close()


@pytest.fixture
def terminal(e2e_settings: Settings, seeded: Seeded) -> Iterator[Terminal]:
    """`koubou-mcp top` running in a 120x50 tmux window on a private tmux server."""
    assert TMUX, "these tests need tmux (Debian package tmux; .ci/run installs it)"
    short = Path(tempfile.mkdtemp(prefix="kt-"))  # a unix socket path must stay short
    term = Terminal(short / "tmux.sock", short / "exit", short / "stderr")
    shell = (f"{shlex.quote(koubou_command())} top 2>{shlex.quote(str(term.stderr_file))}; "
             f"echo $? >{shlex.quote(str(term.exit_file))}.part; "
             f"mv {shlex.quote(str(term.exit_file))}.part {shlex.quote(str(term.exit_file))}")
    subprocess.run([TMUX, "-S", str(term.socket), "new-session", "-d", "-s", "top", "-x", "120",
                    "-y", "50", shell], env=child_env(e2e_settings), check=True, timeout=10)
    try:
        yield term
    finally:
        subprocess.run([TMUX, "-S", str(term.socket), "kill-server"], capture_output=True,
                       timeout=10, check=False)
        shutil.rmtree(short, ignore_errors=True)


@pytest.mark.parametrize("key", ["q", "C-c"])
def test_top_shows_the_pool_follows_changes_and_exits_cleanly_on_a_key(
    e2e_settings: Settings, seeded: Seeded, terminal: Terminal, key: str
) -> None:
    def shows(*texts: str) -> bool:
        screen = terminal.screen()
        return all(t in screen for t in texts)

    wait_until(lambda: shows("Workers: 2 (1 busy)", "w-alpha", seeded.running_task, "host-a",
                             "w-beta", "Queue by priority", "Model-server slots",
                             "CHANGELOG-SUMMARY-OK", "backend: model said no"),
               timeout=30, interval=0.1, message="the first view of the pool")
    running_row = next(line for line in terminal.screen().splitlines() if "w-alpha" in line)
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

    terminal.tmux("send-keys", "-t", "top", key)
    code = wait_until(lambda: terminal.exit_code() is not None and (terminal.exit_code(),),
                      timeout=15, interval=0.1, message="top to exit")[0]
    stderr = terminal.stderr_file.read_text()
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
