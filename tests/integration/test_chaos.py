"""Chaos: a real pool works through a few hundred tasks while the test kills its workers over
and over, and its supervisor once. Every task ends completed with its correct result, once.

Bounded in time and count: the kills stop after ``KILLS`` or when the work is done, and every
wait has a deadline. Figures of each run are printed (``pytest -s``) and quoted in the README.
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from koubou_mcp import queue
from koubou_mcp.config import Settings
from koubou_mcp.models import WorkerStatus, utcnow
from koubou_mcp.store import Store
from tests.fakes.ollama_server import FakeOllama
from tests.support.processes import PoolProcesses
from tests.support.procfs import worker_processes
from tests.support.waiting import wait_until

TASKS = 300
KILLS = 25


@dataclass
class Figures:
    tasks: int = 0
    worker_kills: int = 0
    supervisor_kills: int = 0
    reruns: int = 0
    lost: int = 0
    repeated_calls: int = 0

    def line(self, how: str) -> str:
        return (f"chaos ({how}): {self.tasks} tasks, {self.worker_kills} worker kills, "
                f"{self.supervisor_kills} supervisor kill(s), {self.reruns} re-runs, "
                f"{self.lost} lost, {self.repeated_calls} repeated model calls")


@pytest.fixture
def chaos_settings(pool_settings: Settings) -> Settings:
    # Attempts are raised so that random kills cannot exhaust a task's attempts by bad luck;
    # the check below still proves attempts never exceed the limit.
    return pool_settings.with_overrides(min_workers=2, max_workers=4, max_attempts=20,
                                        lease_s=2.0, heartbeat_s=0.2, drain_grace_s=10.0,
                                        idle_timeout_s=30.0)


@pytest.fixture
def random_latency(fake_ollama: FakeOllama) -> Iterator[FakeOllama]:
    fake_ollama.configure(latency_s=0.01, jitter_s=0.15)
    yield fake_ollama


def submit_all(store: Store, settings: Settings) -> dict[str, str]:
    """Submit TASKS tasks; return task id → expected result."""
    expected = {}
    for i in range(TASKS):
        prompt = f"chaos task {i}"
        request = queue.validate_request(settings, prompt, priority=1 + i % 10)
        expected[queue.enqueue(store, request, settings, utcnow()).task.task_id] = f"echo: {prompt}"
    return expected


def busy_worker_pids(store: Store) -> list[int]:
    return [w.pid for w in queue.list_workers(store)
            if w.status == WorkerStatus.BUSY and w.pid]


def completed(store: Store) -> int:
    return queue.counts_by_status(store)["completed"]


def run_chaos(pools: PoolProcesses, settings: Settings, store: Store, fake: FakeOllama,
              sig: signal.Signals) -> Figures:
    figures = Figures(tasks=TASKS)
    rng = random.Random(7)
    pool = pools.start(settings)
    expected = submit_all(store, settings)
    deadline = time.monotonic() + 150
    supervisor_hit = False
    while completed(store) < TASKS and time.monotonic() < deadline:
        if figures.worker_kills < KILLS:
            victims = busy_worker_pids(store)
            if victims:
                try:
                    os.kill(rng.choice(victims), sig)
                    figures.worker_kills += 1
                except ProcessLookupError:
                    pass
        if not supervisor_hit and completed(store) >= TASKS * 0.4:
            pool.send_signal(sig)  # only the supervisor: its workers live in their own sessions
            pool.wait(30)
            figures.supervisor_kills += 1
            supervisor_hit = True
            pool = pools.start(settings)  # a new supervisor takes over the same home
        time.sleep(0.25)  # the pace of the chaos, not a wait for a condition
    wait_until(lambda: completed(store) == TASKS, timeout=max(1.0, deadline - time.monotonic()),
               message=f"all {TASKS} tasks to complete")
    assert supervisor_hit, "the supervisor was never hit: the test proved less than it claims"

    tasks = [queue.get_task(store, task_id) for task_id in expected]
    assert all(t.status == "completed" for t in tasks)
    wrong = [t.task_id for t in tasks if t.result != expected[t.task_id]]
    assert wrong == [], "every task has its own correct result"
    assert all(1 <= t.attempts <= t.max_attempts for t in tasks)
    figures.reruns = sum(t.attempts - 1 for t in tasks)
    figures.lost = sum(1 for t in tasks if t.status != "completed")
    prompts = fake.stats()["prompts"]
    figures.repeated_calls = len(prompts) - len(set(prompts))

    pool.send_signal(signal.SIGTERM)
    assert pool.wait(30) == 0
    wait_until(lambda: worker_processes(settings.home) == [], timeout=15,
               message="no worker process left behind")
    return figures


def test_sigkill_chaos_loses_nothing_and_every_task_has_its_one_correct_result(
    pools: PoolProcesses, chaos_settings: Settings, sqlite_store: Store,
    random_latency: FakeOllama,
) -> None:
    figures = run_chaos(pools, chaos_settings, sqlite_store, random_latency, signal.SIGKILL)
    print("\n" + figures.line("SIGKILL"))
    assert figures.worker_kills >= 5, "too few kills landed to prove anything"
    assert figures.lost == 0


def test_sigterm_chaos_drains_and_runs_no_task_twice(
    pools: PoolProcesses, chaos_settings: Settings, sqlite_store: Store,
    random_latency: FakeOllama,
) -> None:
    figures = run_chaos(pools, chaos_settings, sqlite_store, random_latency, signal.SIGTERM)
    print("\n" + figures.line("SIGTERM"))
    assert figures.worker_kills >= 5
    assert figures.reruns == 0, "a drained worker finishes its task: nothing runs twice"
    assert figures.repeated_calls == 0, "each task reached the model exactly once"
    assert figures.lost == 0
