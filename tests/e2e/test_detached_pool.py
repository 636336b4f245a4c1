"""The pool outlives sessions: the stdio server, started as Claude Code starts it, runs the pool
in a background process of its own (``koubou-mcp pool --detached``), and killing the server,
or its whole process group, never stops running or queued work. The pool leaves by itself
once idle with no server attached, and ``koubou-mcp stop`` stops it."""

from __future__ import annotations

import os
import signal
from contextlib import closing
from pathlib import Path

from koubou_mcp import queue
from koubou_mcp.attachment import servers_dir
from koubou_mcp.config import Settings
from koubou_mcp.store import open_store
from tests.e2e.conftest import Leftovers
from tests.e2e.raw_server import RawServer, background_pool, pool_holder, stop_pool
from tests.fakes.ollama_server import FakeOllama
from tests.support.processes import run_cli
from tests.support.procfs import pid_alive, worker_processes
from tests.support.tasks import ended
from tests.support.waiting import wait_until


def test_killing_the_servers_whole_process_group_never_stops_running_or_queued_work(
    e2e_settings: Settings, fake_ollama: FakeOllama, leftovers: Leftovers, tmp_path: Path
) -> None:
    fake_ollama.configure(latency_s=2.0)
    server = RawServer(e2e_settings, tmp_path, leftovers)
    pool = background_pool(e2e_settings)
    assert os.getsid(pool.pid) == pool.pid != os.getsid(server.pid), "a session of its own"
    assert os.getpgid(pool.pid) != os.getpgid(server.pid)
    assert server.health()["supervisor"]["pid"] == pool.pid

    running = server.delegate("running when the session ends")["task_id"]
    with closing(open_store(e2e_settings.database_url, e2e_settings.run_dir)) as store:
        wait_until(lambda: queue.get_task(store, running).status == "in_progress", timeout=20,
                   message="the first task to run")
        queued = [server.delegate(f"queued {i}")["task_id"] for i in range(3)]
        assert "pending" in {queue.get_task(store, t).status for t in queued}

        os.killpg(server.pid, signal.SIGKILL)  # what a client ending its session may do
        server.proc.wait(timeout=10)

        for task_id in [running, *queued]:
            done = wait_until(lambda t=task_id: ended(store, t), timeout=60,
                              message=f"{task_id} to end after the server was killed")
            assert done.status == "completed", (done.status, done.error)
        assert queue.get_task(store, running).result == "echo: running when the session ends"
    assert pid_alive(pool.pid) and pool_holder(e2e_settings) == pool, "the same pool went on"
    stop_pool(e2e_settings)


def test_a_second_server_attaches_to_the_pool_and_the_pool_stays_when_both_are_gone(
    e2e_settings: Settings, leftovers: Leftovers, tmp_path: Path
) -> None:
    first = RawServer(e2e_settings, tmp_path, leftovers, "first")
    pool = background_pool(e2e_settings)
    second = RawServer(e2e_settings, tmp_path, leftovers, "second")
    health = second.health()
    assert health["status"] == "ok", health["problems"]
    supervisor = health["supervisor"]
    assert f"a background pool, pid {pool.pid}" in supervisor["summary"]
    assert "2 servers attached" in supervisor["summary"]
    assert supervisor["detached"] is True
    assert sorted(supervisor["attached_servers"]) == sorted([first.pid, second.pid])
    done = second.delegate("via the second", sync=True, wait_s=30)
    assert (done["status"], done["result"]) == ("completed", "echo: via the second")
    published = wait_until(lambda: second.health()["supervisor"].get("workers"), timeout=10,
                           message="the pool's own account of its workers")
    assert published["total"] >= 1, "the pool publishes its workers for attached servers"
    doctor = run_cli(e2e_settings, "doctor")
    assert f"a background pool, pid {pool.pid} (detached" in doctor.stdout, doctor.stdout
    top = run_cli(e2e_settings, "top", "--once")
    assert f"pool: a background pool, pid {pool.pid}" in top.stdout, top.stdout
    assert "2 servers attached" in top.stdout

    for server in (first, second):
        assert server.proc.stdin is not None
        server.proc.stdin.close()  # the sessions end
        assert server.proc.wait(timeout=10) == 0
    assert not list(servers_dir(e2e_settings.run_dir).iterdir()), "both left their markers"
    assert pid_alive(pool.pid) and pool_holder(e2e_settings) == pool
    stop_pool(e2e_settings)


def test_the_background_pool_stays_while_a_server_is_attached_then_leaves_by_itself(
    e2e_settings: Settings, leftovers: Leftovers, tmp_path: Path
) -> None:
    settings = e2e_settings.with_overrides(pool_linger_s=1.0)
    server = RawServer(settings, tmp_path, leftovers)
    pool = background_pool(settings)
    assert server.delegate("one", sync=True, wait_s=30)["status"] == "completed"
    marker = servers_dir(settings.run_dir) / str(server.pid)
    first_beat = marker.stat().st_mtime
    # several beats later (more than the linger), the idle pool is still there
    wait_until(lambda: marker.stat().st_mtime >= first_beat + 3.0, timeout=20,
               message="the server to renew its marker for 3 s")
    assert pid_alive(pool.pid), "an attached server keeps the idle pool"

    assert server.proc.stdin is not None
    server.proc.stdin.close()
    assert server.proc.wait(timeout=10) == 0
    wait_until(lambda: not pid_alive(pool.pid), timeout=30,
               message="the pool to leave once alone and idle")
    wait_until(lambda: not worker_processes(settings.home), timeout=20,
               message="its workers to be gone")
    log = (settings.logs_dir / "worker_pool.log").read_text()
    assert "no task and no server attached for 1s: the background pool exits" in log


def test_stop_drains_the_background_pool_and_an_attached_server_waits_for_new_work(
    e2e_settings: Settings, fake_ollama: FakeOllama, leftovers: Leftovers, tmp_path: Path
) -> None:
    fake_ollama.configure(latency_s=1.5)
    server = RawServer(e2e_settings, tmp_path, leftovers)
    pool = background_pool(e2e_settings)
    task_id = server.delegate("finish before stopping")["task_id"]
    with closing(open_store(e2e_settings.database_url, e2e_settings.run_dir)) as store:
        wait_until(lambda: queue.get_task(store, task_id).status == "in_progress", timeout=20,
                   message="the task to run")
        stopped = run_cli(e2e_settings, "stop", "--timeout", "30")
        assert stopped.returncode == 0, stopped.stderr
        assert f"stopping the background pool (pid {pool.pid})" in stopped.stdout
        assert queue.get_task(store, task_id).status == "completed", "drained, not dropped"
    assert not pid_alive(pool.pid)
    health = server.health()
    assert "stopped with `koubou-mcp stop`" in health["supervisor"]["summary"]
    marker = servers_dir(e2e_settings.run_dir) / str(server.pid)
    beat = marker.stat().st_mtime
    wait_until(lambda: marker.stat().st_mtime > beat, timeout=20,
               message="a beat of the attached server")
    assert pool_holder(e2e_settings) is None, "the beat does not undo a stop"

    again = server.delegate("new work starts it again", sync=True, wait_s=30)
    assert again["status"] == "completed"
    assert background_pool(e2e_settings).pid != pool.pid
    stop_pool(e2e_settings)

    missing = run_cli(e2e_settings, "stop")
    assert missing.returncode == 1 and "no pool is running" in missing.stderr
    bad = run_cli(e2e_settings, "stop", "--timeout", "soon")
    assert bad.returncode == 2 and "--timeout" in bad.stderr and "expected" in bad.stderr
