"""The ``koubou-mcp`` command as a user runs it: real processes, real exit codes, real stdin."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from koubou_mcp.config import Settings
from tests.e2e.conftest import Leftovers
from tests.fakes.ollama_server import FakeOllama
from tests.support.env import child_env
from tests.support.processes import bound_by_file_modes, koubou_command
from tests.support.procfs import worker_processes
from tests.support.waiting import wait_until

RECORD_KEYS = {"task_id", "type", "status", "priority", "result", "error", "attempts",
               "max_attempts", "worker_id", "created_at", "finished_at", "duration_s"}


def koubou(settings: Settings, *args: str, stdin: bytes | None = None,
           timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``koubou-mcp ARGS`` to completion, in the settings' environment."""
    raw = subprocess.run([koubou_command(), *args], env=child_env(settings), input=stdin,
                         capture_output=True, timeout=timeout, check=False,
                         stdin=None if stdin is not None else subprocess.DEVNULL)
    return subprocess.CompletedProcess(raw.args, raw.returncode, raw.stdout.decode(),
                                       raw.stderr.decode())


def as_json(result: subprocess.CompletedProcess[str]) -> Any:
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1, "--json prints one JSON document on one line"
    return json.loads(lines[0])


def no_traceback(result: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in result.stderr + result.stdout, result.stderr


def test_submit_status_tasks_cancel_and_stats_print_the_documented_json(
    e2e_settings: Settings,
) -> None:
    plain = koubou(e2e_settings, "submit", "first task")
    assert plain.returncode == 0 and plain.stdout.strip().startswith("task_")
    first = plain.stdout.strip()

    submitted = as_json(koubou(e2e_settings, "submit", "second task", "--type", "code",
                               "--priority", "9", "--json"))
    assert RECORD_KEYS <= set(submitted)
    assert (submitted["status"], submitted["type"], submitted["priority"]) == ("pending", "code", 9)

    status = as_json(koubou(e2e_settings, "status", first, "--json"))
    assert RECORD_KEYS <= set(status) and status["prompt"] == "first task"

    listed = as_json(koubou(e2e_settings, "tasks", "--json"))
    assert set(listed) == {"tasks", "counts"}
    assert [t["task_id"] for t in listed["tasks"]] == [submitted["task_id"], first]
    assert listed["counts"]["pending"] == 2

    cancelled = as_json(koubou(e2e_settings, "cancel", first, "--json"))
    assert cancelled["status"] == "cancelled"
    text = koubou(e2e_settings, "tasks", "--status", "cancelled")
    assert text.returncode == 0 and first in text.stdout

    stats = as_json(koubou(e2e_settings, "stats", "--json"))
    assert {"tasks", "queue_depth", "avg_duration_s", "avg_wait_s", "workers"} <= set(stats)
    assert (stats["tasks"]["cancelled"], stats["queue_depth"]) == (1, 1)
    block = koubou(e2e_settings, "stats")
    assert "Worker Pool Statistics" in block.stdout


def test_submit_dash_reads_the_prompt_from_stdin_verbatim(e2e_settings: Settings) -> None:
    prompt = "line one\n  line two — ünïcode ✓\n$(not run) `nor this`\n"
    task_id = koubou(e2e_settings, "submit", "-", stdin=prompt.encode()).stdout.strip()
    assert as_json(koubou(e2e_settings, "status", task_id, "--json"))["prompt"] == prompt


def test_invalid_utf8_on_stdin_exits_2_and_stores_nothing(e2e_settings: Settings) -> None:
    koubou(e2e_settings, "submit", "the only task")
    result = koubou(e2e_settings, "submit", "-", stdin=b"caf\xe9 \xff\xfe")
    assert result.returncode == 2
    assert "not valid UTF-8" in result.stderr
    no_traceback(result)
    listed = as_json(koubou(e2e_settings, "tasks", "--json"))
    assert [t["type"] for t in listed["tasks"]] == ["general"], "nothing more was stored"


@pytest.mark.parametrize("args", [
    ("submit",),
    ("submit", "x", "--priority", "11"),
    ("submit", "x", "--priority", "high"),
    ("submit", "x", "--type", "poem"),
    ("submit", "x", "--timeout", "-1"),
    ("submit", " "),
    ("tasks", "--limit", "0"),
    ("tasks", "--status", "done"),
    ("status", "task_does_not_exist"),
    ("cancel", "task_does_not_exist"),
    ("serve", "--transport", "carrier-pigeon"),
    ("--no-such-flag",),
])
def test_usage_errors_exit_2_with_a_message(e2e_settings: Settings, args: tuple[str, ...]) -> None:
    koubou(e2e_settings, "submit", "x")  # the database exists: status/cancel reach their check
    result = koubou(e2e_settings, *args)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stderr.strip()
    no_traceback(result)


def test_cancelling_a_finished_task_exits_2(e2e_settings: Settings, pool: None) -> None:
    done = koubou(e2e_settings, "submit", "finish", "--wait", "--json", timeout=60)
    task_id = as_json(done)["task_id"]
    result = koubou(e2e_settings, "cancel", task_id)
    assert result.returncode == 2 and "already completed" in result.stderr


def test_help_names_the_env_var_of_each_flag(e2e_settings: Settings) -> None:
    out = koubou(e2e_settings, "serve", "--help").stdout
    for env in ("KOUBOU_HOME", "KOUBOU_MIN_WORKERS", "KOUBOU_MAX_WORKERS", "KOUBOU_OLLAMA_URL"):
        assert env in out
    assert "--no-pool" in out
    assert koubou(e2e_settings, "--version").stdout.startswith("koubou-mcp ")


# -- a pool, for commands that wait -------------------------------------------------------

@pytest.fixture
def pool(e2e_settings: Settings, leftovers: Leftovers, tmp_path: Path) -> Iterator[None]:
    """``koubou-mcp pool`` in the background, stopped (``koubou-mcp stop``, then killed)."""
    log = open(tmp_path / "pool.out", "wb")  # noqa: SIM115 - closed below
    try:
        process = subprocess.Popen([koubou_command(), "pool"], env=child_env(e2e_settings),
                                   stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                   start_new_session=True)
    finally:
        log.close()
    leftovers.add(process.pid)
    try:
        wait_until(lambda: worker_processes(e2e_settings.home), timeout=15,
                   message="the pool's first worker")
        yield None
    finally:
        koubou(e2e_settings, "stop", "--timeout", "10")
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


def test_submit_wait_prints_the_result_once_a_pool_ran_it(
    e2e_settings: Settings, pool: None
) -> None:
    general = koubou(e2e_settings, "submit", "hello pool", "--wait", timeout=60)
    assert general.returncode == 0, general.stderr
    assert "completed" in general.stdout and general.stdout.rstrip().endswith("echo: hello pool")
    code = as_json(koubou(e2e_settings, "submit", "make it so", "--type", "code", "--wait",
                          "--json", timeout=60))
    assert (code["status"], code["result"]) == ("completed", "codex: make it so")


def test_submit_wait_gives_up_at_the_wait_timeout_with_exit_1(e2e_settings: Settings) -> None:
    result = koubou(e2e_settings, "submit", "nobody runs me", "--wait", "--wait-timeout", "0.3",
                    "--json")
    assert result.returncode == 1
    assert json.loads(result.stdout)["status"] == "pending"


# -- doctor -------------------------------------------------------------------------------

def test_doctor_passes_with_ollama_its_models_and_codex(e2e_settings: Settings) -> None:
    text = koubou(e2e_settings, "doctor")
    assert text.returncode == 0, text.stdout
    # Claude Code does not see the venv's PATH: the suggested command names this executable
    assert f"all good: register the server with `claude mcp add koubou -- {koubou_command()}`" \
        in text.stdout
    report = as_json(koubou(e2e_settings, "doctor", "--json"))
    assert report["ok"] is True and report["problems"] == 0 and report["warnings"] == 0
    assert report["register"] == f"claude mcp add koubou -- {koubou_command()}"
    assert [c["name"] for c in report["checks"]] == ["home", "database", "ollama", "codex", "pool"]
    assert all(c["ok"] for c in report["checks"])
    assert not (e2e_settings.home / "db").exists(), "doctor creates no database"


def test_doctor_says_how_to_fix_a_missing_model_and_a_missing_codex(
    e2e_settings: Settings, fake_ollama: FakeOllama
) -> None:
    unwell = e2e_settings.with_overrides(code_model="qwen3-coder:30b", codex_bin="no-such-codex")
    result = koubou(unwell, "doctor")
    assert result.returncode == 1
    assert "FAIL  ollama" in result.stdout and "ollama pull qwen3-coder:30b" in result.stdout
    assert "warn  codex" in result.stdout and "npm i -g @openai/codex" in result.stdout
    no_traceback(result)
    report = json.loads(koubou(unwell, "doctor", "--json").stdout)
    assert report["ok"] is False and (report["problems"], report["warnings"]) == (1, 1)


def test_doctor_passes_with_a_warning_when_only_the_optional_codex_is_missing(
    e2e_settings: Settings,
) -> None:
    no_codex = e2e_settings.with_overrides(codex_bin="no-such-codex")
    result = koubou(no_codex, "doctor")
    assert result.returncode == 0, result.stdout
    assert "warn  codex" in result.stdout and "only `code` tasks need it" in result.stdout
    assert "all good (1 warning: codex): register the server with `claude mcp add koubou -- " \
        f"{koubou_command()}`" in result.stdout
    assert "FAIL" not in result.stdout
    report = as_json(koubou(no_codex, "doctor", "--json"))
    assert report["ok"] is True and (report["problems"], report["warnings"]) == (0, 1)
    codex = next(c for c in report["checks"] if c["name"] == "codex")
    assert codex["ok"] is False and codex["optional"] is True


def test_doctor_names_koubou_mcp_by_its_absolute_path_when_run_as_a_module(
    e2e_settings: Settings,
) -> None:
    raw = subprocess.run([sys.executable, "-m", "koubou_mcp", "doctor", "--json"],
                         env=child_env(e2e_settings), capture_output=True, text=True,
                         timeout=60, check=False, stdin=subprocess.DEVNULL)
    assert raw.returncode == 0, raw.stderr
    assert json.loads(raw.stdout)["register"] == \
        f"claude mcp add koubou -- {Path(sys.executable).absolute()} -m koubou_mcp"


def test_doctor_reports_an_unreachable_ollama(e2e_settings: Settings) -> None:
    with FakeOllama() as gone:
        url = gone.url
    result = koubou(e2e_settings.with_overrides(ollama_url=url), "doctor")
    assert result.returncode == 1
    assert "cannot reach Ollama" in result.stdout and "ollama serve" in result.stdout


def test_doctor_explains_a_corrupt_database_without_a_traceback(e2e_settings: Settings) -> None:
    db = e2e_settings.home / "db" / "koubou.db"
    db.parent.mkdir(parents=True)
    db.write_bytes(b"this is not a database" * 100)
    result = koubou(e2e_settings, "doctor")
    assert result.returncode == 1
    assert "FAIL  database" in result.stdout and "corrupt" in result.stdout
    no_traceback(result)


def test_doctor_explains_a_database_directory_that_cannot_be_created(
    e2e_settings: Settings, tmp_path: Path
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("in the way")
    broken = e2e_settings.with_overrides(database_url=f"sqlite:///{blocker}/db/koubou.db")
    result = koubou(broken, "doctor")
    assert result.returncode == 1
    assert "FAIL  database" in result.stdout and "is not a directory" in result.stdout
    no_traceback(result)
    report = json.loads(koubou(broken, "doctor", "--json").stdout)
    database = next(c for c in report["checks"] if c["name"] == "database")
    assert database["ok"] is False and database["fix"]


def test_doctor_reports_a_read_only_database(e2e_settings: Settings) -> None:
    """As root every file is writable, so then the doctor runs without the capabilities that
    override file modes (``bound_by_file_modes``), wherever the checkout is."""
    bound = bound_by_file_modes()
    home = Path(tempfile.mkdtemp(prefix="koubou-ro-"))
    try:
        settings = e2e_settings.with_overrides(home=home, database_url="")  # "": under home
        assert koubou(settings, "submit", "make the database").returncode == 0
        db = settings.home / "db" / "koubou.db"
        db.chmod(0o444)
        db.parent.chmod(0o555)
        raw = subprocess.run([*bound, koubou_command(), "doctor"], env=child_env(settings),
                             capture_output=True, timeout=60, check=False,
                             stdin=subprocess.DEVNULL)
        out = raw.stdout.decode()
        assert raw.returncode == 1, (out, raw.stderr.decode())
        assert "FAIL  database" in out and "read-only" in out
        assert "Traceback" not in raw.stderr.decode()
    finally:
        for path in home.rglob("*"):
            path.chmod(0o700 if path.is_dir() else 0o600)
        shutil.rmtree(home, ignore_errors=True)


def test_a_process_bound_by_file_modes_still_reads_a_checkout_only_we_may_enter(
    tmp_path: Path,
) -> None:
    """What the read-only test relies on: the bound child cannot write a read-only file, yet
    it runs code from a directory nobody but us may enter (a checkout under a 0700 home)."""
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    (private / "probe.py").write_text(
        "import os, sys\n"
        "target = sys.argv[1]\n"
        "print('writable' if os.access(target, os.W_OK) else 'read-only')\n")
    locked = tmp_path / "locked.txt"
    locked.write_text("x")
    locked.chmod(0o444)
    raw = subprocess.run([*bound_by_file_modes(), sys.executable, str(private / "probe.py"),
                          str(locked)], capture_output=True, timeout=30, check=False,
                         stdin=subprocess.DEVNULL)
    assert raw.returncode == 0, raw.stderr.decode()
    assert raw.stdout.decode().strip() == "read-only"


# -- hostile text, closed pipes, nothing to run the task ----------------------------------

def test_escape_sequences_in_prompts_and_results_are_shown_not_sent_to_the_terminal(
    e2e_settings: Settings,
) -> None:
    hostile = "hi \x1b]0;pwned\x07 \x1b[2J \x9b31m \u202eevil"
    submitted = koubou(e2e_settings, "submit", hostile)
    assert submitted.returncode == 0, submitted.stderr
    task_id = submitted.stdout.strip()
    for args in (("tasks",), ("status", task_id), ("status", task_id, "--json"),
                 ("tasks", "--json")):
        shown = koubou(e2e_settings, *args)
        assert shown.returncode == 0, shown.stderr
        assert not any(c in shown.stdout for c in "\x1b\x07\x9b\u202e"), (args, shown.stdout)
    listing = koubou(e2e_settings, "tasks").stdout
    assert "\\x1b]0;pwned\\x07" in listing and "\\u202eevil" in listing
    record = json.loads(koubou(e2e_settings, "tasks", "--json").stdout)["tasks"][0]
    assert "\x1b" not in json.dumps(record)


def test_a_listing_piped_into_head_ends_quietly(e2e_settings: Settings) -> None:
    from koubou_mcp import queue
    from koubou_mcp.models import utcnow
    from koubou_mcp.store import open_store

    store = open_store(e2e_settings.database_url, e2e_settings.run_dir)
    try:
        for i in range(1000):  # far more than a pipe holds, so the writer meets a closed pipe
            request = queue.validate_request(e2e_settings, f"task number {i} " + "x" * 80)
            queue.enqueue(store, request, e2e_settings, utcnow())
    finally:
        store.close()
    command = f"{koubou_command()} tasks --limit 1000 | head -n 1"
    piped = subprocess.run(["bash", "-o", "pipefail", "-c", command], env=child_env(e2e_settings),
                           capture_output=True, text=True, timeout=60, check=False,
                           stdin=subprocess.DEVNULL)
    assert len(piped.stdout.splitlines()) == 1
    assert piped.stderr == "", piped.stderr
    assert piped.returncode == 141, "as a command killed by SIGPIPE reports"


def test_submit_wait_with_nothing_to_run_the_task_says_so_and_does_not_hang(
    e2e_settings: Settings,
) -> None:
    result = koubou(e2e_settings, "submit", "nobody runs me", "--wait", timeout=30)
    assert result.returncode == 1
    task_id = result.stdout.strip()
    assert task_id.startswith("task_")
    assert f"{task_id} is queued, but no pool or worker runs" in result.stderr
    assert "koubou-mcp pool" in result.stderr


# -- delegation from the shell ----------------------------------------------------------------

def test_submit_with_files_batch_and_wait_run_on_a_worker(
    e2e_settings: Settings, fake_ollama: FakeOllama, tmp_path: Path,
) -> None:
    from tests.support.processes import processes

    (e2e_settings.workdir / "todo.txt").write_text("buy milk\n")
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"n": {"type": "integer"}},
                                  "required": ["n"]}))
    with processes() as procs:
        procs.worker(e2e_settings, "w-cli")
        done = as_json(koubou(e2e_settings, "submit", "what is on the list?", "--file",
                              "todo.txt", "--option", "temperature=0", "--system", "be brief",
                              "--wait", "--wait-timeout", "30", "--json"))
        assert done["status"] == "completed" and "buy milk" in done["result"]
        assert (done["workdir"], done["files"], done["options"]) == (
            str(e2e_settings.workdir.resolve()), ["todo.txt"], {"temperature": 0.0})
        batch = tmp_path / "batch.json"
        batch.write_text(json.dumps([{"prompt": "one"},
                                     {"prompt": "two", "output_schema": json.loads(
                                         schema.read_text())}]))
        ids = koubou(e2e_settings, "submit-batch", str(batch)).stdout.split()
        assert len(ids) == 2 and all(i.startswith("task_") for i in ids)
        waited = as_json(koubou(e2e_settings, "wait", *ids, "--timeout", "30", "--json"))
        assert waited["done"] and waited["ended"] == ids
        assert waited["tasks"][1]["result_json"] == {"n": 0}
        text = koubou(e2e_settings, "status", ids[0])
        assert f"workdir: {e2e_settings.workdir.resolve()}" in text.stdout
        listed = koubou(e2e_settings, "tasks")
        assert f"[{e2e_settings.workdir.resolve()}]" in listed.stdout
        one = koubou(e2e_settings, "submit", "x", "--output-schema", f"@{schema}", "--wait",
                     "--wait-timeout", "30")
        assert one.returncode == 0, one.stderr


@pytest.mark.parametrize("args, says", [
    (("submit", "x", "--file", "../../etc/passwd"), "outside the task's workdir"),
    (("submit", "x", "--file", "missing.txt"), "does not exist"),
    (("submit", "x", "--workdir", "/no/such/dir"), "does not exist"),
    (("submit", "x", "--model", "mistral"), "the models that work"),
    (("submit", "x", "--option", "top_k=3"), "unknown key(s) top_k"),
    (("submit", "x", "--option", "temperature"), "KEY=VALUE"),
    (("submit", "x", "--output-schema", "{not json"), "is not JSON"),
    (("submit", "x", "--output-schema", '{"type": 5}'), "not a valid JSON Schema"),
    (("submit", "x", "--type", "code", "--system", "s"), "general tasks only"),
    (("wait", "task_nope"), "no task with id 'task_nope'"),
])
def test_bad_delegation_input_exits_2_and_stores_nothing(
    e2e_settings: Settings, args: tuple[str, ...], says: str, tmp_path: Path,
) -> None:
    koubou(e2e_settings, "submit", "the only task")
    result = koubou(e2e_settings, *args)
    assert result.returncode == 2, result.stderr
    assert says in result.stderr, result.stderr
    no_traceback(result)
    listed = as_json(koubou(e2e_settings, "tasks", "--json"))
    assert len(listed["tasks"]) == 1, "nothing more was stored"


def test_a_batch_with_a_bad_task_stores_none(e2e_settings: Settings, tmp_path: Path) -> None:
    batch = tmp_path / "batch.json"
    batch.write_text(json.dumps([{"prompt": "fine"}, {"prompt": "bad", "files": ["nope"]}]))
    result = koubou(e2e_settings, "submit-batch", str(batch))
    assert result.returncode == 2 and "tasks[1]: files[0] ('nope') does not exist" in result.stderr
    koubou(e2e_settings, "submit", "the only task")
    assert len(as_json(koubou(e2e_settings, "tasks", "--json"))["tasks"]) == 1
