"""The leader lock and its holder record (tests/integration/test_leader_and_ledger.py kills a holder)."""

from __future__ import annotations

import os
from pathlib import Path

from koubou_mcp.leader import LOCK_FILE, PID_FILE, Holder, LeaderLock, lock_is_held, read_holder


def test_two_locks_on_one_home_conflict_even_in_one_process(tmp_path: Path) -> None:
    first, second = LeaderLock(tmp_path / "run"), LeaderLock(tmp_path / "run")
    try:
        assert first.acquire("pool") and first.held
        assert first.acquire("pool")  # again: still held, not an error
        assert not second.acquire("server") and not second.held
        first.release()
        assert second.acquire("server")
    finally:
        first.release()
        second.release()


def test_the_holder_record_names_the_pid_and_role_and_goes_with_the_lock(tmp_path: Path
                                                                         ) -> None:
    run_dir = tmp_path / "run"
    lock = LeaderLock(run_dir)
    assert read_holder(run_dir) is None and not lock_is_held(run_dir)
    assert lock.acquire("server")
    assert read_holder(run_dir) == Holder(os.getpid(), "server")
    assert lock_is_held(run_dir)
    assert (run_dir / LOCK_FILE).stat().st_mode & 0o777 == 0o600
    assert (run_dir / PID_FILE).stat().st_mode & 0o777 == 0o600
    assert [p.name for p in run_dir.iterdir() if p.name.endswith(".tmp")] == []
    lock.release()
    assert read_holder(run_dir) is None and not lock_is_held(run_dir)
    lock.release()  # twice: harmless


def test_probing_the_lock_does_not_take_it(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    lock = LeaderLock(run_dir)
    assert lock.acquire("pool")
    lock.release()
    assert not lock_is_held(run_dir)  # the file exists, nobody holds it
    try:
        assert lock.acquire("pool")
    finally:
        lock.release()


def test_release_leaves_a_successor_s_record_alone(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    lock = LeaderLock(run_dir)
    assert lock.acquire("pool")
    (run_dir / PID_FILE).write_text("4242\nserver\n")  # someone else's record, somehow
    lock.release()
    assert read_holder(run_dir) == Holder(4242, "server")


def test_an_unreadable_holder_record_reads_as_none_and_a_missing_role_as_pool(
    tmp_path: Path,
) -> None:
    tmp_path.joinpath(PID_FILE).write_text("not a pid\n")
    assert read_holder(tmp_path) is None
    tmp_path.joinpath(PID_FILE).write_text("")
    assert read_holder(tmp_path) is None
    tmp_path.joinpath(PID_FILE).write_text("123\n")
    assert read_holder(tmp_path) == Holder(123, "pool")
