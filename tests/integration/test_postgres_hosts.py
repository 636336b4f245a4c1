"""Workers on several machines sharing one PostgreSQL store.

Each "host" is a separate KOUBOU_HOME with its own `koubou-mcp pool` process and its own
KOUBOU_HOSTNAME, as on two machines; the backlog is submitted through the MCP server running
front-end only (`serve --no-pool`) over stdio with the SDK's client.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from mcp import Client

from koubou_mcp import queue
from koubou_mcp.config import Settings
from koubou_mcp.models import utcnow
from koubou_mcp.store import Store, open_store
from tests.e2e.conftest import server_params
from tests.fakes.ollama_server import FakeOllama
from tests.support.processes import PoolProcesses
from tests.support.procfs import kill_workers, worker_processes
from tests.support.waiting import wait_until

pytestmark = pytest.mark.postgres
TASKS = 60


@pytest.fixture
def pg_store(pg_url: str, tmp_path: Path) -> Iterator[Store]:
    store = open_store(pg_url, tmp_path / "run")
    yield store
    store.close()


def host(settings: Settings, tmp_path: Path, name: str, pg_url: str, ollama: str,
         **overrides: object) -> Settings:
    home = tmp_path / name
    home.mkdir()
    return settings.with_overrides(home=home, database_url=pg_url, ollama_url=ollama,
                                   hostname=name, workdir=tmp_path, **overrides)


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator[tuple[PoolProcesses, list[Path]]]:
    pools, homes = PoolProcesses(tmp_path), []
    try:
        yield pools, homes
    finally:
        pools.stop_all()
        for home in homes:
            kill_workers(home)


@pytest.mark.anyio
async def test_two_hosts_drain_a_backlog_submitted_through_the_mcp_server_each_task_once(
    settings: Settings, pg_url: str, pg_store: Store, tmp_path: Path,
    hosts: tuple[PoolProcesses, list[Path]],
) -> None:
    pools, homes = hosts
    with FakeOllama(models=["gpt-oss:20b"], latency_s=0.02, jitter_s=0.03) as ollama:
        a = host(settings, tmp_path, "host-a", pg_url, ollama.url, min_workers=1, max_workers=3)
        b = host(settings, tmp_path, "host-b", pg_url, ollama.url, min_workers=1, max_workers=3)
        front = host(settings, tmp_path, "front", pg_url, ollama.url)
        homes.extend([a.home, b.home])
        pools.start(a)
        pools.start(b)
        wait_until(lambda: {w.host for w in queue.list_workers(pg_store)} == {"host-a", "host-b"},
                   timeout=30, message="both hosts to have a worker")

        ids = []
        async with Client(server_params(front, "serve", "--no-pool")) as client:
            for i in range(TASKS):
                result = await client.call_tool("delegate_task", {"prompt": f"shared {i}"})
                assert not result.is_error, result
                assert result.structured_content is not None
                ids.append(result.structured_content["task_id"])

        wait_until(lambda: queue.counts_by_status(pg_store)["completed"] == TASKS, timeout=60,
                   message="the backlog to be drained")
        tasks = [queue.get_task(pg_store, task_id) for task_id in ids]
        assert all(t.result == f"echo: shared {i}" for i, t in enumerate(tasks))
        assert all(t.attempts == 1 for t in tasks), "every task ran once"
        assert len(ollama.stats()["prompts"]) == TASKS
        by_host: dict[str, int] = {}
        for w in queue.list_workers(pg_store, include_offline=True):
            by_host[w.host] = by_host.get(w.host, 0) + w.tasks_completed
        assert set(by_host) == {"host-a", "host-b"}
        assert sum(by_host.values()) == TASKS
        assert all(n > 0 for n in by_host.values()), f"both hosts worked: {by_host}"


def test_tasks_of_a_host_killed_mid_work_are_finished_by_the_other_host(
    settings: Settings, pg_url: str, pg_store: Store, tmp_path: Path,
    hosts: tuple[PoolProcesses, list[Path]],
) -> None:
    pools, homes = hosts
    with FakeOllama(models=["gpt-oss:20b"], slots=3) as ollama:
        # the dead host's slots come back with its leases, like its tasks
        doomed = host(settings, tmp_path, "doomed", pg_url, ollama.url, min_workers=3,
                      max_workers=3, lease_s=2.0, ollama_parallel=3)
        homes.append(doomed.home)
        doomed_pool = pools.start(doomed)
        wait_until(lambda: len(queue.list_workers(pg_store)) == 3, timeout=30,
                   message="the doomed host's three workers")
        ollama.configure(mode="hang")  # every task sticks on the doomed host
        ids = [queue.enqueue(pg_store, queue.validate_request(doomed, f"rescue {i}"), doomed,
                             utcnow()).task.task_id for i in range(3)]
        wait_until(lambda: queue.counts_by_status(pg_store)["in_progress"] == 3, timeout=15,
                   message="the doomed host to hold every task")

        # The whole machine dies: its pool and every worker, at once, without a word.
        victims = worker_processes(doomed.home)
        os.killpg(doomed_pool.pid, signal.SIGKILL)
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        doomed_pool.wait(10)
        ollama.configure(mode="ok")
        ollama.release()

        survivor = host(settings, tmp_path, "survivor", pg_url, ollama.url, min_workers=1,
                        max_workers=2, lease_s=2.0, ollama_parallel=3)
        homes.append(survivor.home)
        pools.start(survivor)
        wait_until(lambda: queue.counts_by_status(pg_store)["completed"] == 3, timeout=45,
                   message="the survivor to finish the dead host's tasks")
        for task_id in ids:
            task = queue.get_task(pg_store, task_id)
            assert task.attempts == 2
            worker = queue.get_worker(pg_store, task.worker_id or "")
            assert worker is not None and worker.host == "survivor"
