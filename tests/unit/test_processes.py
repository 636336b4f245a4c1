"""Worker launching, /proc look-ups and the Codex group ledger, without starting processes
(tests/integration/test_leader_and_ledger.py starts and kills real ones)."""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path

import pytest

from koubou_mcp.config import Settings
from koubou_mcp.processes import (
    GroupLedger,
    Managed,
    ManagedWorkers,
    Phase,
    ProcessLauncher,
    describe_exit,
    process_alive,
    process_cmdline,
    wait_gone,
)
from tests.support.pool_doubles import FakeProcess


def no_such_pid() -> int:
    """A pid no process can have: above the kernel's limit."""
    return int(Path("/proc/sys/kernel/pid_max").read_text()) + 1


def test_exit_codes_read_as_words() -> None:
    assert describe_exit(0) == "exited with code 0"
    assert describe_exit(3) == "exited with code 3"
    assert describe_exit(-9) == "was killed by SIGKILL"
    assert describe_exit(-15) == "was killed by SIGTERM"
    assert describe_exit(-200) == "was killed by signal 200"


def test_proc_knows_this_process_and_not_an_impossible_one() -> None:
    argv = process_cmdline(os.getpid())
    assert argv and any("pytest" in arg or "python" in arg for arg in argv)
    assert process_alive(os.getpid())
    assert process_cmdline(no_such_pid()) is None
    assert not process_alive(no_such_pid())
    assert wait_gone(no_such_pid(), 0)
    assert not wait_gone(os.getpid(), 0.1)


def test_a_worker_is_told_its_id_home_and_supervisor_over_the_inherited_environment(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KOUBOU_MAX_WORKERS", "99")
    monkeypatch.setenv("WORKER_ID", "someone-else")
    env = ProcessLauncher(settings.with_overrides(max_workers=3)).environment("w-1")
    assert env["WORKER_ID"] == "w-1"
    assert env["KOUBOU_HOME"] == str(settings.home)
    assert env["KOUBOU_SUPERVISOR_PID"] == str(os.getpid())
    assert env["KOUBOU_MAX_WORKERS"] == "3"
    assert env["PATH"] == os.environ["PATH"]


def test_a_managed_worker_remembers_what_it_was_told() -> None:
    t = datetime(2026, 1, 1)
    m = Managed("w-1", FakeProcess("w-1"), t)
    m.terminate(Phase.RETIRING, t)
    assert (m.phase, m.signalled_at, m.process.signals) == (Phase.RETIRING, t, ["TERM"])
    m.kill(t)
    assert m.phase == Phase.KILLED and m.process.signals == ["TERM", "KILL"]


def test_the_ledger_notes_and_forgets_groups(tmp_path: Path) -> None:
    ledger = GroupLedger(tmp_path / "children" / "w-1")
    assert ledger.groups() == []
    assert ledger.record(111) and ledger.record(222)
    assert sorted(ledger.groups()) == [111, 222]
    assert (ledger.directory / "111").stat().st_mode & 0o777 == 0o600
    ledger.forget(111)
    ledger.forget(111)  # twice: harmless
    assert ledger.groups() == [222]


def test_killing_what_the_ledger_notes_skips_gone_groups_and_clears_the_directory(
    tmp_path: Path,
) -> None:
    ledger = GroupLedger(tmp_path / "w-1")
    assert ledger.kill_all() == []  # no directory: nothing to do
    assert ledger.record(no_such_pid())
    (ledger.directory / "stray.tmp").write_text("")
    assert ledger.kill_all() == []  # the group is gone already
    assert not ledger.directory.exists()


def test_a_ledger_that_cannot_write_says_so(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert not GroupLedger(blocker / "w-1").record(123)


def test_the_managed_set_counts_signals_and_reaps_its_workers() -> None:
    t = datetime(2026, 1, 1)
    workers = ManagedWorkers()
    for worker_id in ("a", "b", "c"):
        workers[worker_id] = Managed(worker_id, FakeProcess(worker_id, obeys_sigterm=False), t)
    workers["a"].status, workers["a"].ready = "idle", True
    workers["b"].status, workers["b"].ready = "busy", True
    assert workers.probing  # "c" was never seen ready
    workers["c"].terminate(Phase.RETIRING, t)
    assert not workers.probing and [m.worker_id for m in workers.running()] == ["a", "b"]
    assert workers.by_state() == {"starting": 0, "idle": 1, "busy": 1, "retiring": 1,
                                  "stopping": 0, "killed": 0}

    workers.terminate_running(Phase.STOPPING, t)
    workers["a"].kill(t)
    workers.terminate_again()
    signals = {m.worker_id: m.process.signals for m in workers.values()}
    assert signals == {"a": ["TERM", "KILL"], "b": ["TERM", "TERM"], "c": ["TERM", "TERM"]}
    killed = workers["a"]
    assert workers.exited() == [(killed, -9)]
    assert sorted(workers) == ["b", "c"]
    workers.kill_all(t)
    assert {m.phase for m in workers.values()} == {Phase.KILLED}
    assert len(workers.exited()) == 2 and workers == {}
