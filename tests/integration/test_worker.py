"""Real `koubou-mcp worker` processes against the stand-in Ollama and the stand-in Codex CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from koubou_mcp import queue
from koubou_mcp.config import Settings
from koubou_mcp.models import TaskStatus, utcnow
from koubou_mcp.store import Store, open_store
from tests.fakes.ollama_server import FakeOllama
from tests.support.env import child_env
from tests.support.paths import FAKE_CODEX_PATH
from tests.support.processes import Processes, processes, wait_dead, wait_exit
from tests.support.procfs import pid_alive
from tests.support.tasks import ended
from tests.support.waiting import wait_until


@pytest.fixture
def wsettings(settings: Settings, fake_ollama: FakeOllama, tmp_path: Path) -> Settings:
    return settings.with_overrides(ollama_url=fake_ollama.url, codex_bin=str(FAKE_CODEX_PATH),
                                   workdir=tmp_path)


@pytest.fixture
def store(wsettings: Settings) -> Iterator[Store]:
    s = open_store(wsettings.database_url, wsettings.run_dir)
    yield s
    s.close()


@pytest.fixture
def procs() -> Iterator[Processes]:
    with processes() as p:
        yield p


def submit(store: Store, settings: Settings, prompt: str, **fields: object) -> str:
    request = queue.validate_request(settings, prompt, **fields)  # type: ignore[arg-type]
    return queue.enqueue(store, request, settings, utcnow()).task.task_id


def status(store: Store, task_id: str) -> queue.TaskSnapshot:
    return queue.get_task(store, task_id)


def test_a_worker_completes_general_and_code_tasks(
    store: Store, wsettings: Settings, procs: Processes, tmp_path: Path
) -> None:
    record = tmp_path / "codex.jsonl"
    procs.worker(wsettings, "w1", {"FAKE_CODEX_RECORD": str(record)})
    pwned = tmp_path / "pwned"
    hostile = f"--help; $(touch {pwned}); `touch {pwned}`"
    general = submit(store, wsettings, "summarise this")
    code = submit(store, wsettings, hostile, type="code")
    done_general = wait_until(lambda: ended(store, general), timeout=15, message="general task")
    done_code = wait_until(lambda: ended(store, code), timeout=15, message="code task")
    assert (done_general.status, done_general.result) == ("completed", "echo: summarise this")
    assert (done_code.status, done_code.result) == ("completed", f"codex: {hostile}")
    run = json.loads(record.read_text().splitlines()[0])
    assert run["stdin"] == hostile, "the prompt goes on stdin, verbatim"
    assert hostile not in run["argv"]
    assert not pwned.exists(), "nothing in a prompt is ever executed"
    assert run["env"]["CODEX_OSS_BASE_URL"] == wsettings.ollama_url.rstrip("/") + "/v1"
    worker = queue.list_workers(store)[0]
    assert (worker.worker_id, worker.tasks_completed) == ("w1", 2)
    log = wsettings.worker_logs_dir / "w1.log"
    assert "completed" in log.read_text()


def test_a_task_of_a_sigkilled_worker_is_completed_by_another(
    store: Store, wsettings: Settings, procs: Processes, fake_ollama: FakeOllama
) -> None:
    fake_ollama.configure(mode="hang")  # the first run hangs until the worker dies
    first = procs.worker(wsettings, "doomed")
    task_id = submit(store, wsettings, "survive me")
    wait_until(lambda: status(store, task_id).status == "in_progress", message="claim")
    os.killpg(first.pid, signal.SIGKILL)
    wait_exit(first)
    fake_ollama.configure(mode="ok")
    fake_ollama.release()
    procs.worker(wsettings, "rescuer")
    done = wait_until(lambda: ended(store, task_id), timeout=wsettings.lease_s + 15,
                      message="the task to be finished by the rescuer")
    assert (done.status, done.result, done.worker_id) == ("completed", "echo: survive me", "rescuer")
    assert done.attempts == 2


def start_draining(store: Store, settings: Settings, procs: Processes, fake_ollama: FakeOllama,
                   worker_id: str) -> tuple[subprocess.Popen[bytes], str]:
    """A worker whose task hangs in the model, sent one SIGTERM: it is draining when this
    returns. Gives the worker and its task's id."""
    fake_ollama.configure(mode="hang")
    worker = procs.worker(settings, worker_id)
    task_id = submit(store, settings, f"task of {worker_id}")
    wait_until(lambda: fake_ollama.stats()["in_flight"] >= 1, message="the model call to start")
    worker.send_signal(signal.SIGTERM)
    wait_until(lambda: "finishing the current task" in
               (settings.worker_logs_dir / f"{worker_id}.log").read_text(),
               message="the drain to start")
    return worker, task_id


def test_sigterm_lets_the_running_task_finish_then_the_worker_exits(
    store: Store, wsettings: Settings, procs: Processes, fake_ollama: FakeOllama
) -> None:
    worker, task_id = start_draining(store, wsettings, procs, fake_ollama, "drainer")
    assert worker.poll() is None, "the worker must not exit before its task is done"
    fake_ollama.release()
    assert wait_exit(worker) == 0
    done = status(store, task_id)
    assert (done.status, done.attempts) == ("completed", 1)
    assert queue.list_workers(store, include_offline=True)[0].status == "offline"


def test_a_second_sigterm_gives_the_task_back_and_exits(
    store: Store, wsettings: Settings, procs: Processes, fake_ollama: FakeOllama
) -> None:
    worker, task_id = start_draining(store, wsettings, procs, fake_ollama, "quitter")
    worker.send_signal(signal.SIGTERM)
    assert wait_exit(worker) == 0
    back = status(store, task_id)
    assert (back.status, back.attempts) == ("pending", 0)


def test_a_task_past_its_timeout_fails_and_is_not_retried(
    store: Store, wsettings: Settings, procs: Processes, fake_ollama: FakeOllama
) -> None:
    fake_ollama.configure(mode="hang")
    procs.worker(wsettings, "w1")
    task_id = submit(store, wsettings, "too slow", timeout_s=1)
    done = wait_until(lambda: ended(store, task_id), timeout=15, message="timeout")
    assert (done.status, done.error, done.attempts) == ("failed", "timed out after 1 s", 1)
    fake_ollama.release()
    fake_ollama.configure(mode="ok")
    after = submit(store, wsettings, "still healthy?")
    assert wait_until(lambda: ended(store, after), timeout=15).status == "completed"


def test_cancel_kills_a_hanging_codex_process_tree(
    store: Store, wsettings: Settings, procs: Processes, tmp_path: Path
) -> None:
    pidfile = tmp_path / "codex.pids"
    procs.worker(wsettings, "w1", {"FAKE_CODEX_MODE": "hang", "FAKE_CODEX_PIDFILE": str(pidfile)})
    task_id = submit(store, wsettings, "never ends", type="code")
    wait_until(pidfile.exists, timeout=15, message="the codex stand-in to start")
    pids = json.loads(wait_until(pidfile.read_text, message="pid file content"))
    assert pid_alive(pids["parent"]) and pid_alive(pids["child"])
    queue.cancel(store, task_id, utcnow())
    done = wait_until(lambda: ended(store, task_id), timeout=5, message="cancel within 2 s")
    assert done.status == TaskStatus.CANCELLED
    wait_dead(pids["parent"])
    wait_dead(pids["child"])


def test_codex_sees_an_allow_listed_environment_without_koubous_secrets(
    store: Store, wsettings: Settings, procs: Processes, tmp_path: Path
) -> None:
    record = tmp_path / "codex.jsonl"
    settings = wsettings.with_overrides(http_token="t" * 32,
                                        codex_env_pass="FAKE_CODEX_*, MY_TOOL_HOME")
    procs.worker(settings, "w1", {
        "FAKE_CODEX_RECORD": str(record), "FAKE_CODEX_ENV_RECORD": "1",
        "AWS_SECRET_ACCESS_KEY": "cloud-secret", "DATABASE_URL": "postgresql://u:pw@db/x",
        "MY_TOOL_HOME": "/opt/tool", "LC_ALL": "C.UTF-8", "OLLAMA_MODELS": "/models",
        "CODEX_HOME": str(tmp_path / "codex-home"),
    })
    code = submit(store, settings, "hello", type="code")
    assert wait_until(lambda: ended(store, code), timeout=15).status == "completed"
    names = set(json.loads(record.read_text().splitlines()[0])["env_names"])
    assert {"PATH", "HOME", "LC_ALL", "OLLAMA_MODELS", "CODEX_HOME", "CODEX_OSS_BASE_URL",
            "MY_TOOL_HOME", "FAKE_CODEX_RECORD"} <= names
    assert not {n for n in names if n.startswith("KOUBOU_")}, "no token, no database URL"
    assert not names & {"AWS_SECRET_ACCESS_KEY", "DATABASE_URL", "WORKER_ID"}


def test_a_codex_descendant_that_left_the_process_group_is_killed_at_the_runs_end(
    store: Store, wsettings: Settings, procs: Processes, tmp_path: Path
) -> None:
    pidfile = tmp_path / "codex.pids"
    procs.worker(wsettings, "w1", {"FAKE_CODEX_ESCAPE": "1", "FAKE_CODEX_PIDFILE": str(pidfile)})
    code = submit(store, wsettings, "leave something behind", type="code")
    try:
        assert wait_until(lambda: ended(store, code), timeout=15).status == "completed"
        pids = json.loads(wait_until(pidfile.read_text, message="pid file content"))
        wait_dead(pids["escaped"])
    finally:
        pids = json.loads(pidfile.read_text()) if pidfile.exists() else {}
        if pids and pid_alive(pids["escaped"]):
            os.kill(pids["escaped"], signal.SIGKILL)


def test_a_backend_error_fails_the_task_and_the_worker_stays_healthy(
    store: Store, wsettings: Settings, procs: Processes
) -> None:
    procs.worker(wsettings, "w1", {"FAKE_CODEX_MODE": "fail"})
    bad = submit(store, wsettings, "break", type="code")
    done = wait_until(lambda: ended(store, bad), timeout=15, message="failure")
    assert done.status == "failed" and done.error_kind == "codex_exit"
    good = submit(store, wsettings, "fine")
    assert wait_until(lambda: ended(store, good), timeout=15).status == "completed"


def test_a_supervised_worker_exits_after_its_task_when_the_supervisor_dies(
    store: Store, wsettings: Settings, tmp_path: Path
) -> None:
    # A stand-in supervisor: starts a worker as its child, then waits to be killed.
    script = textwrap.dedent("""
        import os, subprocess, sys, time
        env = dict(os.environ, KOUBOU_SUPERVISOR_PID=str(os.getpid()), WORKER_ID="orphan")
        log = open(sys.argv[1], "ab")
        child = subprocess.Popen([sys.executable, "-m", "koubou_mcp", "worker"], env=env,
                                 stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                 start_new_session=True)
        print(child.pid, flush=True)
        time.sleep(3600)  # until the test kills this stand-in supervisor
    """)
    parent = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "orphan.log")],
                              env=child_env(wsettings), stdout=subprocess.PIPE,
                              stdin=subprocess.DEVNULL)
    worker_pid = 0
    try:
        assert parent.stdout is not None
        worker_pid = int(parent.stdout.readline())
        wait_until(lambda: any(w.worker_id == "orphan" and w.status == "idle"
                               for w in queue.list_workers(store)), message="worker idle")
        parent.kill()
        parent.wait(timeout=10)
        wait_dead(worker_pid, timeout=10)
        assert queue.list_workers(store) == []
    finally:
        parent.kill()
        if worker_pid and pid_alive(worker_pid):
            os.kill(worker_pid, signal.SIGKILL)
