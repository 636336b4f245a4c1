"""Tasks with a project directory, files, a model, a system prompt, options and an output
schema, run by a real `koubou-mcp worker` process against the stand-in Ollama and Codex."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from koubou_mcp import service
from koubou_mcp.config import Settings
from koubou_mcp.models import utcnow
from koubou_mcp.queue import enqueue, get_task
from koubou_mcp.store import Store, open_store
from tests.fakes.ollama_server import FakeOllama
from tests.support.paths import FAKE_CODEX_PATH
from tests.support.processes import Processes, processes
from tests.support.tasks import ended
from tests.support.waiting import wait_until

SCHEMA = {"type": "object", "properties": {"summary": {"type": "string"},
                                           "files": {"type": "integer", "minimum": 0}},
          "required": ["summary", "files"]}


@pytest.fixture
def fake() -> Iterator[FakeOllama]:
    with FakeOllama(models=["gpt-oss:20b", "llama3.2:latest"]) as server:
        yield server


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    (root / "src").mkdir(parents=True)
    (root / "src" / "app.py").write_text("def main():\n    return 42\n")
    (root / "README.md").write_text("# The app\n")
    return root


@pytest.fixture
def wsettings(settings: Settings, fake: FakeOllama, tmp_path: Path) -> Settings:
    server_dir = tmp_path / "server-cwd"
    server_dir.mkdir()
    return settings.with_overrides(ollama_url=fake.url, codex_bin=str(FAKE_CODEX_PATH),
                                   workdir=server_dir)


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
    models = lambda: ["gpt-oss:20b", "llama3.2:latest"]  # noqa: E731
    request = service.validate(settings, prompt, models=models, **fields)  # type: ignore[arg-type]
    return enqueue(store, request, settings, utcnow()).task.task_id


def test_the_worker_reads_the_files_when_the_task_runs_and_the_model_gets_each_under_a_header(
    store: Store, wsettings: Settings, procs: Processes, fake: FakeOllama, project: Path,
) -> None:
    task_id = submit(store, wsettings, "Summarise the project.", workdir=str(project),
                     files=["src/app.py", str(project / "README.md")])
    stored = get_task(store, task_id)
    assert stored.file_list == ["src/app.py", str(project / "README.md")]
    assert "return 42" not in (stored.files or ""), "the task keeps paths, not copies"
    (project / "README.md").write_text("# The app, changed after submit\n")
    procs.worker(wsettings, "w1")
    done = wait_until(lambda: ended(store, task_id), timeout=15, message="the task to end")
    assert done.status == "completed"
    [prompt] = fake.stats()["prompts"]
    assert prompt.startswith("Summarise the project.\n")
    assert "===== file: src/app.py (26 bytes) =====\ndef main():\n    return 42\n" \
           "===== end of file: src/app.py =====" in prompt
    assert "# The app, changed after submit" in prompt, "files are read when the task runs"


def test_a_file_gone_by_run_time_fails_the_task_saying_which(
    store: Store, wsettings: Settings, procs: Processes, fake: FakeOllama, project: Path,
) -> None:
    task_id = submit(store, wsettings, "x", workdir=str(project), files=["README.md"])
    (project / "README.md").unlink()
    procs.worker(wsettings, "w1")
    done = wait_until(lambda: ended(store, task_id), timeout=15, message="the task to end")
    assert (done.status, done.error_kind, done.attempts) == ("failed", "file_unusable", 1)
    assert "files[0] ('README.md') does not exist" in (done.error or "")
    assert fake.stats()["requests"] == 0


def test_model_system_options_and_schema_reach_ollama_and_the_parsed_answer_comes_back(
    store: Store, wsettings: Settings, procs: Processes, fake: FakeOllama,
) -> None:
    task_id = submit(store, wsettings, "Describe it.", model="llama3.2",
                     system="Answer in JSON.", options={"temperature": 0, "seed": 7},
                     output_schema=SCHEMA)
    procs.worker(wsettings, "w1")
    done = wait_until(lambda: ended(store, task_id), timeout=15, message="the task to end")
    assert done.status == "completed", done.error
    [call] = fake.stats()["calls"]
    assert (call["model"], call["system"], call["roles"]) == ("llama3.2", "Answer in JSON.",
                                                              ["system", "user"])
    assert call["options"] == {"temperature": 0.0, "seed": 7} and call["format"] == SCHEMA
    record = service.TaskRecord.of(done)
    assert record.result_json == {"summary": "echo: Describe it.", "files": 0}
    assert json.loads(record.result or "") == record.result_json
    assert (record.model, record.system, record.options) == (
        "llama3.2", "Answer in JSON.", {"temperature": 0.0, "seed": 7})


def test_an_answer_that_misses_the_schema_twice_fails_with_the_reason(
    store: Store, wsettings: Settings, procs: Processes, fake: FakeOllama,
) -> None:
    fake.configure(misfit_next=2)
    task_id = submit(store, wsettings, "x", output_schema=SCHEMA)
    procs.worker(wsettings, "w1")
    done = wait_until(lambda: ended(store, task_id), timeout=15, message="the task to end")
    assert (done.status, done.error_kind) == ("failed", "schema_mismatch")
    assert "is not of type 'object'" in (done.error or "")
    assert service.TaskRecord.of(done).result_json is None
    assert fake.stats()["requests"] == 2


def test_a_code_task_runs_codex_in_its_own_directory_not_the_workers(
    store: Store, wsettings: Settings, procs: Processes, project: Path, tmp_path: Path,
) -> None:
    record = tmp_path / "codex.jsonl"
    here = submit(store, wsettings, "where am I", type="code")
    there = submit(store, wsettings, "and now", type="code", workdir=str(project))
    procs.worker(wsettings, "w1", {"FAKE_CODEX_RECORD": str(record)})
    for task_id in (here, there):
        done = wait_until(lambda t=task_id: ended(store, t), timeout=15, message="code task")
        assert done.status == "completed", done.error
    runs = {json.loads(line)["stdin"]: json.loads(line) for line in record.read_text().splitlines()}
    assert runs["where am I"]["cwd"] == str(wsettings.workdir.resolve())
    assert runs["and now"]["cwd"] == str(project.resolve())
    argv = runs["and now"]["argv"]
    assert argv[argv.index("-C") + 1] == str(project.resolve())
    assert get_task(store, there).workdir == str(project.resolve())
