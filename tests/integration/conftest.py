"""Fixtures for tests that run real worker and supervisor processes.

Every process started here is stopped at teardown, even when the test fails: pool processes
get SIGTERM then SIGKILL (their whole session), in-process supervisors are stopped with force,
and any worker process of the test's home that is still alive is killed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from koubou_mcp.config import Settings
from koubou_mcp.models import utcnow
from koubou_mcp.pool import PoolHandle, drain, start_in_thread
from koubou_mcp.store import Store
from koubou_mcp.supervisor import Supervisor, Tuning
from tests.fakes.ollama_server import FakeOllama
from tests.support.processes import PoolProcesses
from tests.support.procfs import kill_workers


@pytest.fixture
def pool_settings(settings: Settings, fake_ollama: FakeOllama) -> Settings:
    """Small pool, quick heartbeats, short idle timeout and drain grace; a model server with
    3 slots, pinned, so that these tests are about the pool following the load (learning the
    slots is tests/integration/test_capacity.py's)."""
    fake_ollama.configure(slots=3)
    return settings.with_overrides(
        ollama_url=fake_ollama.url, min_workers=1, max_workers=3, idle_timeout_s=1.0,
        heartbeat_s=0.2, lease_s=3.0, drain_grace_s=2.0, stats_interval_s=1.0,
        ollama_parallel=3,
    )


@pytest.fixture
def pools(tmp_path: Path, sqlite_store: Store, pool_settings: Settings
          ) -> Iterator[PoolProcesses]:
    registry = PoolProcesses(tmp_path)
    try:
        yield registry
    finally:
        registry.stop_all()
        kill_workers(pool_settings.home)


@pytest.fixture
def in_process_supervisor(sqlite_store: Store, pool_settings: Settings
                          ) -> Iterator[Callable[..., Supervisor]]:
    """Make leading supervisors in this process whose ``tick`` the test drives by hand."""
    made: list[Supervisor] = []

    def make(settings: Settings | None = None, **tuning: object) -> Supervisor:
        supervisor = Supervisor(settings or pool_settings, sqlite_store,
                                tuning=Tuning(**tuning))  # type: ignore[arg-type]
        made.append(supervisor)
        assert supervisor.try_lead(), "another supervisor holds this home"
        return supervisor

    try:
        yield make
    finally:
        for supervisor in made:
            with contextlib.suppress(Exception):
                drain(supervisor, force=True)
            supervisor.close(utcnow())
        kill_workers(pool_settings.home)


@pytest.fixture
def pool_thread(sqlite_store: Store, pool_settings: Settings
                ) -> Iterator[Callable[..., PoolHandle]]:
    """Start supervisors in background threads (as the MCP server does)."""
    handles: list[PoolHandle] = []

    def start(settings: Settings | None = None) -> PoolHandle:
        handle = start_in_thread(settings or pool_settings)
        handles.append(handle)
        return handle

    try:
        yield start
    finally:
        for handle in handles:
            handle.stop(drain=False, timeout_s=15)
        kill_workers(pool_settings.home)
