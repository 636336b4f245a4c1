"""The delegation tools over MCP (delegate_task with files, model, schema; delegate_tasks;
wait_tasks), with the server in memory and a real `koubou-mcp worker` process running the
tasks on the stand-in Ollama. Each test runs on both kinds of protocol connection: the
initialize handshake (``legacy``) and the stateless 2026-07-28 revision."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from mcp import Client
from mcp_types import CallToolResult, TextContent

from koubou_mcp import queue
from koubou_mcp.config import Settings
from koubou_mcp.server import build_server
from koubou_mcp.store import Store, open_store
from tests.fakes.ollama_server import FakeOllama
from tests.support.processes import Processes, processes

pytestmark = pytest.mark.anyio

SCHEMA = {"type": "object", "properties": {"title": {"type": "string"},
                                           "score": {"type": "integer", "minimum": 1}},
          "required": ["title", "score"]}


@pytest.fixture
def fake() -> Iterator[FakeOllama]:
    with FakeOllama(models=["gpt-oss:20b", "llama3.2:latest"]) as server:
        yield server


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    (root / "docs").mkdir(parents=True)
    (root / "docs" / "guide.md").write_text("# Guide\nStep one.\n")
    (root / "secret.bin").write_bytes(b"\x00\xff")
    return root


@pytest.fixture
def tsettings(settings: Settings, fake: FakeOllama, project: Path) -> Settings:
    return settings.with_overrides(ollama_url=fake.url, workdir=project)


@pytest.fixture
def store(tsettings: Settings) -> Iterator[Store]:
    s = open_store(tsettings.database_url, tsettings.run_dir)
    yield s
    s.close()


@pytest.fixture
def procs() -> Iterator[Processes]:
    with processes() as p:
        yield p


@pytest.fixture(params=["legacy", "2026-07-28"])
async def client(request: pytest.FixtureRequest, tsettings: Settings) -> AsyncIterator[Client]:
    async with Client(build_server(tsettings, pool=False), mode=request.param) as c:
        yield c


def text_of(result: CallToolResult) -> str:
    block = result.content[0]
    assert isinstance(block, TextContent)
    return block.text


async def call(client: Client, tool: str, **arguments: Any) -> dict[str, Any]:
    result = await client.call_tool(tool, arguments)
    assert not result.is_error, text_of(result)
    tools = {t.name: t for t in (await client.list_tools()).tools}
    jsonschema.validate(result.structured_content, tools[tool].output_schema)
    assert result.structured_content is not None
    return result.structured_content


async def refused(client: Client, tool: str, **arguments: Any) -> str:
    result = await client.call_tool(tool, arguments)
    assert result.is_error, result.structured_content
    return text_of(result)


def stored(store: Store) -> int:
    return sum(queue.counts_by_status(store).values())


async def test_files_are_read_by_the_worker_and_the_result_comes_back_through_wait_tasks(
    client: Client, store: Store, tsettings: Settings, procs: Processes, fake: FakeOllama,
    project: Path,
) -> None:
    out = await call(client, "delegate_task", prompt="Summarise the guide.",
                     files=["docs/guide.md"])
    assert out["workdir"] == str(project.resolve()) and out["status"] == "pending"
    procs.worker(tsettings, "w1")
    progress: list[str] = []

    async def on_progress(done: float, total: float | None, message: str | None) -> None:
        progress.append(message or "")

    result = await client.call_tool("wait_tasks", {"task_ids": [out["task_id"]], "wait_s": 30},
                                    progress_callback=on_progress)
    waited = result.structured_content
    assert waited is not None and not result.is_error
    assert waited["done"] and waited["ended"] == [out["task_id"]]
    [record] = waited["tasks"]
    assert record["status"] == "completed" and record["files"] == ["docs/guide.md"]
    assert "===== file: docs/guide.md (18 bytes) =====\n# Guide\nStep one.\n" in record["result"]
    assert "Summarise the guide." in text_of(result)
    [prompt] = fake.stats()["prompts"]
    assert "# Guide\nStep one." in prompt
    status = await call(client, "get_status", task_id=out["task_id"])
    assert (status["workdir"], status["files"]) == (str(project.resolve()), ["docs/guide.md"])
    listing = await call(client, "list_tasks")
    assert listing["tasks"][0]["workdir"] == str(project.resolve())


async def test_a_batch_fans_out_and_one_wait_returns_every_result(
    client: Client, store: Store, tsettings: Settings, procs: Processes, fake: FakeOllama,
) -> None:
    batch = await call(client, "delegate_tasks", tasks=[
        {"prompt": "plain"},
        {"prompt": "rate it", "output_schema": SCHEMA, "system": "JSON only",
         "options": {"temperature": 0}},
        {"prompt": "other model", "model": "llama3.2", "priority": 9},
    ])
    ids = batch["task_ids"]
    assert len(ids) == 3 and [t["task_id"] for t in batch["tasks"]] == ids
    procs.worker(tsettings, "w1")
    waited = await call(client, "wait_tasks", task_ids=ids, mode="all", wait_s=60)
    assert waited["done"] and waited["unfinished"] == []
    by_id = {t["task_id"]: t for t in waited["tasks"]}
    assert [t["task_id"] for t in waited["tasks"]] == ids
    assert by_id[ids[0]]["result"] == "echo: plain"
    assert by_id[ids[1]]["result_json"] == {"title": "echo: rate it", "score": 1}
    assert by_id[ids[2]]["model"] == "llama3.2"
    calls = {c["model"]: c for c in fake.stats()["calls"]}
    assert set(calls) == {"gpt-oss:20b", "llama3.2"}
    [schema_call] = [c for c in fake.stats()["calls"] if c["format"] is not None]
    assert (schema_call["format"], schema_call["system"], schema_call["options"]) == (
        SCHEMA, "JSON only", {"temperature": 0.0})


async def test_wait_any_returns_when_the_first_task_ends(
    client: Client, store: Store, tsettings: Settings, procs: Processes, fake: FakeOllama,
) -> None:
    fake.configure(mode="hang")  # the first task a worker takes hangs until released
    batch = await call(client, "delegate_tasks", tasks=[{"prompt": "a"}, {"prompt": "b"}])
    ids = batch["task_ids"]
    procs.worker(tsettings, "w1")
    first = await call(client, "wait_tasks", task_ids=ids, mode="any", wait_s=0.5)
    assert not first["done"] and first["ended"] == [] and first["unfinished"] == ids
    fake.configure(mode="ok")
    fake.release()
    waited = await call(client, "wait_tasks", task_ids=ids, mode="any", wait_s=30)
    assert waited["done"] and len(waited["ended"]) >= 1
    assert "unfinished" in waited["next_step"] or not waited["unfinished"]


async def test_bad_input_of_every_kind_is_refused_and_nothing_is_stored(
    client: Client, store: Store, project: Path,
) -> None:
    cases: list[tuple[str, dict[str, Any], str]] = [
        ("delegate_task", {"prompt": "p", "files": ["../outside.txt"]}, "outside the task's workdir"),
        ("delegate_task", {"prompt": "p", "files": ["secret.bin"]}, "binary"),
        ("delegate_task", {"prompt": "p", "files": ["docs"]}, "is a directory"),
        ("delegate_task", {"prompt": "p", "files": ["nope.md"]}, "does not exist"),
        ("delegate_task", {"prompt": "p", "files": "docs/guide.md"}, "files is invalid"),
        ("delegate_task", {"prompt": "p", "workdir": "docs"}, "must be an absolute path"),
        ("delegate_task", {"prompt": "p", "workdir": str(project / "gone")}, "does not exist"),
        ("delegate_task", {"prompt": "p", "model": "mistral"},
         "the models that work: gpt-oss:20b, llama3.2:latest"),
        ("delegate_task", {"prompt": "p", "options": {"top_k": 5}}, "unknown key(s) top_k"),
        ("delegate_task", {"prompt": "p", "options": {"seed": "x"}}, "options.seed must be"),
        ("delegate_task", {"prompt": "p", "system": "  "}, "must not be empty"),
        ("delegate_task", {"prompt": "p", "output_schema": {"type": 3}}, "not a valid JSON Schema"),
        ("delegate_task", {"prompt": "p", "type": "code", "output_schema": SCHEMA},
         "general tasks only"),
        ("delegate_tasks", {"tasks": []}, "tasks is invalid"),
        ("delegate_tasks", {"tasks": [{"prompt": "ok"}, {"prompt": "ok", "files": ["nope"]}]},
         "tasks[1]: files[0] ('nope') does not exist"),
        ("delegate_tasks", {"tasks": [{"prompt": "ok"}, {"prmpt": "typo"}]},
         "tasks[1]: unknown field(s) prmpt"),
        ("delegate_tasks", {"tasks": [{"prompt": "ok", "model": "nope"}]}, "tasks[0]: model"),
        ("wait_tasks", {"task_ids": ["task_nope"]}, "no task with id 'task_nope'"),
        ("wait_tasks", {"task_ids": []}, "task_ids is invalid"),
        ("wait_tasks", {"task_ids": ["x"], "mode": "some"}, "mode is invalid"),
        ("wait_tasks", {"task_ids": ["x"], "wait_s": 500}, "wait_s is invalid"),
    ]
    for tool, arguments, words in cases:
        message = await refused(client, tool, **arguments)
        assert words in message, (tool, arguments, message)
    assert stored(store) == 0


async def test_the_tools_tell_the_agent_when_to_use_them(client: Client) -> None:
    tools = {t.name: t for t in (await client.list_tools()).tools}
    assert "wait_tasks" in (tools["delegate_tasks"].description or "")
    assert "files" in (tools["delegate_task"].description or "")
    props = tools["delegate_task"].input_schema["properties"]
    assert {"workdir", "files", "model", "system", "options", "output_schema"} <= set(props)
    items = tools["delegate_tasks"].input_schema["properties"]["tasks"]["items"]
    assert "files" in items["properties"] and items["required"] == ["prompt"]
    wait = tools["wait_tasks"].input_schema["properties"]
    assert wait["mode"]["enum"] == ["all", "any"] and wait["wait_s"]["anyOf"][0]["maximum"] <= 100

async def test_the_instructions_say_to_fan_out_then_wait_and_to_pass_files(
        tsettings: Settings) -> None:
    async with Client(build_server(tsettings, pool=False), mode="legacy") as client:
        text = client.instructions or ""
    for words in ("delegate_tasks", "wait_tasks", "files=", "output_schema", "workdir"):
        assert words in text, words


async def test_the_parsed_answer_is_in_the_sync_result_too(
    client: Client, tsettings: Settings, procs: Processes,
) -> None:
    procs.worker(tsettings, "w1")
    out = await call(client, "delegate_task", prompt="score this", output_schema=SCHEMA,
                     sync=True, wait_s=30)
    assert out["status"] == "completed" and out["result_json"]["score"] == 1
    assert json.loads(out["result"]) == out["result_json"]
