"""``koubou-mcp stop`` refusing what it must not stop (tests/integration/test_supervisor.py stops
real pools with it)."""

from __future__ import annotations

import io
from collections.abc import Iterator

import pytest

from koubou_mcp.cli import stop_pool
from koubou_mcp.config import Settings
from koubou_mcp.leader import PID_FILE, LeaderLock


@pytest.fixture
def lock(settings: Settings) -> Iterator[LeaderLock]:
    held = LeaderLock(settings.run_dir)
    try:
        yield held
    finally:
        held.release()


def stop(settings: Settings) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = stop_pool(settings, 1.0, out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def test_stop_says_so_when_no_pool_runs(settings: Settings) -> None:
    code, out, err = stop(settings)
    assert code == 1 and "no pool is running" in err and out == ""


def test_stop_leaves_a_pool_hosted_by_a_server_alone(settings: Settings, lock: LeaderLock
                                                     ) -> None:
    assert lock.acquire("server")
    code, out, err = stop(settings)
    assert code == 1 and "inside a koubou-mcp server" in err and out == ""


def test_stop_never_signals_a_process_that_is_not_koubou_mcp(settings: Settings,
                                                             lock: LeaderLock) -> None:
    assert lock.acquire("pool")  # the holder is pytest itself, posing as a pool
    code, out, err = stop(settings)
    assert code == 1 and "is not koubou-mcp" in err and "not signalling" in err


def test_stop_cannot_tell_whom_to_stop_without_the_holder_record(settings: Settings,
                                                                 lock: LeaderLock) -> None:
    assert lock.acquire("pool")
    (settings.run_dir / PID_FILE).write_text("garbage\n")
    code, out, err = stop(settings)
    assert code == 1 and "missing or unreadable" in err
