"""Admission by the model server's capacity, end to end: a supervisor in a thread, real worker
processes, a real SQLite store and the stand-in Ollama serving a fixed number of generations
at once (its slots) and queueing the rest, as real Ollama does.

The issue this guards against: a burst larger than the server's slots, sent all at once, waits
inside the server until the tasks' time limits run out although each needs little model time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from koubou_mcp import queue
from koubou_mcp.config import Settings
from koubou_mcp.models import TaskStatus, utcnow
from koubou_mcp.pool import PoolHandle
from koubou_mcp.store import Store
from tests.fakes.ollama_server import FakeOllama
from tests.support.waiting import wait_until

GENERATION_S = 1.0
BURST = 6
#: a time limit that fits one generation with room to spare, but not a wait behind two
TIMEOUT_S = 2.5


def generating(slots: int) -> FakeOllama:
    """A stand-in whose answers take about GENERATION_S: a quick first token, then tokens."""
    return FakeOllama(models=["gpt-oss:20b"], slots=slots, ttft_s=0.05, tokens_per_s=20,
                      reply_tokens=int((GENERATION_S - 0.05) * 20))


@pytest.fixture
def one_slot_ollama() -> Iterator[FakeOllama]:
    with generating(1) as fake:
        yield fake


def burst(store: Store, settings: Settings, n: int) -> list[str]:
    return [queue.enqueue(store, queue.validate_request(settings, f"burst {i}",
                                                        timeout_s=TIMEOUT_S),
                          settings, utcnow()).task.task_id for i in range(n)]


def all_ended(store: Store, ids: list[str]) -> Callable[[], list[queue.TaskSnapshot] | None]:
    def check() -> list[queue.TaskSnapshot] | None:
        tasks = [queue.get_task(store, i) for i in ids]
        ended = all(t.status in (TaskStatus.COMPLETED, TaskStatus.FAILED) for t in tasks)
        return tasks if ended else None
    return check


def default_pool(settings: Settings, fake: FakeOllama, **overrides: object) -> Settings:
    """The README's defaults (max 5 workers, nothing about the model server) on a test home."""
    return settings.with_overrides(**{"ollama_url": fake.url, "min_workers": 1,
                                      "max_workers": 5, **overrides})


def test_a_burst_larger_than_the_slots_completes_without_waiting_out_its_time_limits(
        settings: Settings, sqlite_store: Store, one_slot_ollama: FakeOllama,
        pool_thread: Callable[..., PoolHandle]) -> None:
    pool_settings = default_pool(settings, one_slot_ollama)
    pool_thread(pool_settings)
    ids = burst(sqlite_store, pool_settings, BURST)
    tasks = wait_until(all_ended(sqlite_store, ids), timeout=60, message="the burst to end")
    assert [t.status for t in tasks] == [TaskStatus.COMPLETED] * BURST, [t.error for t in tasks]
    assert all(t.attempts == 1 for t in tasks)
    stats = one_slot_ollama.stats()
    # one request at a time reached the server, plus at most one probe of a second slot
    assert stats["max_in_flight"] <= 2
    use = queue.model_server(sqlite_store, one_slot_ollama.url, utcnow())
    assert use is not None and use.capacity.limit <= 2 and use.capacity.ceiling == 2


def test_the_pool_finds_a_four_slot_server_by_itself(
        settings: Settings, sqlite_store: Store, pool_thread: Callable[..., PoolHandle]) -> None:
    with generating(4) as fake:
        pool_settings = default_pool(settings, fake)
        pool_thread(pool_settings)
        ids = burst(sqlite_store, pool_settings, 16)
        tasks = wait_until(all_ended(sqlite_store, ids), timeout=90, message="the burst to end")
        assert {t.status for t in tasks} == {TaskStatus.COMPLETED}, [t.error for t in tasks]
        use = queue.model_server(sqlite_store, fake.url, utcnow())
        assert use is not None and use.capacity.good >= 3
        assert fake.stats()["max_concurrency"] >= 3
        # never more in flight than the max of 5 workers: at most one probe past the 4 slots
        assert fake.stats()["max_in_flight"] <= 5


def test_without_admission_the_same_burst_times_out_waiting_inside_the_server(
        settings: Settings, sqlite_store: Store, one_slot_ollama: FakeOllama,
        pool_thread: Callable[..., PoolHandle]) -> None:
    """The failure the admission prevents, shown on the same stand-in: a limit pinned above
    the server's real capacity sends the whole burst at once."""
    pool_settings = default_pool(settings, one_slot_ollama, ollama_parallel=5, min_workers=5)
    pool_thread(pool_settings)
    ids = burst(sqlite_store, pool_settings, BURST)
    tasks = wait_until(all_ended(sqlite_store, ids), timeout=60, message="the burst to end")
    timed_out = [t for t in tasks if t.error_kind == "timeout"]
    assert len(timed_out) >= 2, [t.status for t in tasks]
    assert one_slot_ollama.stats()["max_in_flight"] >= 3


def test_a_pinned_limit_uses_every_slot_and_no_more(
        settings: Settings, sqlite_store: Store, pool_thread: Callable[..., PoolHandle]) -> None:
    with generating(2) as fake:
        pool_settings = default_pool(settings, fake, ollama_parallel=2)
        pool_thread(pool_settings)
        ids = burst(sqlite_store, pool_settings, 8)
        tasks = wait_until(all_ended(sqlite_store, ids), timeout=60, message="the burst to end")
        assert {t.status for t in tasks} == {TaskStatus.COMPLETED}
        stats = fake.stats()
        assert stats["max_in_flight"] == 2 and stats["max_concurrency"] == 2
        use = queue.model_server(sqlite_store, fake.url, utcnow())
        assert use is not None and use.as_dict()["limit_source"].startswith("pinned")
