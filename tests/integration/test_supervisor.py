"""The supervisor with real worker processes, a real SQLite store and the stand-in Ollama.

Some tests drive ``tick(now)`` by hand (deterministic decisions, real processes); the others run
the supervisor as the product does: in a background thread (the MCP server's way) or as
``koubou-mcp pool`` processes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from koubou_mcp import queue
from koubou_mcp.cli import stop_pool
from koubou_mcp.config import Settings
from koubou_mcp.leader import read_holder
from koubou_mcp.models import TaskStatus, WorkerStatus, utcnow
from koubou_mcp.pool import PoolHandle
from koubou_mcp.store import Store
from koubou_mcp.supervisor import Supervisor
from tests.fakes.ollama_server import FakeOllama
from tests.support.paths import FAKE_CODEX_PATH, REPO_ROOT
from tests.support.processes import PoolProcesses
from tests.support.procfs import parent_pid, pid_alive, worker_processes
from tests.support.tasks import submit
from tests.support.waiting import wait_until


def tick_until(supervisor: Supervisor, predicate: Callable[[], object], timeout: float,
               message: str) -> None:
    """Run the supervisor's decisions (as its loop would) until ``predicate`` holds."""
    def step() -> object:
        supervisor.tick(utcnow())
        return predicate()
    wait_until(step, timeout=timeout, interval=0.05, message=message)


def task_in(store: Store, task_id: str, status: str) -> Callable[[], queue.TaskSnapshot | None]:
    """A predicate for wait_until: the task once it is in ``status``, else None."""
    def check() -> queue.TaskSnapshot | None:
        task = queue.get_task(store, task_id)
        return task if task.status == status else None
    return check


def live_rows(store: Store, status: WorkerStatus) -> list[queue.WorkerSnapshot]:
    return [w for w in queue.list_workers(store) if w.status == status.value]


def busy_on_a_hung_model(handle: PoolHandle, store: Store, settings: Settings,
                         fake_ollama: FakeOllama
                         ) -> tuple[queue.TaskSnapshot, queue.WorkerSnapshot, int]:
    """Once the pool's first worker is ready, a task on a model that never answers: the task,
    the row of the worker that holds it and that worker's pid."""
    wait_until(lambda: handle.health().get("workers", {}).get("idle") == 1, 20,
               message="the first worker to be ready")
    fake_ollama.configure(mode="hang")
    (task,) = submit(store, settings)
    running = wait_until(task_in(store, task.task_id, "in_progress"), 10,
                         message="the task to be claimed")
    assert running is not None
    worker = queue.get_worker(store, running.worker_id or "")
    assert worker is not None and worker.pid
    return task, worker, worker.pid


def test_a_burst_grows_the_pool_to_max_in_one_decision_then_idle_workers_retire_to_min(
    in_process_supervisor: Callable[..., Supervisor], pool_settings: Settings,
    sqlite_store: Store, fake_ollama: FakeOllama,
) -> None:
    supervisor = in_process_supervisor()
    tick_until(supervisor, lambda: supervisor.health()["workers"]["idle"] == 1, 20,
               "the first worker to be ready")
    fake_ollama.configure(latency_s=0.5, slots=3)  # a model server that can serve the whole pool
    tasks = submit(sqlite_store, pool_settings, 12)

    decision = supervisor.tick(utcnow())

    assert (decision.desired, decision.spawn) == (3, 2)
    tick_until(supervisor, lambda: fake_ollama.stats()["max_concurrency"] == 3, 20,
               "three workers running tasks at once")
    tick_until(supervisor, lambda: queue.counts_by_status(sqlite_store)["completed"] == 12, 20,
               "all tasks to complete")
    spawned = [d.spawn for _, d in supervisor.decisions.history if d.spawn]
    assert spawned == [1, 2]  # the minimum at start, then the whole burst at once
    workers = {m["worker_id"]: m["pid"] for m in supervisor.health()["managed"]}
    assert len(workers) == 3

    tick_until(supervisor, lambda: supervisor.health()["workers"]["total"] == 1, 15,
               "idle workers to retire down to min")

    kept = supervisor.health()["managed"][0]["worker_id"]
    retired = [w for w in workers if w != kept]
    for worker_id in retired:
        assert not pid_alive(workers[worker_id])
        row = queue.get_worker(sqlite_store, worker_id)
        assert row is not None and row.status == WorkerStatus.OFFLINE
    assert all(queue.get_task(sqlite_store, t.task_id).attempts == 1 for t in tasks)
    for worker_id in workers:
        log_file = pool_settings.worker_logs_dir / f"{worker_id}.log"
        assert log_file.stat().st_mode & 0o777 == 0o600
        assert "started" in log_file.read_text()


def test_a_sigkilled_busy_worker_s_task_is_requeued_at_once_completed_and_the_worker_replaced(
    pool_thread: Callable[..., PoolHandle], pool_settings: Settings, sqlite_store: Store,
    fake_ollama: FakeOllama,
) -> None:
    settings = pool_settings.with_overrides(lease_s=30.0)  # recovery cannot come from expiry
    handle = pool_thread(settings)
    task, victim, pid = busy_on_a_hung_model(handle, sqlite_store, settings, fake_ollama)

    os.kill(pid, signal.SIGKILL)

    def taken_back() -> bool:
        t = queue.get_task(sqlite_store, task.task_id)
        return t.attempts == 2 or (t.status == "pending" and t.error_kind == "worker_lost")
    wait_until(taken_back, 5, message="the task to be re-queued well before its 30 s lease")
    assert "SIGKILL" in (queue.get_task(sqlite_store, task.task_id).error or "")
    fake_ollama.configure(mode="ok")
    fake_ollama.release()
    done = wait_until(task_in(sqlite_store, task.task_id, "completed"), 20,
                      message="the re-queued task to complete")
    assert done is not None
    assert done.attempts == 2 and done.worker_id != victim.worker_id
    managed = [m["worker_id"] for m in handle.health()["managed"]]
    assert victim.worker_id not in managed and len(managed) >= 1
    dead = queue.get_worker(sqlite_store, victim.worker_id)
    assert dead is not None and dead.status == WorkerStatus.OFFLINE


def test_a_hung_worker_is_killed_after_a_silent_lease_and_a_new_one_runs_its_task(
    pool_thread: Callable[..., PoolHandle], pool_settings: Settings, sqlite_store: Store,
    fake_ollama: FakeOllama,
) -> None:
    # one worker at most: unless the hung one is killed, nothing ever runs the task again
    settings = pool_settings.with_overrides(max_workers=1)
    handle = pool_thread(settings)
    task, victim, pid = busy_on_a_hung_model(handle, sqlite_store, settings, fake_ollama)

    os.kill(pid, signal.SIGSTOP)  # alive, but it does nothing any more
    try:
        wait_until(lambda: not pid_alive(pid), 6 * settings.lease_s,
                   message="the supervisor to kill the silent worker")
    finally:
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
    fake_ollama.configure(mode="ok")
    fake_ollama.release()
    done = wait_until(task_in(sqlite_store, task.task_id, "completed"), 20,
                      message="a new worker to run the task")
    assert done is not None and done.worker_id != victim.worker_id and done.attempts == 2
    dead = queue.get_worker(sqlite_store, victim.worker_id)
    assert dead is not None and dead.status == WorkerStatus.OFFLINE


def test_two_pools_on_one_home_one_supervises_and_the_other_takes_over_then_stop_leaves_none(
    pools: PoolProcesses, pool_settings: Settings, sqlite_store: Store,
) -> None:
    home = pool_settings.home
    first = pools.start(pool_settings)
    wait_until(lambda: (h := read_holder(pool_settings.run_dir)) and h.pid == first.pid, 15,
               message="the first pool to take the lock")
    wait_until(lambda: live_rows(sqlite_store, WorkerStatus.IDLE), 20,
               message="the first pool's worker")
    second = pools.start(pool_settings)
    wait_until(lambda: "standing by" in pools.stderr(second), 15,
               message="the second pool to stand by")

    holder = read_holder(pool_settings.run_dir)
    assert holder is not None and holder.pid == first.pid
    workers = worker_processes(home)
    assert workers and {parent_pid(pid) for pid in workers} == {first.pid}

    assert stop_pool(pool_settings, 20) == 0
    assert first.wait(5) == 0
    wait_until(lambda: (h := read_holder(pool_settings.run_dir)) and h.pid == second.pid, 10,
               message="the second pool to take over")
    wait_until(lambda: {parent_pid(p) for p in worker_processes(home)} == {second.pid}, 20,
               message="the second pool's own worker")

    stopped = subprocess.run(
        [sys.executable, "-m", "koubou_mcp", "stop", "--timeout", "20"], cwd=REPO_ROOT,
        env={**os.environ, **pool_settings.to_env()}, capture_output=True, text=True,
        timeout=60,
    )
    assert stopped.returncode == 0, stopped.stderr
    assert "pool stopped" in stopped.stdout
    assert second.wait(5) == 0
    assert worker_processes(home) == []
    assert read_holder(pool_settings.run_dir) is None
    assert pools.stdout(first) == pools.stdout(second) == ""  # logs never go to stdout
    log_text = (pool_settings.logs_dir / "worker_pool.log").read_text()
    assert "Worker Pool Statistics" in log_text and "standing by" in log_text

    again = subprocess.run(
        [sys.executable, "-m", "koubou_mcp", "stop"], cwd=REPO_ROOT,
        env={**os.environ, **pool_settings.to_env()}, capture_output=True, text=True,
        timeout=60,
    )
    assert again.returncode == 1 and "no pool is running" in again.stderr


def test_stopping_a_pool_drains_and_a_task_that_outlasts_the_grace_goes_back_to_pending(
    pools: PoolProcesses, pool_settings: Settings, sqlite_store: Store,
    fake_ollama: FakeOllama,
) -> None:
    settings = pool_settings.with_overrides(drain_grace_s=1.0, lease_s=30.0)
    pool = pools.start(settings)
    wait_until(lambda: live_rows(sqlite_store, WorkerStatus.IDLE), 20,
               message="the pool's worker")
    fake_ollama.configure(mode="hang")
    (task,) = submit(sqlite_store, settings)
    wait_until(task_in(sqlite_store, task.task_id, "in_progress"), 10,
               message="the task to be claimed")

    assert stop_pool(settings, 20) == 0

    assert pool.wait(5) == 0
    after = queue.get_task(sqlite_store, task.task_id)
    assert after.status == TaskStatus.PENDING
    assert after.attempts == 0  # given back by its worker: the interrupted run does not count
    assert worker_processes(settings.home) == []
    assert all(w.status == WorkerStatus.OFFLINE
               for w in queue.list_workers(sqlite_store, include_offline=True))


def test_workers_of_a_killed_pool_exit_by_themselves(
    pools: PoolProcesses, pool_settings: Settings, sqlite_store: Store,
) -> None:
    pool = pools.start(pool_settings.with_overrides(min_workers=2))
    wait_until(lambda: len(live_rows(sqlite_store, WorkerStatus.IDLE)) == 2, 20,
               message="two idle workers")
    orphans = worker_processes(pool_settings.home)
    assert len(orphans) == 2

    os.killpg(pool.pid, signal.SIGKILL)
    pool.wait(5)

    wait_until(lambda: not any(pid_alive(pid) for pid in orphans), 10,
               message="the orphaned idle workers to exit")


def test_the_codex_tree_of_a_sigkilled_worker_is_killed_when_the_worker_is_reaped(
    pool_thread: Callable[..., PoolHandle], pool_settings: Settings, sqlite_store: Store,
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    pidfile = tmp_path / "codex.pids"
    # the supervisor passes its environment on to workers, and they to Codex
    monkeypatch.setenv("FAKE_CODEX_MODE", "hang")
    monkeypatch.setenv("FAKE_CODEX_PIDFILE", str(pidfile))
    record = tmp_path / "codex.jsonl"
    monkeypatch.setenv("FAKE_CODEX_RECORD", str(record))
    settings = pool_settings.with_overrides(codex_bin=str(FAKE_CODEX_PATH), workdir=tmp_path,
                                            lease_s=30.0)
    handle = pool_thread(settings)
    wait_until(lambda: handle.health().get("workers", {}).get("idle") == 1, 20,
               message="the first worker to be ready")
    request = queue.validate_request(settings, "hang forever", "code")
    task = queue.enqueue(sqlite_store, request, settings, utcnow()).task
    wait_until(pidfile.exists, 15, message="codex to start")
    pids = json.loads(wait_until(pidfile.read_text, message="the pid file"))
    running = queue.get_task(sqlite_store, task.task_id)
    victim = queue.get_worker(sqlite_store, running.worker_id or "")
    assert victim is not None and victim.pid

    os.kill(victim.pid, signal.SIGKILL)

    wait_until(lambda: not pid_alive(pids["parent"]) and not pid_alive(pids["child"]), 10,
               message="the orphaned codex process tree to be killed")
    argv = json.loads(record.read_text().splitlines()[0])["argv"]
    outfile = Path(argv[argv.index("-o") + 1])
    wait_until(lambda: not outfile.exists(), 10, message="the run's -o file to be removed")
    queue.cancel(sqlite_store, task.task_id, utcnow())
