"""The per-user home as a user meets it: no KOUBOU_HOME, nothing in the project directory, and a
word at start about an old ``./.koubou`` that still has work."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

from koubou_mcp import queue
from koubou_mcp.config import Settings
from koubou_mcp.models import utcnow
from koubou_mcp.store import open_store
from tests.support.env import child_env, plain_env
from tests.support.processes import wait_exit
from tests.support.tasks import submit
from tests.support.waiting import wait_until


def test_without_koubou_home_the_queue_lives_under_xdg_state_home_not_in_the_project(
    tmp_path: Path,
) -> None:
    project, state = tmp_path / "repo", tmp_path / "state"
    project.mkdir()
    env = plain_env({"XDG_STATE_HOME": str(state)})
    done = subprocess.run([sys.executable, "-m", "koubou_mcp", "submit", "hello", "--json"],
                          cwd=project, env=env, capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert list(project.iterdir()) == []  # `git status` stays clean
    store = open_store(f"sqlite:///{state}/koubou/db/koubou.db", state / "koubou" / "run",
                       create=False)
    try:
        assert [t.prompt for t in queue.list_tasks(store)] == ["hello"]
    finally:
        store.close()
    assert (state / "koubou").stat().st_mode & 0o777 == 0o700


def test_a_pool_started_beside_an_old_home_with_work_says_once_how_to_finish_it(
    settings: Settings, tmp_path: Path
) -> None:
    project = tmp_path / "repo"
    old = project / ".koubou"
    old_settings = settings.with_overrides(home=old, database_url=f"sqlite:///{old}/db/koubou.db")
    store = open_store(old_settings.database_url, old_settings.run_dir)
    try:
        submit(store, old_settings, 2, now=utcnow())
    finally:
        store.close()
    quiet = settings.with_overrides(min_workers=0)
    err_path = tmp_path / "pool.stderr"
    with open(err_path, "wb") as err:
        pool = subprocess.Popen([sys.executable, "-m", "koubou_mcp", "pool"], cwd=project,
                                env=child_env(quiet), stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    try:
        wait_until(lambda: "supervising" in (quiet.logs_dir / "worker_pool.log").read_text()
                   if (quiet.logs_dir / "worker_pool.log").exists() else False, timeout=30,
                   message="the pool to lead")
        pool.send_signal(signal.SIGTERM)
        assert wait_exit(pool, timeout=30) == 0
    finally:
        if pool.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pool.pid, signal.SIGKILL)
            pool.wait(10)
    for text in (err_path.read_text(), (quiet.logs_dir / "worker_pool.log").read_text()):
        assert text.count("still holds 2 pending and 0 running tasks") == 1, text
        assert f"KOUBOU_HOME={old} koubou-mcp pool" in text
