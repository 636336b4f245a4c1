"""Servers attached to the background pool: their markers, the pool's rule for leaving, and a
server's link (with a stand-in launcher; tests/e2e/test_detached_pool.py starts real pools)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from koubou_mcp.attachment import (
    Linger,
    PoolLink,
    attached_servers,
    mark_attached,
    mark_stopped,
    pool_summary,
    servers_dir,
    stopped_by_user,
    unmark_attached,
)
from koubou_mcp.config import Settings
from koubou_mcp.health import check_supervisor
from koubou_mcp.leader import LeaderLock

T0 = datetime(2026, 1, 1, 12, 0, 0)


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    return int(done.stdout)


# -- markers ------------------------------------------------------------------------------

def test_a_live_servers_fresh_marker_counts_and_is_gone_once_it_leaves(settings: Settings
                                                                       ) -> None:
    run = settings.run_dir
    path = mark_attached(run)
    assert path == servers_dir(run) / str(os.getpid())
    assert (path.stat().st_mode & 0o777) == 0o600
    assert attached_servers(run, time.time()) == [os.getpid()]
    unmark_attached(run)
    assert attached_servers(run, time.time()) == []
    unmark_attached(run)  # twice is fine


def test_a_killed_servers_marker_counts_for_nothing_and_is_swept(settings: Settings) -> None:
    run = settings.run_dir
    gone = dead_pid()
    mark_attached(run, gone)
    assert attached_servers(run, time.time()) == []
    assert (servers_dir(run) / str(gone)).exists(), "only a sweep removes markers"
    assert attached_servers(run, time.time(), sweep=True) == []
    assert not (servers_dir(run) / str(gone)).exists()


def test_a_marker_not_renewed_counts_for_nothing_even_if_its_pid_lives(settings: Settings
                                                                       ) -> None:
    run = settings.run_dir
    mark_attached(run)
    assert attached_servers(run, time.time() + 60, stale_s=30) == []
    assert (servers_dir(run) / str(os.getpid())).exists(), "a live pid's marker is kept"


def test_links_and_foreign_names_in_the_servers_directory_are_ignored(settings: Settings,
                                                                      tmp_path: Path) -> None:
    run = settings.run_dir
    mark_attached(run)
    target = tmp_path / "elsewhere"
    target.write_text("")
    (servers_dir(run) / "1").symlink_to(target)  # pid 1 lives, but this is no marker of ours
    (servers_dir(run) / "notes").write_text("")
    assert attached_servers(run, time.time(), sweep=True) == [os.getpid()]
    assert target.exists()


# -- the rule for leaving -----------------------------------------------------------------

def test_the_pool_leaves_only_after_lingering_alone_for_the_whole_time() -> None:
    linger = Linger(600.0)
    assert not linger.observe(T0, work=False, attached=0)
    assert not linger.observe(T0 + timedelta(seconds=599), work=False, attached=0)
    assert linger.observe(T0 + timedelta(seconds=600), work=False, attached=0)


@pytest.mark.parametrize("busy", [{"work": True, "attached": 0}, {"work": False, "attached": 1}])
def test_work_or_an_attached_server_starts_the_lingering_over(busy: dict[str, int]) -> None:
    linger = Linger(10.0)
    assert not linger.observe(T0, work=False, attached=0)
    assert not linger.observe(T0 + timedelta(seconds=9), **busy)  # type: ignore[arg-type]
    assert not linger.observe(T0 + timedelta(seconds=15), work=False, attached=0)
    assert not linger.observe(T0 + timedelta(seconds=24), work=False, attached=0)
    assert linger.observe(T0 + timedelta(seconds=25), work=False, attached=0)


def test_a_zero_linger_leaves_at_the_first_idle_look() -> None:
    assert Linger(0.0).observe(T0, work=False, attached=0)


# -- a server's link ----------------------------------------------------------------------

class FakePool:
    """A started pool as the link sees it: a pid and an exit code once it exited."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.code: int | None = None

    def poll(self) -> int | None:
        return self.code


class Launches:
    def __init__(self) -> None:
        self.pools: list[FakePool] = []
        self.fail: OSError | None = None

    def __call__(self, settings: Settings) -> FakePool:
        if self.fail is not None:
            raise self.fail
        pool = FakePool(100_000 + len(self.pools))
        self.pools.append(pool)
        return pool


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def launches() -> Launches:
    return Launches()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def link(settings: Settings, launches: Launches, clock: Clock) -> Iterator[PoolLink]:
    made = PoolLink(settings, launcher=launches, beat_s=3600, clock=clock)
    try:
        yield made
    finally:
        made.detach()


@pytest.fixture
def lock(settings: Settings) -> Iterator[LeaderLock]:
    held = LeaderLock(settings.run_dir)
    try:
        yield held
    finally:
        held.release()


def test_the_first_server_starts_the_pool_and_marks_itself_attached(
    link: PoolLink, launches: Launches, settings: Settings
) -> None:
    link.start()
    assert len(launches.pools) == 1
    assert attached_servers(settings.run_dir, time.time()) == [os.getpid()]
    health = link.health()
    assert (health["running"], health["starting"], health["pid"]) == (True, True, 100_000)
    link.ensure()
    assert len(launches.pools) == 1, "the one on its way is not started twice"
    link.detach()
    assert attached_servers(settings.run_dir, time.time()) == []


def test_a_later_server_attaches_to_the_pool_that_holds_the_lock(
    link: PoolLink, launches: Launches, lock: LeaderLock
) -> None:
    assert lock.acquire("detached")
    link.start()
    assert launches.pools == []
    health = link.health()
    assert (health["running"], health["pid"], health["role"], health["detached"]) == (
        True, os.getpid(), "detached", True)


def test_a_pool_that_left_is_started_again_but_a_user_stop_is_respected_until_new_work(
    link: PoolLink, launches: Launches, settings: Settings
) -> None:
    link.start()
    launches.pools[0].code = 0  # it led, then left
    mark_stopped(settings.run_dir)
    link.ensure(explicit=False)  # the beat
    assert len(launches.pools) == 1, "koubou-mcp stop is respected by the beat"
    assert link.health()["stopped_by_user"] is True
    link.ensure()  # a new task
    assert len(launches.pools) == 2 and not stopped_by_user(settings.run_dir)


def test_a_pool_that_keeps_failing_is_retried_with_a_growing_delay_and_reported(
    link: PoolLink, launches: Launches, clock: Clock
) -> None:
    link.start()
    launches.pools[0].code = 1
    link.ensure(explicit=False)
    assert len(launches.pools) == 1, "not at once after a failure"
    health = link.health()
    assert health["running"] is False and "exited with code 1" in health["last_failure"]
    clock.now += 3600 * 2 + 1  # past the delay (two beats)
    link.ensure(explicit=False)
    assert len(launches.pools) == 2


def test_a_pool_that_cannot_be_started_leaves_the_server_attached_and_says_why(
    link: PoolLink, launches: Launches, settings: Settings
) -> None:
    launches.fail = OSError("no more processes")
    link.start()  # does not raise: the server serves, health says what is wrong
    assert attached_servers(settings.run_dir, time.time()) == [os.getpid()]
    assert "no more processes" in link.health()["last_failure"]
    launches.fail = None
    link.ensure()
    assert len(launches.pools) == 1


# -- where the pool runs, in words --------------------------------------------------------

def test_top_and_health_say_where_the_pool_runs_and_who_is_attached(settings: Settings,
                                                                    lock: LeaderLock) -> None:
    run = settings.run_dir
    assert pool_summary(run, time.time()) == "pool: none runs for this home; 0 servers attached"
    mark_stopped(run)
    assert "stopped with `koubou-mcp stop`" in pool_summary(run, time.time())
    assert lock.acquire("detached")
    mark_attached(run)
    assert pool_summary(run, time.time()) == (
        f"pool: a background pool, pid {os.getpid()} (detached: its own session, outlives "
        "servers); 1 server attached")
    document = check_supervisor(settings, None).as_dict()
    assert document["role"] == "detached" and document["detached"] is True
    assert f"a background pool, pid {os.getpid()}" in document["summary"]


def test_an_attached_server_shows_what_the_pool_published_and_its_start_up_failures(
    link: PoolLink, launches: Launches, lock: LeaderLock, settings: Settings
) -> None:
    assert lock.acquire("detached")
    link.start()
    lock.publish({"pid": os.getpid(), "workers": {"total": 2, "busy": 1},
                  "crash_loop": {"active": True, "last_failure": "worker w1 exited with code 3"},
                  "scaling": {"up_events": 4}, "unrelated": "not copied"})
    health = link.health()
    assert health["workers"] == {"total": 2, "busy": 1} and health["scaling"]["up_events"] == 4
    assert "unrelated" not in health
    check = check_supervisor(settings, health)
    assert not check.ok and "exited with code 3" in str(check.reason)


def test_a_record_published_by_another_pid_is_not_taken_for_the_leaders(
    lock: LeaderLock, settings: Settings
) -> None:
    from koubou_mcp.leader import read_state

    assert lock.acquire("detached")
    lock.publish({"pid": os.getpid() + 1, "workers": {"total": 9}})
    assert read_state(settings.run_dir, os.getpid()) is None
    lock.publish({"pid": os.getpid(), "workers": {"total": 1}})
    assert read_state(settings.run_dir, os.getpid()) == {"pid": os.getpid(),
                                                         "workers": {"total": 1}}
    lock.release()
    assert read_state(settings.run_dir, os.getpid()) is None, "released with the lock"


def test_health_says_the_pool_could_not_start_even_when_a_supervisor_reports_in_process(
    settings: Settings,
) -> None:
    # a supervisor object can exist (and say it leads) although starting the pool failed:
    # the failure is what health must report, not "supervising in this process"
    supervising = {"running": True, "leader": True, "pid": os.getpid()}
    assert check_supervisor(settings, supervising).summary.startswith("supervising in this")
    check = check_supervisor(settings, supervising, pool_error="cannot write the pool log")
    assert not check.ok
    assert check.summary == "the pool could not start"
    assert "cannot write the pool log" in str(check.reason)
