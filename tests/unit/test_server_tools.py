"""The MCP tools and resources, in memory (``mcp.Client(server)``), without a pool.

The worker's side is played through the queue by a stand-in in a thread (claim, then complete):
the server must never run a task itself, only store it and wait.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from mcp import Client
from mcp.shared.exceptions import MCPError
from mcp_types import CallToolResult, TextContent, ToolAnnotations

from koubou_mcp import health, queue
from koubou_mcp.config import Settings
from koubou_mcp.models import utcnow
from koubou_mcp.server import MAX_SYNC_WAIT_S, build_server
from koubou_mcp.store import Store, open_store
from tests.fakes.ollama_server import FakeOllama
from tests.support.paths import FAKE_CODEX_PATH
from tests.support.waiting import wait_until

pytestmark = pytest.mark.anyio

TOOLS = {"delegate_task", "delegate_tasks", "wait_tasks", "get_status", "list_tasks",
         "cancel_task"}


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[Client]:
    async with Client(build_server(settings, pool=False)) as c:
        yield c


@pytest.fixture
def store(sqlite_store: Store) -> Store:
    """The test's own handle on the server's store (what a worker process would have); the
    server under test runs on the SQLite file of ``settings``."""
    return sqlite_store


class StandInWorker:
    """Plays a worker through the queue in a thread: claims tasks, completes them with
    ``answer(prompt)`` once ``release`` is set. Always stopped by the fixture."""

    def __init__(self, settings: Settings, answer: Callable[[str], str]) -> None:
        self.settings = settings
        self.answer = answer
        self.release = threading.Event()
        self.release.set()
        self.claimed = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> StandInWorker:
        self._thread.start()
        return self

    def _run(self) -> None:
        store = open_store(self.settings.database_url, self.settings.run_dir)
        try:
            queue.register_worker(store, "stand-in", 1, utcnow())
            while not self._stop.is_set():
                task = queue.claim_next(store, "stand-in", utcnow(), self.settings.lease_s)
                if task is None:
                    self._stop.wait(0.01)
                    continue
                self.claimed.set()
                while not self.release.wait(0.05):
                    if self._stop.is_set():
                        return
                queue.complete(store, task.task_id, "stand-in", self.answer(task.prompt),
                               utcnow())
        finally:
            store.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


@pytest.fixture
def worker(settings: Settings) -> Iterator[StandInWorker]:
    w = StandInWorker(settings, lambda prompt: f"echo: {prompt}").start()
    try:
        yield w
    finally:
        w.stop()


def text_of(result: CallToolResult) -> str:
    block = result.content[0]
    assert isinstance(block, TextContent)
    return block.text


def counts(store: Store) -> dict[str, int]:
    return queue.counts_by_status(store)


async def call(client: Client, tool: str, **arguments: Any) -> dict[str, Any]:
    result = await client.call_tool(tool, arguments)
    assert not result.is_error, result.content
    assert result.structured_content is not None
    return result.structured_content


# -- listing ------------------------------------------------------------------------------

async def test_the_tools_are_listed_with_output_schemas_and_annotations(client: Client) -> None:
    tools = {t.name: t for t in (await client.list_tools()).tools}
    assert set(tools) == TOOLS
    for tool in tools.values():
        assert tool.output_schema and tool.output_schema["type"] == "object", tool.name
        assert tool.description
        # as a client shows it: no docstring indentation, no line broken mid-sentence
        assert all(line == line.strip() for line in tool.description.split("\n")), tool.name
        assert all(p for p in tool.description.split("\n\n")) and \
            tool.description.count("\n") == 2 * tool.description.count("\n\n"), tool.name
    hints = {name: t.annotations or ToolAnnotations() for name, t in tools.items()}
    assert hints["get_status"].read_only_hint is True
    assert hints["list_tasks"].read_only_hint is True
    assert hints["cancel_task"].destructive_hint is True
    assert hints["delegate_task"].read_only_hint is False
    assert hints["delegate_task"].destructive_hint is False
    assert {"task_id", "status", "result", "error"} <= set(
        (tools["delegate_task"].output_schema or {})["properties"])


async def test_the_input_schema_publishes_what_is_accepted(settings: Settings) -> None:
    wide = settings.with_overrides(sync_wait_s=500.0, max_prompt_chars=1234)
    async with Client(build_server(wide, pool=False)) as c:
        tools = {t.name: t for t in (await c.list_tools()).tools}
    props = tools["delegate_task"].input_schema["properties"]
    assert tools["delegate_task"].input_schema["required"] == ["prompt"]
    assert (props["prompt"]["minLength"], props["prompt"]["maxLength"]) == (1, 1234)
    assert props["type"]["enum"] == ["general", "code"]
    assert (props["priority"]["minimum"], props["priority"]["maximum"]) == (1, 10)
    assert props["sync"]["default"] is False
    wait = props["wait_s"]["anyOf"][0]
    assert wait["maximum"] == MAX_SYNC_WAIT_S <= 100, "a sync wait stays under Claude Code's 120 s"
    assert f"default {MAX_SYNC_WAIT_S:g})" in props["wait_s"]["description"]
    timeout = props["timeout_s"]["anyOf"][0]
    assert (timeout["exclusiveMinimum"], timeout["maximum"]) == (0, wide.max_timeout_s)


async def test_the_instructions_say_what_the_server_is_for_and_when_to_delegate(
    client: Client,
) -> None:
    text = client.instructions or ""
    for words in ("local models", "Delegate", "sync=true", "get_status", "koubou://health"):
        assert words in text


async def test_resources_and_the_task_template_are_listed(client: Client) -> None:
    resources = {str(r.uri) for r in (await client.list_resources()).resources}
    assert resources == {"koubou://health", "koubou://stats"}
    templates = [t.uri_template for t in (await client.list_resource_templates()).resource_templates]
    assert templates == ["koubou://tasks/{task_id}"]


# -- delegate_task ------------------------------------------------------------------------

async def test_an_async_delegation_returns_at_once_and_the_task_waits_in_the_queue(
    client: Client, store: Store
) -> None:
    result = await client.call_tool("delegate_task", {"prompt": "summarise the README",
                                                      "type": "code", "priority": 7})
    assert not result.is_error
    tools = {t.name: t for t in (await client.list_tools()).tools}
    jsonschema.validate(result.structured_content, tools["delegate_task"].output_schema)
    out = result.structured_content
    assert out["status"] == "pending" and out["created"] is True
    assert (out["type"], out["priority"], out["result"], out["waited_s"]) == ("code", 7, None, None)
    assert "get_status" in out["next_step"]
    task = queue.get_task(store, out["task_id"])
    assert (task.prompt, task.type, task.priority, task.status) == (
        "summarise the README", "code", 7, "pending")
    assert out["task_id"] in text_of(result)


async def test_a_sync_delegation_returns_the_result_a_worker_produced(
    client: Client, store: Store, worker: StandInWorker
) -> None:
    result = await client.call_tool("delegate_task", {"prompt": "hello\nworld", "sync": True})
    out = result.structured_content
    assert out is not None and not result.is_error
    assert (out["status"], out["result"], out["worker_id"]) == (
        "completed", "echo: hello\nworld", "stand-in")
    assert out["waited_s"] is not None
    assert text_of(result).endswith("\n\necho: hello\nworld"), \
        "the model reads the result verbatim, not JSON-escaped"
    assert queue.get_task(store, out["task_id"]).status == "completed"


async def test_a_sync_wait_reports_progress_about_every_second_then_returns_the_status(
    client: Client, store: Store
) -> None:
    updates: list[tuple[float, float | None, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        updates.append((progress, total, message))

    result = await client.call_tool("delegate_task", {"prompt": "nobody runs me", "sync": True,
                                                      "wait_s": 3.5}, progress_callback=on_progress)
    out = result.structured_content
    assert out is not None and not result.is_error
    assert out["status"] == "pending" and out["waited_s"] >= 3.5
    assert "get_status" in out["next_step"], "a wait that runs out says how to go on"
    assert len(updates) >= 2
    assert [u[0] for u in updates] == sorted(u[0] for u in updates)
    assert all(total == 3.5 for _, total, _ in updates)
    assert all(out["task_id"] in (m or "") and "pending" in (m or "") for _, _, m in updates)
    task = queue.get_task(store, out["task_id"])
    assert (task.status, task.attempts, task.worker_id) == ("pending", 0, None), \
        "the server never runs a task itself"


async def test_progress_names_the_worker_once_the_task_runs(
    client: Client, worker: StandInWorker
) -> None:
    worker.release.clear()  # the stand-in claims the task but holds the result back
    updates: list[str] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        updates.append(message or "")
        if len(updates) >= 2:
            worker.release.set()

    result = await client.call_tool("delegate_task", {"prompt": "slow", "sync": True,
                                                      "wait_s": 30}, progress_callback=on_progress)
    assert result.structured_content is not None
    assert result.structured_content["status"] == "completed"
    assert any("in_progress on stand-in" in m for m in updates)


async def test_the_default_sync_wait_comes_from_the_settings(settings: Settings) -> None:
    async with Client(build_server(settings.with_overrides(sync_wait_s=0.3), pool=False)) as c:
        out = await call(c, "delegate_task", prompt="quick", sync=True)
    assert out["status"] == "pending" and 0.3 <= out["waited_s"]


async def test_wait_s_zero_returns_the_current_status_at_once(client: Client) -> None:
    out = await call(client, "delegate_task", prompt="peek", sync=True, wait_s=0)
    assert out["status"] == "pending" and out["waited_s"] is not None


async def test_the_same_idempotency_key_returns_the_unfinished_task(
    client: Client, store: Store
) -> None:
    first = await call(client, "delegate_task", prompt="once", idempotency_key="job-1")
    again = await call(client, "delegate_task", prompt="once", idempotency_key="job-1")
    assert again["task_id"] == first["task_id"] and again["created"] is False
    assert counts(store)["pending"] == 1


# -- get_status, list_tasks, cancel_task ----------------------------------------------------

async def test_get_status_returns_the_full_record(
    client: Client, worker: StandInWorker
) -> None:
    done = await call(client, "delegate_task", prompt="record me", sync=True)
    record = await call(client, "get_status", task_id=done["task_id"])
    assert record["status"] == "completed" and record["result"] == "echo: record me"
    for key in ("attempts", "max_attempts", "worker_id", "created_at", "started_at",
                "finished_at", "duration_s", "error", "timeout_s"):
        assert key in record
    assert record.get("prompt") is None, "the prompt is left out unless asked for"
    with_prompt = await call(client, "get_status", task_id=done["task_id"], include_prompt=True)
    assert with_prompt["prompt"] == "record me"


async def test_list_tasks_shows_newest_first_with_counts_and_filters(client: Client) -> None:
    ids = [(await call(client, "delegate_task", prompt=f"task {i}"))["task_id"] for i in range(3)]
    await call(client, "cancel_task", task_id=ids[0])
    listed = await call(client, "list_tasks")
    assert [t["task_id"] for t in listed["tasks"]] == ids[::-1]
    assert listed["counts"] == {"pending": 2, "in_progress": 0, "completed": 0, "failed": 0,
                                "cancelled": 1}
    assert listed["tasks"][0]["prompt_preview"] == "task 2"
    assert "result" not in listed["tasks"][0], "results are left out of the list"
    pending = await call(client, "list_tasks", status="pending", limit=1)
    assert [t["task_id"] for t in pending["tasks"]] == [ids[2]]


async def test_cancelling_a_pending_task_ends_it_at_once(client: Client, store: Store) -> None:
    task_id = (await call(client, "delegate_task", prompt="never mind"))["task_id"]
    record = await call(client, "cancel_task", task_id=task_id)
    assert record["status"] == "cancelled"
    assert queue.get_task(store, task_id).status == "cancelled"


async def test_cancelling_a_running_task_asks_its_worker_to_stop(
    client: Client, worker: StandInWorker
) -> None:
    worker.release.clear()
    task_id = (await call(client, "delegate_task", prompt="long job"))["task_id"]
    wait_until(worker.claimed.is_set, message="the stand-in to claim the task")
    result = await client.call_tool("cancel_task", {"task_id": task_id})
    assert result.structured_content is not None
    assert result.structured_content["status"] == "in_progress"
    assert result.structured_content["cancel_requested"] is True
    assert "cancel requested" in text_of(result)


async def test_cancelling_a_finished_task_is_a_tool_error(
    client: Client, worker: StandInWorker
) -> None:
    task_id = (await call(client, "delegate_task", prompt="done already", sync=True))["task_id"]
    result = await client.call_tool("cancel_task", {"task_id": task_id})
    assert result.is_error
    assert "already completed" in text_of(result)


# -- bad input ----------------------------------------------------------------------------

BAD_DELEGATIONS: list[tuple[dict[str, Any], list[str]]] = [
    ({}, ["prompt is required", "non-empty string"]),
    ({"prompt": ""}, ["prompt must not be empty"]),
    ({"prompt": "   \n\t"}, ["prompt must not be empty"]),
    ({"prompt": "x" * 1235}, ["1235 characters", "limit is 1234", "KOUBOU_MAX_PROMPT_CHARS"]),
    ({"prompt": 42}, ["prompt is invalid", "valid string", "got 42", "string"]),
    ({"prompt": ["a", "list"]}, ["prompt is invalid", "valid string"]),
    ({"prompt": "nul \x00 inside"}, ["NUL"]),
    ({"prompt": "x", "type": "poem"}, ["type is invalid", '"poem"', '"general", "code"']),
    ({"prompt": "x", "type": 3}, ["type is invalid", '"general", "code"']),
    ({"prompt": "x", "priority": 0}, ["priority is invalid", "got 0", "from 1 to 10"]),
    ({"prompt": "x", "priority": 11}, ["priority is invalid", "got 11", "from 1 to 10"]),
    ({"prompt": "x", "priority": "high"}, ["priority is invalid", '"high"', "from 1 to 10"]),
    ({"prompt": "x", "priority": True}, ["priority is invalid", "not true/false"]),
    ({"prompt": "x", "priority": 5.5}, ["priority is invalid", "fractional", "an integer"]),
    ({"prompt": "x", "timeout_s": -1}, ["timeout_s is invalid", "greater than 0", "got -1"]),
    ({"prompt": "x", "timeout_s": 0}, ["timeout_s is invalid", "greater than 0"]),
    ({"prompt": "x", "timeout_s": "NaN"}, ["timeout_s is invalid", "finite"]),
    ({"prompt": "x", "timeout_s": "Infinity"}, ["timeout_s is invalid", "finite"]),
    ({"prompt": "x", "timeout_s": 1e9}, ["timeout_s is invalid", "up to 3600"]),
    ({"prompt": "x", "timeout_s": "soon"}, ["timeout_s is invalid", "valid number"]),
    ({"prompt": "x", "sync": True, "wait_s": -1}, ["wait_s is invalid", "from 0 to 100"]),
    ({"prompt": "x", "sync": True, "wait_s": 101}, ["wait_s is invalid", "from 0 to 100"]),
    ({"prompt": "x", "sync": True, "wait_s": "NaN"}, ["wait_s is invalid", "finite"]),
    ({"prompt": "x", "sync": "perhaps"}, ["sync is invalid", "true or false"]),
    ({"prompt": "x", "idempotency_key": "k" * 201}, ["idempotency_key is invalid", "200"]),
    ({"prompt": "x", "idempotency_key": "  "}, ["idempotency_key must be a non-empty string"]),
    ({"prompt": "x", "priorty": 9}, ["unknown argument(s) priorty", "accepts prompt, type, priority"]),
]


@pytest.mark.parametrize(("arguments", "expected"), BAD_DELEGATIONS,
                         ids=[f"{i}-{sorted(a)}" for i, (a, _) in enumerate(BAD_DELEGATIONS)])
async def test_every_bad_delegation_is_a_tool_error_saying_what_is_accepted_and_stores_nothing(
    settings: Settings, store: Store, arguments: dict[str, Any], expected: list[str]
) -> None:
    async with Client(build_server(settings.with_overrides(max_prompt_chars=1234),
                                   pool=False)) as c:
        result = await c.call_tool("delegate_task", arguments)
        assert result.is_error
        text = text_of(result)
        for fragment in expected:
            assert fragment in text, f"{fragment!r} not in {text!r}"
        assert "pydantic" not in text and "Traceback" not in text
        assert sum(counts(store).values()) == 0, "a rejected call stores nothing"
        assert not (await c.call_tool("delegate_task", {"prompt": "still serving"})).is_error


BAD_OTHER_CALLS: list[tuple[str, dict[str, Any], list[str]]] = [
    ("get_status", {"task_id": "task_nope"}, ["no task with id 'task_nope'", "list_tasks"]),
    ("get_status", {}, ["task_id is required", "a string"]),
    ("get_status", {"task_id": 7}, ["task_id is invalid", "valid string"]),
    ("cancel_task", {"task_id": "task_nope"}, ["no task with id 'task_nope'"]),
    ("list_tasks", {"limit": 0}, ["limit is invalid", "from 1 to 200"]),
    ("list_tasks", {"limit": 201}, ["limit is invalid", "from 1 to 200"]),
    ("list_tasks", {"limit": "all"}, ["limit is invalid", "from 1 to 200"]),
    ("list_tasks", {"status": "done"}, ["status is invalid", '"pending"', '"cancelled"']),
]


@pytest.mark.parametrize(("tool", "arguments", "expected"), BAD_OTHER_CALLS,
                         ids=[f"{t}-{sorted(a)}-{i}" for i, (t, a, _) in enumerate(BAD_OTHER_CALLS)])
async def test_bad_status_list_and_cancel_calls_are_tool_errors(
    client: Client, tool: str, arguments: dict[str, Any], expected: list[str]
) -> None:
    result = await client.call_tool(tool, arguments)
    assert result.is_error
    for fragment in expected:
        assert fragment in text_of(result), text_of(result)
    assert not (await client.call_tool("list_tasks", {})).is_error


# -- resources ----------------------------------------------------------------------------

async def read_json(client: Client, uri: str) -> dict[str, Any]:
    contents = (await client.read_resource(uri)).contents
    assert contents[0].mime_type == "application/json"
    data: dict[str, Any] = json.loads(contents[0].text)  # type: ignore[union-attr]
    return data



async def test_health_is_ok_with_ollama_codex_and_a_live_worker(
    settings: Settings, store: Store, fake_ollama: FakeOllama
) -> None:
    healthy = settings.with_overrides(ollama_url=fake_ollama.url, codex_bin=str(FAKE_CODEX_PATH))
    queue.register_worker(store, "w-live", 4242, utcnow())
    async with Client(build_server(healthy, pool=False)) as c:
        await call(c, "delegate_task", prompt="queued")
        doc = await read_json(c, "koubou://health")
    assert doc["status"] == "ok", doc["problems"]
    assert doc["database"]["ok"] is True
    assert doc["queue"]["depth"] == 1
    assert doc["workers"]["live"] == 1 and doc["workers"]["list"][0]["pid"] == 4242
    assert doc["backends"]["ollama"]["ok"] is True
    assert doc["backends"]["ollama"]["models_missing"] == []
    assert doc["backends"]["codex"]["version"] == "codex-cli 0.0.0-fake"
    assert doc["task_types"] == {"general": True, "code": True}
    assert doc["server"]["pid"] > 0


async def test_health_names_a_missing_model_and_a_missing_codex_with_the_fix(
    settings: Settings, store: Store, fake_ollama: FakeOllama
) -> None:
    fake_ollama.configure(models=["llama3.2:latest"])
    queue.register_worker(store, "w-live", 4242, utcnow())
    unwell = settings.with_overrides(ollama_url=fake_ollama.url, codex_bin="/nonexistent/codex",
                                     general_model="llama3.2", code_model="qwen3-coder")
    async with Client(build_server(unwell, pool=False)) as c:
        doc = await read_json(c, "koubou://health")
    assert doc["status"] == "degraded", "general tasks can still run"
    assert doc["backends"]["ollama"]["models_missing"] == ["qwen3-coder"]
    assert "ollama pull qwen3-coder" in doc["backends"]["ollama"]["fix"]
    assert doc["backends"]["codex"]["found"] is False
    assert "/nonexistent/codex" in doc["backends"]["codex"]["reason"]
    assert doc["task_types"] == {"general": True, "code": False}
    assert any(p.startswith("codex:") for p in doc["warnings"]), "codex is optional"
    assert not any(p.startswith("codex:") for p in doc["problems"])


async def test_health_is_ok_with_a_warning_when_only_the_optional_codex_is_missing(
    settings: Settings, store: Store, fake_ollama: FakeOllama
) -> None:
    fake_ollama.configure(models=["llama3.2:latest"])
    queue.register_worker(store, "w-live", 4242, utcnow())
    no_codex = settings.with_overrides(ollama_url=fake_ollama.url, codex_bin="/nonexistent/codex",
                                       general_model="llama3.2", code_model="llama3.2")
    async with Client(build_server(no_codex, pool=False)) as c:
        doc = await read_json(c, "koubou://health")
    assert doc["status"] == "ok", doc["problems"]
    assert doc["problems"] == []
    assert len(doc["warnings"]) == 1 and doc["warnings"][0].startswith("codex:")
    assert doc["backends"]["codex"]["optional"] is True
    assert doc["task_types"] == {"general": True, "code": False}


async def test_health_is_down_when_ollama_is_unreachable_and_says_why(
    settings: Settings,
) -> None:
    with FakeOllama() as gone:
        url = gone.url  # a port that nothing listens on once the fake stopped
    async with Client(build_server(settings.with_overrides(ollama_url=url), pool=False)) as c:
        doc = await read_json(c, "koubou://health")
    assert doc["status"] == "down"
    assert "cannot reach Ollama" in doc["backends"]["ollama"]["reason"]
    assert doc["workers"]["ok"] is False and "no pool supervisor" in doc["workers"]["reason"]


async def test_a_broken_store_is_reported_by_every_tool_and_by_health(
    settings: Settings, tmp_path: Path
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    broken = settings.with_overrides(database_url=f"sqlite:///{blocker}/db/koubou.db")
    async with Client(build_server(broken, pool=False)) as c:
        result = await c.call_tool("delegate_task", {"prompt": "x"})
        assert result.is_error
        assert "task store is unavailable" in text_of(result)
        assert "cannot create the database directory" in text_of(result)
        doc = await read_json(c, "koubou://health")
    assert doc["status"] == "down"
    assert "cannot create the database directory" in doc["database"]["reason"]


async def test_the_task_resource_has_the_full_record_with_the_prompt(client: Client) -> None:
    task_id = (await call(client, "delegate_task", prompt="read me back"))["task_id"]
    record = await read_json(client, f"koubou://tasks/{task_id}")
    assert (record["task_id"], record["prompt"], record["status"]) == (
        task_id, "read me back", "pending")


async def test_an_unknown_task_resource_is_an_error_naming_the_id(client: Client) -> None:
    with pytest.raises(MCPError, match="no task with id 'task_missing'"):
        await client.read_resource("koubou://tasks/task_missing")


async def test_stats_count_tasks_by_status(client: Client, worker: StandInWorker) -> None:
    await call(client, "delegate_task", prompt="one", sync=True)
    stats = await read_json(client, "koubou://stats")
    assert stats["tasks"]["completed"] == 1
    assert stats["queue_depth"] == 0
    assert stats["avg_duration_s"] is not None
    assert [w["worker_id"] for w in stats["workers"]] == ["stand-in"]


async def test_the_tools_and_health_work_the_same_on_both_stores(store_settings: Settings) -> None:
    async with Client(build_server(store_settings, pool=False)) as c:
        task_id = (await call(c, "delegate_task", prompt="on every store"))["task_id"]
        assert (await call(c, "get_status", task_id=task_id))["status"] == "pending"
        assert [t["task_id"] for t in (await call(c, "list_tasks"))["tasks"]] == [task_id]
        assert (await call(c, "cancel_task", task_id=task_id))["status"] == "cancelled"
        doc = await read_json(c, "koubou://health")
    assert doc["database"]["ok"] is True
    assert doc["database"]["dialect"] == store_settings.database_url.split(":")[0].split("+")[0]


def test_health_never_shows_a_database_password() -> None:
    shown = health.redact_url("postgresql+psycopg://koubou:s3cret@db.local:5432/tasks")
    assert "s3cret" not in shown and "db.local" in shown


async def test_a_store_failure_mid_session_is_a_tool_error_that_says_what_failed(
    client: Client, settings: Settings
) -> None:
    assert not (await client.call_tool("list_tasks", {})).is_error
    with sqlite3.connect(settings.home / "db" / "koubou.db") as conn:
        conn.execute("DROP TABLE task_master")
    result = await client.call_tool("delegate_task", {"prompt": "into the void"})
    assert result.is_error
    assert "the task store failed" in text_of(result) and "task_master" in text_of(result)
