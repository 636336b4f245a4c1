"""The service's side of delegation: a task's workdir, files, model, system, options and
output schema are checked (every bad input refused, nothing stored), batches are all or
none, and a wait on several tasks ends when all or any of them did. The worker's side is
played through the queue on a real store, in a thread."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest

from koubou_mcp import queue
from koubou_mcp.config import Settings
from koubou_mcp.models import utcnow
from koubou_mcp.service import (
    MAX_BATCH_TASKS,
    InvalidRequest,
    Service,
    TaskNotFound,
    batch_from,
    request_from,
)
from koubou_mcp.store import Store
from tests.fakes.ollama_server import FakeOllama
from tests.support.waiting import wait_until

pytestmark = pytest.mark.anyio

SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    root.mkdir()
    (root / "a.txt").write_text("alpha\n")
    (root / "b.txt").write_text("beta\n")
    return root


@pytest.fixture
async def service(store_settings: Settings, project: Path) -> AsyncIterator[Service]:
    with FakeOllama(models=["gpt-oss:20b", "llama3.2:latest"]) as fake:
        settings = store_settings.with_overrides(ollama_url=fake.url, workdir=project)
        svc = Service(settings, run_pool=False)
        await svc.start()
        try:
            yield svc
        finally:
            await svc.stop()


def store_of(service: Service) -> Store:
    assert service.store is not None
    return service.store


def stored(service: Service) -> int:
    return sum(queue.counts_by_status(store_of(service)).values())


async def play_worker(service: Service, answers: dict[str, str], count: int) -> None:
    """Claim ``count`` tasks and complete each with the answer for its prompt."""
    store, settings = store_of(service), service.settings

    def run() -> None:
        queue.register_worker(store, "stand-in", 1, utcnow())
        for _ in range(count):
            task = wait_until(lambda: queue.claim_next(store, "stand-in", utcnow(),
                                                       settings.lease_s), message="a task")
            queue.complete(store, task.task_id, "stand-in", answers[task.prompt], utcnow())

    await anyio.to_thread.run_sync(run)


# -- one task ---------------------------------------------------------------------------------

async def test_a_task_keeps_its_workdir_files_model_and_shaping_fields(
        service: Service, project: Path) -> None:
    request = await service.prepare({
        "prompt": "p", "files": ["a.txt", str(project / "b.txt")], "model": "llama3.2",
        "system": "be brief", "options": {"temperature": 0.1}, "output_schema": SCHEMA})
    result = await service.submit(request)
    assert (result.workdir, result.model) == (str(project.resolve()), "llama3.2")
    record = await service.read(result.task_id)
    assert record.files == ["a.txt", str(project / "b.txt")]
    assert (record.system, record.options, record.output_schema) == (
        "be brief", {"temperature": 0.1}, SCHEMA)
    listing = await service.list_tasks()
    assert (listing.tasks[0].workdir, listing.tasks[0].model) == (str(project.resolve()),
                                                                 "llama3.2")


async def test_the_workdir_defaults_to_the_delegating_servers_directory(
        service: Service, project: Path, tmp_path: Path) -> None:
    default = await service.submit(await service.prepare({"prompt": "p"}))
    assert default.workdir == str(project.resolve())
    other = tmp_path / "other"
    other.mkdir()
    named = await service.submit(await service.prepare({"prompt": "p", "workdir": str(other)}))
    assert named.workdir == str(other.resolve())


def bad_inputs(project: Path) -> list[tuple[dict[str, Any], str, str]]:
    (project / "bin").write_bytes(b"\x00\x01")
    (project / "dir").mkdir()
    return [
        ({"prompt": "p", "workdir": "relative"}, "workdir", "must be an absolute path"),
        ({"prompt": "p", "workdir": str(project / "nope")}, "workdir", "does not exist"),
        ({"prompt": "p", "workdir": str(project / "a.txt")}, "workdir", "not a directory"),
        ({"prompt": "p", "files": ["../../etc/passwd"]}, "files", "outside the task's workdir"),
        ({"prompt": "p", "files": ["missing.txt"]}, "files", "does not exist"),
        ({"prompt": "p", "files": ["dir"]}, "files", "is a directory"),
        ({"prompt": "p", "files": ["bin"]}, "files", "binary"),
        ({"prompt": "p", "files": "a.txt"}, "files", "must be a list"),
        ({"prompt": "p", "model": "mistral"}, "model", "gpt-oss:20b, llama3.2:latest"),
        ({"prompt": "p", "system": ""}, "system", "must not be empty"),
        ({"prompt": "p", "type": "code", "system": "s"}, "system", "general tasks only"),
        ({"prompt": "p", "options": {"mirostat": 1}}, "options", "unknown key(s) mirostat"),
        ({"prompt": "p", "options": {"temperature": 9}}, "options", "from 0 to 2"),
        ({"prompt": "p", "output_schema": {"type": "nope"}}, "output_schema",
         "not a valid JSON Schema"),
        ({"prompt": "p", "type": "code", "output_schema": SCHEMA}, "output_schema",
         "general tasks only"),
        ({"prompt": "p", "colour": "red"}, "colour", "unknown field(s) colour"),
        ({"type": "general"}, "prompt", "prompt is required"),
        ({"prompt": "", "files": ["a.txt"]}, "prompt", "must not be empty"),
    ]


async def test_every_kind_of_bad_input_is_refused_naming_the_field_and_nothing_is_stored(
        service: Service, project: Path) -> None:
    for fields, field, words in bad_inputs(project):
        with pytest.raises(InvalidRequest) as caught:
            await service.prepare(fields)
        assert caught.value.field == field and words in str(caught.value), fields
    assert stored(service) == 0


# -- batches ----------------------------------------------------------------------------------

async def test_a_batch_is_stored_in_order_in_one_go(service: Service) -> None:
    requests = await service.prepare_batch([{"prompt": f"task {i}", "priority": 1 + i}
                                            for i in range(5)])
    results = await service.submit_many(requests)
    assert [r.priority for r in results] == [1, 2, 3, 4, 5] and all(r.created for r in results)
    prompts = [queue.get_task(store_of(service), r.task_id).prompt for r in results]
    assert prompts == [f"task {i}" for i in range(5)]


async def test_a_batch_with_one_bad_task_stores_none_and_names_its_index(
        service: Service, project: Path) -> None:
    for bad, field, words in bad_inputs(project):
        tasks = [{"prompt": "fine"}, {"prompt": "fine too"}, bad]
        with pytest.raises(InvalidRequest) as caught:
            await service.prepare_batch(tasks)
        error = caught.value
        assert error.index == 2 and str(error).startswith("tasks[2]: ") and words in str(error)
        assert error.field == f"tasks[2].{field}" and "nothing was stored" in str(error)
    assert stored(service) == 0


@pytest.mark.parametrize("tasks, words", [
    ([], "non-empty list"), ("prompt", "non-empty list"), ({"prompt": "x"}, "non-empty list"),
    ([{"prompt": "x"}] * (MAX_BATCH_TASKS + 1), f"at most {MAX_BATCH_TASKS}"),
    (["just a string"], "tasks[0]: a task must be an object"),
])
async def test_a_batch_that_is_not_a_list_of_tasks_is_refused(service: Service, tasks: Any,
                                                              words: str) -> None:
    with pytest.raises(InvalidRequest, match=words.replace("[", r"\[").replace("]", r"\]")):
        await service.prepare_batch(tasks)
    assert stored(service) == 0


async def test_a_batch_reuses_an_unfinished_task_with_the_same_key_even_within_itself(
        service: Service) -> None:
    results = await service.submit_many(await service.prepare_batch(
        [{"prompt": "a", "idempotency_key": "k"}, {"prompt": "b", "idempotency_key": "k"}]))
    assert results[0].task_id == results[1].task_id
    assert [r.created for r in results] == [True, False] and stored(service) == 1


def test_a_failure_while_storing_a_batch_leaves_nothing_behind(store: Store,
                                                               settings: Settings) -> None:
    good = request_from(settings, {"prompt": "good"})

    class Broken(queue.TaskRequest):
        def columns(self) -> dict[str, Any]:
            raise RuntimeError("the disk caught fire")

    broken = Broken("bad", "general", 5, 60.0, None)
    with pytest.raises(RuntimeError):
        queue.enqueue_many(store, [good, good, broken], settings, utcnow())
    assert sum(queue.counts_by_status(store).values()) == 0


def test_the_plain_batch_check_needs_no_service(settings: Settings) -> None:
    [request] = batch_from(settings, [{"prompt": "p", "priority": 9}])
    assert (request.prompt, request.priority, request.workdir) == (
        "p", 9, str(settings.workdir.resolve()))


# -- waiting on several ----------------------------------------------------------------------

async def test_waiting_for_all_returns_every_record_with_its_result(service: Service) -> None:
    results = await service.submit_many(await service.prepare_batch(
        [{"prompt": "one"}, {"prompt": "two", "output_schema": SCHEMA}]))
    ids = [r.task_id for r in results]
    seen: list[int] = []

    async def progress(tasks: list[queue.Progress], elapsed: float) -> None:
        seen.append(len(tasks))

    async with anyio.create_task_group() as tg:
        tg.start_soon(play_worker, service, {"one": "1", "two": json.dumps({"n": 2})}, 2)
        waited = await service.wait_many(ids, "all", 30, progress, progress_every_s=0.01)
    assert waited.done and waited.ended == ids and waited.unfinished == []
    assert [t.result for t in waited.tasks] == ["1", '{"n": 2}']
    assert waited.tasks[1].result_json == {"n": 2} and waited.tasks[0].result_json is None
    assert all(n == 2 for n in seen)


async def test_waiting_for_any_returns_once_one_ended_and_lists_the_rest(
        service: Service) -> None:
    results = await service.submit_many(await service.prepare_batch(
        [{"prompt": "first", "priority": 10}, {"prompt": "second", "priority": 1}]))
    ids = [r.task_id for r in results]
    async with anyio.create_task_group() as tg:
        tg.start_soon(play_worker, service, {"first": "done"}, 1)
        waited = await service.wait_many(ids, "any", 30)
    assert waited.done and waited.ended == [ids[0]] and waited.unfinished == [ids[1]]
    assert "unfinished" in waited.next_step


async def test_a_wait_that_runs_out_says_so_and_the_tasks_go_on(service: Service) -> None:
    [result] = await service.submit_many(await service.prepare_batch([{"prompt": "slow"}]))
    waited = await service.wait_many([result.task_id], "all", 0.05)
    assert not waited.done and waited.unfinished == [result.task_id]
    assert waited.tasks[0].status == "pending" and waited.waited_s >= 0.05


async def test_a_wait_on_an_unknown_id_is_an_error_at_once(service: Service) -> None:
    [result] = await service.submit_many(await service.prepare_batch([{"prompt": "x"}]))
    with pytest.raises(TaskNotFound, match="task_nope"):
        await service.wait_many([result.task_id, "task_nope"], "all", 30)


@pytest.mark.parametrize("ids, mode, wait_s, words", [
    ([], "all", 1, "non-empty list"), ("task_x", "all", 1, "non-empty list"),
    ([3], "all", 1, "task_ids[0] must be a task id"), (["t"], "some", 1, 'mode must be "all"'),
    (["t"], "all", 101, "wait_s must be a number of seconds from 0 to 100"),
    (["t"], "all", True, "wait_s must be"), (["t"] * 101, "all", 1, "at most 100"),
])
async def test_a_bad_wait_is_refused(service: Service, ids: Any, mode: str, wait_s: Any,
                                     words: str) -> None:
    with pytest.raises(InvalidRequest, match=words.replace("[", r"\[").replace("]", r"\]")):
        await service.wait_many(ids, mode, wait_s)
