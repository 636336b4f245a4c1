"""Real processes against the leader lock and the Codex group ledger."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import anyio

from koubou_mcp.backends.codex import _run_process
from koubou_mcp.leader import LeaderLock, lock_is_held, read_holder
from koubou_mcp.processes import GroupLedger
from tests.support.procfs import pid_alive
from tests.support.waiting import wait_until

HOLD_LOCK = """
import sys, time
from pathlib import Path
from koubou_mcp.leader import LeaderLock
assert LeaderLock(Path(sys.argv[1])).acquire("pool")
print("held", flush=True)
time.sleep(3600)  # until the test kills it
"""


def test_the_kernel_frees_the_lock_of_a_holder_killed_with_sigkill(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run_dir)],
                              stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
        assert lock_is_held(run_dir)
        record = read_holder(run_dir)
        assert record is not None and record.pid == holder.pid
        assert not LeaderLock(run_dir).acquire("server")

        holder.kill()
        holder.wait(10)

        assert not lock_is_held(run_dir)
        successor = LeaderLock(run_dir)
        assert successor.acquire("server")  # over the dead holder's stale record
        record = read_holder(run_dir)
        assert record is not None and (record.pid, record.role) == (os.getpid(), "server")
        successor.release()
    finally:
        with contextlib.suppress(ProcessLookupError):
            holder.kill()
        holder.wait(10)


def test_the_ledger_kills_a_noted_group_and_all_its_processes(tmp_path: Path) -> None:
    # a session leader with a child: the tree a Codex run leaves when its worker dies
    tree = subprocess.Popen(["sh", "-c", "sleep 3600 & echo $!; wait"], stdout=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        assert tree.stdout is not None
        child = int(tree.stdout.readline())
        ledger = GroupLedger(tmp_path / "children" / "w-1")
        assert ledger.record(tree.pid)

        assert ledger.kill_all() == [tree.pid]

        assert tree.wait(10) == -signal.SIGKILL
        wait_until(lambda: not pid_alive(child), 10, message="the group's child to die")
        assert not ledger.directory.exists()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(tree.pid, signal.SIGKILL)
        tree.wait(10)


def test_a_codex_run_notes_its_group_in_the_ledger_while_it_runs(tmp_path: Path) -> None:
    ledger = GroupLedger(tmp_path / "children" / "w-1")
    # the child lists the ledger while running, then prints its own pid (= its group)
    argv = ["sh", "-c", f'ls "{ledger.directory}"; echo "pid $$"']

    async def run() -> tuple[int, str]:
        code, out, _ = await _run_process(argv, stdin_data=None, env=dict(os.environ),
                                          kill_grace_s=1.0, groups_dir=str(ledger.directory))
        return code, out.text()

    code, text = anyio.run(run)

    listed, pid_line = text.split()[0], text.split("pid ")[1].strip()
    assert code == 0 and listed == pid_line  # noted under its group id
    assert ledger.groups() == []  # and forgotten once it ended
