"""One pool for the machine, as a user meets it: two Claude Code sessions in two repositories,
each starting ``koubou-mcp`` with no KOUBOU_HOME. One background pool serves both, neither
repository gets a file, each repository's code tasks run in that repository, and work delegated
just before both sessions are killed (process groups included) still completes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest

from koubou_mcp import queue
from koubou_mcp.config import Settings
from koubou_mcp.store import open_store
from tests.e2e.conftest import Leftovers
from tests.e2e.raw_server import RawServer, background_pool, stop_pool
from tests.fakes.ollama_server import FakeOllama
from tests.support.env import child_env
from tests.support.tasks import ended
from tests.support.waiting import wait_until

#: what the user sets up: where the models are and the Codex CLI; nothing about a home
PLACEMENT = ("KOUBOU_HOME", "KOUBOU_DATABASE_URL", "KOUBOU_WORKDIR")


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True,
                          text=True, timeout=30).stdout


@pytest.fixture
def machine(e2e_settings: Settings, tmp_path: Path) -> Iterator[tuple[Settings, Leftovers]]:
    """The settings of the per-user default home under a throwaway XDG_STATE_HOME, and a
    registry that kills whatever the test leaves running there."""
    home = tmp_path / "state" / "koubou"
    settings = e2e_settings.with_overrides(home=home,
                                           database_url=f"sqlite:///{home}/db/koubou.db")
    registry = Leftovers(home)
    try:
        yield settings, registry
    finally:
        registry.kill_all()


def session_env(settings: Settings, tmp_path: Path, record: Path) -> dict[str, str]:
    env = {k: v for k, v in child_env(settings).items() if k not in PLACEMENT}
    env["XDG_STATE_HOME"] = str(tmp_path / "state")
    env["FAKE_CODEX_RECORD"] = str(record)
    return env


def test_two_repositories_share_one_pool_stay_clean_and_keep_their_work_after_the_sessions_die(
    machine: tuple[Settings, Leftovers], fake_ollama: FakeOllama, tmp_path: Path
) -> None:
    settings, leftovers = machine
    record = tmp_path / "codex-runs.jsonl"
    env = session_env(settings, tmp_path, record)
    repos = [tmp_path / "alpha", tmp_path / "beta"]
    for repo in repos:
        repo.mkdir()
        git(repo, "init", "-q")
    alpha, beta = (RawServer(settings, tmp_path, leftovers, repo.name, env=env, cwd=repo)
                   for repo in repos)

    pool = background_pool(settings)
    for server in (alpha, beta):
        health = server.health()
        assert health["supervisor"]["pid"] == pool.pid, "one pool serves both sessions"
    assert "2 servers attached" in beta.health()["supervisor"]["summary"]

    for server, repo in ((alpha, repos[0]), (beta, repos[1])):
        done = server.delegate(f"code in {repo.name}", type="code", sync=True, wait_s=60)
        assert done["status"] == "completed", done
        status = server.tool("get_status", task_id=done["task_id"])
        assert status["workdir"] == str(repo)
    runs = [json.loads(line) for line in record.read_text().splitlines()]
    assert {run["stdin"].splitlines()[-1]: run["cwd"] for run in runs} == {
        "code in alpha": str(repos[0]), "code in beta": str(repos[1])}

    fake_ollama.configure(latency_s=1.0)
    delegated = [server.delegate(f"{server.proc.pid} async {i}")["task_id"]
                 for server in (alpha, beta) for i in range(3)]
    for server in (alpha, beta):
        os.killpg(server.pid, signal.SIGKILL)  # what a client ending its session may do
        server.proc.wait(timeout=10)
    with closing(open_store(settings.database_url, settings.run_dir, create=False)) as store:
        for task_id in delegated:
            done = wait_until(lambda t=task_id: ended(store, t), timeout=60,
                              message=f"{task_id} to end after both sessions were killed")
            assert done.status == "completed", (done.status, done.error)
        assert {t.workdir for t in queue.list_tasks(store)} == {str(r) for r in repos}

    for repo in repos:
        assert git(repo, "status", "--porcelain", "--ignored") == "", "nothing in the project"
    stop_pool(settings)
