"""The stand-in Ollama is faithful where timing matters: slots, queue, 503, load, streaming, cancel.

Other tests lean on these behaviours (a pool test on a 1-slot stand-in means what it says only
if the stand-in really serves one generation at a time), so they are checked here over a real
socket with a plain HTTP client.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import anyio
import httpx
import pytest

from tests.fakes.ollama_process import FakeOllamaProcess
from tests.fakes.ollama_server import BUSY_MESSAGE, FakeOllama
from tests.fakes.ollama_state import OLLAMA_DEFAULT_MAX_QUEUE, OLLAMA_DEFAULT_NUM_PARALLEL
from tests.support.waiting import async_wait_until, wait_until

MODEL = "gpt-oss:20b"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def fake() -> Iterator[FakeOllama]:
    with FakeOllama(models=[MODEL]) as server:
        yield server


def chat(prompt: str = "hi", **extra: object) -> dict[str, object]:
    return {"model": MODEL, "messages": [{"role": "user", "content": prompt}], **extra}


def test_the_defaults_are_ollamas_one_slot_and_a_queue_of_512(fake: FakeOllama) -> None:
    config = fake.configure()
    assert (config["slots"], config["max_queue"]) == (1, 512)
    assert (OLLAMA_DEFAULT_NUM_PARALLEL, OLLAMA_DEFAULT_MAX_QUEUE) == (1, 512)


@pytest.mark.anyio
async def test_requests_beyond_the_slots_wait_in_the_queue_and_are_served_in_turn(
    fake: FakeOllama,
) -> None:
    fake.configure(slots=2, mode="hang")
    async with httpx.AsyncClient() as client, anyio.create_task_group() as tg:
        for index in range(5):
            body = chat(f"p{index}", stream=False)
            tg.start_soon(lambda b=body: client.post(f"{fake.url}/api/chat", json=b, timeout=10))
        await async_wait_until(lambda: fake.stats()["active"] == 2 and fake.stats()["queue_depth"] == 3)
        fake.configure(mode="ok")
        fake.release()
    stats = fake.stats()
    assert stats["max_concurrency"] == 2
    assert stats["max_queue_depth"] == 3
    assert [call["outcome"] for call in stats["calls"]] == ["done"] * 5
    assert sum(call["queue_wait_s"] > 0 for call in stats["calls"]) >= 3


@pytest.mark.anyio
async def test_a_full_queue_answers_503_with_ollamas_busy_message(fake: FakeOllama) -> None:
    fake.configure(slots=1, max_queue=1, mode="hang")
    async with httpx.AsyncClient() as client, anyio.create_task_group() as tg:
        for index in range(2):
            body = chat(f"p{index}", stream=False)
            tg.start_soon(lambda b=body: client.post(f"{fake.url}/api/chat", json=b, timeout=10))
        await async_wait_until(lambda: fake.stats()["active"] == 1 and fake.stats()["queue_depth"] == 1)
        refused = await client.post(f"{fake.url}/api/chat", json=chat("third"), timeout=10)
        assert refused.status_code == 503
        assert refused.json() == {"error": BUSY_MESSAGE}
        fake.configure(mode="ok")
        fake.release()
    stats = fake.stats()
    assert stats["rejected_busy"] == 1
    assert [call["outcome"] for call in stats["calls"]].count("done") == 2


def test_a_stream_sends_one_chunk_per_token_then_ollamas_final_chunk(fake: FakeOllama) -> None:
    fake.configure(reply_tokens=20)
    response = httpx.post(f"{fake.url}/api/chat", json=chat("one two"))
    lines = [json.loads(line) for line in response.text.splitlines()]
    assert len(lines) == 21
    assert all(line["done"] is False for line in lines[:-1])
    text = "".join(line["message"]["content"] for line in lines)
    assert text.startswith("echo: one two w0 w1")
    assert len(text.split()) == 20
    final = lines[-1]
    assert final["done"] is True and final["done_reason"] == "stop"
    assert final["eval_count"] == 20
    assert final["prompt_eval_count"] == 2
    for field in ("eval_duration", "prompt_eval_duration", "load_duration", "total_duration"):
        assert isinstance(final[field], int) and final[field] > 0
    assert final["total_duration"] >= final["eval_duration"]


def test_num_predict_cuts_the_reply_with_done_reason_length(fake: FakeOllama) -> None:
    fake.configure(reply_tokens=50)
    reply = httpx.post(
        f"{fake.url}/api/chat", json=chat(stream=False, options={"num_predict": 7})
    ).json()
    assert reply["done_reason"] == "length"
    assert reply["eval_count"] == 7
    assert len(reply["message"]["content"].split()) == 7


def test_a_stream_is_sent_as_it_is_generated_not_all_at_the_end(fake: FakeOllama) -> None:
    fake.configure(reply_tokens=40, tokens_per_s=20)  # two seconds of generation
    with httpx.stream("POST", f"{fake.url}/api/chat", json=chat(), timeout=30) as response:
        lines = response.iter_lines()
        first = json.loads(next(lines))
        assert first["done"] is False
        # the first token is here while the server is still generating the rest
        assert fake.stats()["calls"][0].get("outcome") is None
        rest = [json.loads(line) for line in lines]
    assert rest[-1]["done"] is True
    assert fake.stats()["calls"][0]["outcome"] == "done"


def test_the_openai_endpoint_streams_at_the_same_pace_with_finish_reason(fake: FakeOllama) -> None:
    fake.configure(reply_tokens=6)
    body = {**chat(), "stream": True}
    streamed = httpx.post(f"{fake.url}/v1/chat/completions", json=body)
    events = [line[6:] for line in streamed.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert len(chunks) == 7
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    whole = httpx.post(f"{fake.url}/v1/chat/completions", json=chat()).json()
    assert whole["usage"]["completion_tokens"] == 6


def test_a_model_is_loaded_once_and_again_only_after_keep_alive_expires(fake: FakeOllama) -> None:
    fake.configure(load_s=0.2)
    first = httpx.post(f"{fake.url}/api/chat", json=chat(stream=False)).json()
    httpx.post(f"{fake.url}/api/chat", json=chat(stream=False, keep_alive=0))
    assert fake.stats()["loads"] == 1
    assert first["load_duration"] >= 200_000_000
    assert fake.stats()["loaded_models"] == []  # keep_alive 0 unloaded it after use
    httpx.post(f"{fake.url}/api/chat", json=chat(stream=False))
    stats = fake.stats()
    assert stats["loads"] == 2
    assert stats["loaded_models"] == [MODEL]


@pytest.mark.anyio
async def test_concurrent_first_requests_share_one_load(fake: FakeOllama) -> None:
    fake.configure(slots=3, load_s=0.3)
    async with httpx.AsyncClient() as client, anyio.create_task_group() as tg:
        for index in range(3):
            tg.start_soon(lambda i=index: client.post(f"{fake.url}/api/chat", json=chat(f"p{i}"), timeout=10))
    assert fake.stats()["loads"] == 1


def test_a_client_that_closes_its_stream_frees_the_slot_at_once(fake: FakeOllama) -> None:
    fake.configure(slots=1, reply_tokens=100_000, tokens_per_s=50)  # half an hour of tokens
    with httpx.stream("POST", f"{fake.url}/api/chat", json=chat(), timeout=30) as response:
        assert json.loads(next(response.iter_lines()))["done"] is False
    wait_until(lambda: fake.stats()["active"] == 0, timeout=5)
    stats = fake.stats()
    assert stats["cancelled"] == 1
    assert stats["calls"][0]["outcome"] == "cancelled"
    assert 1 <= stats["calls"][0]["tokens"] < 100_000
    fake.configure(reply_tokens=0, tokens_per_s=0)
    after = httpx.post(f"{fake.url}/api/chat", json=chat("after", stream=False), timeout=10)
    assert after.json()["message"]["content"] == "echo: after"


@pytest.mark.anyio
async def test_a_client_that_leaves_the_queue_is_dropped_from_it(fake: FakeOllama) -> None:
    fake.configure(slots=1, mode="hang")
    async with httpx.AsyncClient() as client, anyio.create_task_group() as tg:
        tg.start_soon(lambda: client.post(f"{fake.url}/api/chat", json=chat("holder"), timeout=10))
        await async_wait_until(lambda: fake.stats()["active"] == 1)
        with anyio.CancelScope() as waiting:
            async def give_up_once_queued() -> None:
                await async_wait_until(lambda: fake.stats()["queue_depth"] == 1)
                waiting.cancel()

            tg.start_soon(give_up_once_queued)
            await client.post(f"{fake.url}/api/chat", json=chat("quitter"), timeout=10)
        await async_wait_until(lambda: fake.stats()["queue_depth"] == 0 and fake.stats()["cancelled"] == 1)
        fake.configure(mode="ok")
        fake.release()
    assert sorted(call["outcome"] for call in fake.stats()["calls"]) == ["cancelled", "done"]


@pytest.mark.anyio
async def test_time_waiting_in_the_queue_shows_in_the_clients_time_to_first_token(
    fake: FakeOllama,
) -> None:
    fake.configure(slots=1, mode="hang", reply_tokens=3)
    first_token_s: list[float] = []

    async def second(client: httpx.AsyncClient) -> None:
        sent = anyio.current_time()
        async with client.stream("POST", f"{fake.url}/api/chat", json=chat("second"), timeout=10) as r:
            async for _line in r.aiter_lines():
                first_token_s.append(anyio.current_time() - sent)
                break

    async with httpx.AsyncClient() as client, anyio.create_task_group() as tg:
        tg.start_soon(lambda: client.post(f"{fake.url}/api/chat", json=chat("first"), timeout=10))
        await async_wait_until(lambda: fake.stats()["active"] == 1)
        tg.start_soon(second, client)
        await async_wait_until(lambda: fake.stats()["queue_depth"] == 1)
        fake.configure(mode="ok")
        fake.release()
    waited = fake.stats()["calls"][1]["queue_wait_s"]
    assert waited > 0
    assert first_token_s[0] >= waited


def test_bad_timing_settings_are_refused_and_change_nothing(fake: FakeOllama) -> None:
    for bad in ({"ttft_s": -1}, {"tokens_per_s": "fast"}, {"slots": -1}, {"max_queue": 1.5}):
        assert httpx.post(f"{fake.url}/_fake/config", json=bad).status_code == 400
    assert fake.configure()["slots"] == 1
    bad_keep_alive = httpx.post(f"{fake.url}/api/chat", json=chat(keep_alive="soon"))
    assert bad_keep_alive.status_code == 400


def test_the_process_takes_the_timing_settings_as_flags() -> None:
    settings = {"slots": 3, "max_queue": 7, "load_s": 0.01, "keep_alive_s": 60.0,
                "ttft_s": 0.01, "tokens_per_s": 500.0, "reply_tokens": 5}
    with FakeOllamaProcess(models=[MODEL], **settings) as process:
        config = process.configure()
        assert {name: config[name] for name in settings} == settings
        reply = httpx.post(f"{process.url}/api/chat", json=chat(stream=False)).json()
        assert reply["eval_count"] == 5
    with pytest.raises(ValueError):
        FakeOllamaProcess(models=[MODEL], slots=-1)


def test_a_format_is_honoured_as_json_of_that_shape_and_recorded(fake: FakeOllama) -> None:
    schema = {"type": "object", "properties": {
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "minItems": 2},
        "kind": {"enum": ["a", "b"]}, "n": {"type": "number", "minimum": 3},
        "ok": {"type": "boolean"}}}
    reply = httpx.post(f"{fake.url}/api/chat", json=chat("summarise", format=schema,
                                                          stream=False), timeout=5).json()
    assert json.loads(reply["message"]["content"]) == {
        "tags": ["echo: su", "echo: su"], "kind": "a", "n": 3.0, "ok": True}
    reply = httpx.post(f"{fake.url}/api/chat", json=chat("x", format="json", stream=False),
                       timeout=5).json()
    assert json.loads(reply["message"]["content"]) == {"echo": "echo: x"}
    calls = fake.stats()["calls"]
    assert [c["format"] for c in calls] == [schema, "json"]


def test_a_format_that_is_neither_json_nor_a_schema_is_a_400(fake: FakeOllama) -> None:
    response = httpx.post(f"{fake.url}/api/chat", json=chat("x", format=["a"]), timeout=5)
    assert response.status_code == 400 and "invalid format" in response.json()["error"]


def test_misfit_next_makes_that_many_formatted_answers_miss_their_format(fake: FakeOllama) -> None:
    fake.configure(misfit_next=1)
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    answers = [json.loads(httpx.post(f"{fake.url}/api/chat", json=chat("x", format=schema,
                                                                       stream=False),
                                     timeout=5).json()["message"]["content"]) for _ in range(2)]
    assert answers == [["not", "an", "object"], {"a": "echo: x"}]


def test_system_messages_and_roles_are_recorded(fake: FakeOllama) -> None:
    body = {"model": "gpt-oss:20b", "stream": False, "messages": [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]}
    reply = httpx.post(f"{fake.url}/api/chat", json=body, timeout=5).json()
    assert reply["message"]["content"] == "echo: hi"
    [call] = fake.stats()["calls"]
    assert call["system"] == "be brief" and call["roles"] == ["system", "user"]
