"""OllamaBackend against the fake Ollama over a real socket: success, every error, probe.

Also the behaviours of the fake itself that other tests rely on (streaming shapes, the
OpenAI-compatible endpoint, slots, release, the standalone process).
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import AsyncIterator, Callable, Iterator

import anyio
import httpx
import pytest

from koubou_mcp.backends import (
    MAX_RESULT_CHARS,
    BackendRequest,
    GenerationProgress,
    OllamaBackend,
    PermanentBackendError,
    TransientBackendError,
    model_present,
)
from koubou_mcp.backends.http_stream import Abort, Aborted
from tests.fakes.ollama_server import FakeOllama, FakeOllamaProcess
from tests.support.scripted_http import full_backlog, json_reply, ndjson_stream, scripted
from tests.support.waiting import async_wait_until, wait_until

MODEL = "gpt-oss:20b"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def fake() -> Iterator[FakeOllama]:
    with FakeOllama(models=[MODEL, "llama3.2:latest"]) as server:
        yield server


@pytest.fixture
async def backend(fake: FakeOllama) -> AsyncIterator[OllamaBackend]:
    backend = OllamaBackend(fake.url, MODEL)
    yield backend
    await backend.aclose()


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A port that refuses connections: bound (so nobody else takes it) but not listening."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def request(
    prompt: str = "hello",
    timeout_s: float = 10.0,
    *,
    model: str | None = None,
    on_progress: Callable[[GenerationProgress], None] | None = None,
) -> BackendRequest:
    return BackendRequest(
        task_id="t-1", prompt=prompt, timeout_s=timeout_s, model=model, on_progress=on_progress
    )


# -- success ---------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_run_returns_the_models_reply_to_the_prompt(backend: OllamaBackend) -> None:
    assert await backend.run(request("What is 2+2?")) == "echo: What is 2+2?"


@pytest.mark.anyio
async def test_run_streams_the_prompt_to_the_model_with_the_options(
    fake: FakeOllama,
) -> None:
    backend = OllamaBackend(fake.url + "/", MODEL, options={"temperature": 0, "num_ctx": 8192})
    try:
        await backend.run(request("line one\nline two"))
    finally:
        await backend.aclose()
    stats = fake.stats()
    assert stats["prompts"] == ["line one\nline two"]
    [call] = stats["calls"]
    assert {key: call[key] for key in ("path", "model", "stream", "options", "outcome")} == {
        "path": "/api/chat",
        "model": MODEL,
        "stream": True,
        "options": {"temperature": 0, "num_ctx": 8192},
        "outcome": "done",
    }


@pytest.mark.anyio
async def test_a_model_named_without_a_tag_means_its_latest_tag(fake: FakeOllama) -> None:
    backend = OllamaBackend(fake.url, "llama3.2")
    try:
        assert await backend.run(request("hi")) == "echo: hi"
    finally:
        await backend.aclose()


@pytest.mark.anyio
async def test_a_huge_reply_is_cut_to_the_result_limit_with_a_note(
    fake: FakeOllama, backend: OllamaBackend
) -> None:
    fake.configure(mode="huge", huge_chars=MAX_RESULT_CHARS + 5_000)
    result = await backend.run(request())
    assert result.startswith("echo: hello")
    assert len(result) < MAX_RESULT_CHARS + 200
    assert "truncated" in result


# -- errors ----------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_nothing_listening_is_a_transient_unreachable_error_naming_the_url_and_fix(
    closed_port: int,
) -> None:
    url = f"http://127.0.0.1:{closed_port}"
    backend = OllamaBackend(url, MODEL)
    try:
        with pytest.raises(TransientBackendError) as caught:
            await backend.run(request())
    finally:
        await backend.aclose()
    assert caught.value.kind == "unreachable"
    message = str(caught.value)
    assert url in message
    assert "ollama serve" in message
    assert "KOUBOU_OLLAMA_URL" in message


@pytest.mark.anyio
async def test_a_connect_timeout_is_reported_as_unreachable() -> None:
    with full_backlog() as url:
        backend = OllamaBackend(url, MODEL, connect_timeout_s=0.3)
        with pytest.raises(TransientBackendError) as caught:
            await backend.run(request())
        await backend.aclose()
    assert caught.value.kind == "unreachable"
    assert url in str(caught.value)


@pytest.mark.anyio
async def test_http_503_is_a_transient_busy_error(fake: FakeOllama, backend: OllamaBackend) -> None:
    fake.configure(mode="busy503")
    with pytest.raises(TransientBackendError) as caught:
        await backend.run(request())
    assert caught.value.kind == "busy"


@pytest.mark.anyio
async def test_other_5xx_is_a_transient_server_error_quoting_the_body(
    fake: FakeOllama, backend: OllamaBackend
) -> None:
    fake.configure(mode="error500")
    with pytest.raises(TransientBackendError) as caught:
        await backend.run(request())
    assert caught.value.kind == "server_error"
    assert "500" in str(caught.value)
    assert "injected internal server error" in str(caught.value)


@pytest.mark.anyio
async def test_a_model_that_is_not_pulled_is_permanent_with_the_pull_command(
    fake: FakeOllama,
) -> None:
    backend = OllamaBackend(fake.url, "qwen3-coder:30b")
    try:
        with pytest.raises(PermanentBackendError) as caught:
            await backend.run(request())
    finally:
        await backend.aclose()
    assert caught.value.kind == "model_not_found"
    assert "ollama pull qwen3-coder:30b" in str(caught.value)


@pytest.mark.anyio
async def test_another_4xx_is_a_permanent_bad_request(fake: FakeOllama) -> None:
    backend = OllamaBackend(fake.url + "/not-ollama", MODEL)  # every path there is a 404
    try:
        with pytest.raises(PermanentBackendError) as caught:
            await backend.run(request())
    finally:
        await backend.aclose()
    assert caught.value.kind == "bad_request"
    assert "404" in str(caught.value)


@pytest.mark.anyio
async def test_a_reply_slower_than_the_read_timeout_is_a_transient_timeout(
    fake: FakeOllama, backend: OllamaBackend
) -> None:
    fake.configure(mode="hang")
    with pytest.raises(TransientBackendError) as caught:
        await backend.run(request(timeout_s=0.3))
    assert caught.value.kind == "timeout"


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("mode", "reason"),
    [
        ("malformed", "not valid JSON"),
        ("truncated", "truncated"),
        ("missing_content", "no 'message'"),
    ],
)
async def test_a_garbled_reply_is_a_permanent_malformed_error_with_the_reason(
    fake: FakeOllama, backend: OllamaBackend, mode: str, reason: str
) -> None:
    fake.configure(mode=mode)
    with pytest.raises(PermanentBackendError) as caught:
        await backend.run(request())
    assert caught.value.kind == "malformed"
    assert reason in str(caught.value)


@pytest.mark.anyio
async def test_a_reply_without_message_content_is_malformed() -> None:
    with scripted(json_reply({"model": MODEL, "message": {"role": "assistant"}})) as server:
        backend = OllamaBackend(server.url, MODEL)
        with pytest.raises(PermanentBackendError) as caught:
            await backend.run(request())
        await backend.aclose()
    assert caught.value.kind == "malformed"
    assert "message.content" in str(caught.value)


@pytest.mark.anyio
async def test_fail_next_fails_only_that_many_requests_then_answers_again(
    fake: FakeOllama, backend: OllamaBackend
) -> None:
    fake.configure(fail_next=2, fail_next_mode="busy503")
    for _ in range(2):
        with pytest.raises(TransientBackendError):
            await backend.run(request())
    assert await backend.run(request("third")) == "echo: third"
    assert fake.stats()["injected_errors"] == 2


@pytest.mark.anyio
async def test_errors_are_retryable_exactly_when_transient(fake: FakeOllama, backend: OllamaBackend) -> None:
    fake.configure(fail_next=1, fail_next_mode="busy503")
    with pytest.raises(TransientBackendError) as transient:
        await backend.run(request())
    fake.configure(fail_next=1, fail_next_mode="malformed")
    with pytest.raises(PermanentBackendError) as permanent:
        await backend.run(request())
    assert transient.value.transient is True
    assert permanent.value.transient is False


# -- cancellation, client ownership ------------------------------------------------------------


@pytest.mark.anyio
async def test_cancelling_a_call_abandons_the_request_at_once(
    fake: FakeOllama, backend: OllamaBackend
) -> None:
    fake.configure(mode="hang")
    async with anyio.create_task_group() as tg:
        tg.start_soon(backend.run, request())
        await async_wait_until(lambda: fake.stats()["active"] == 1)
        tg.cancel_scope.cancel()
    fake.configure(mode="ok")
    fake.release()
    assert await backend.run(request("after")) == "echo: after"


@pytest.mark.anyio
async def test_calls_share_one_kept_alive_connection(backend: OllamaBackend) -> None:
    with scripted(ndjson_stream(
        {"message": {"role": "assistant", "content": "hi"}, "done": False},
        {"message": {"role": "assistant", "content": ""}, "done": True, "done_reason": "stop"},
    )) as server:
        backend = OllamaBackend(server.url, MODEL)
        for _ in range(3):
            assert await backend.run(request()) == "hi"
        await backend.aclose()
    assert server.requests == 3
    assert server.connections == 1  # the body is read past the final chunk to its end


@pytest.mark.anyio
async def test_a_kept_alive_connection_the_server_closed_is_replaced_without_an_error() -> None:
    with scripted(ndjson_stream(
        {"message": {"role": "assistant", "content": "hi"}, "done": True},
    ), close_after_reply=True) as server:
        backend = OllamaBackend(server.url, MODEL)
        for _ in range(3):
            assert await backend.run(request()) == "hi"
        await backend.aclose()
    assert server.connections == 3


def test_abort_from_another_thread_ends_a_blocking_call_at_once(fake: FakeOllama) -> None:
    fake.configure(mode="hang")
    backend = OllamaBackend(fake.url, MODEL)
    abort = Abort()
    outcome: list[BaseException] = []

    def call() -> None:
        try:
            backend.run_blocking(request(timeout_s=60), abort)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=call)
    thread.start()
    wait_until(lambda: fake.stats()["active"] == 1, timeout=10)
    abort.fire()
    thread.join(timeout=5)
    assert not thread.is_alive()
    assert [type(e) for e in outcome] == [Aborted]
    wait_until(lambda: fake.stats()["active"] == 0, timeout=10)  # the server saw us leave
    fake.configure(mode="ok")
    fake.release()
    assert backend.run_blocking(request("after"), Abort()) == "echo: after"
    backend.close()


# -- streaming, progress, model override ----------------------------------------------------


@pytest.mark.anyio
async def test_progress_is_reported_as_the_answer_streams_in(
    fake: FakeOllama, backend: OllamaBackend
) -> None:
    fake.configure(reply_tokens=40, tokens_per_s=100)  # 0.4 s of generation: several reports
    reports: list[GenerationProgress] = []
    result = await backend.run(request("count", on_progress=reports.append))
    assert len(reports) >= 3
    assert reports[0].tokens >= 1 and reports[0].first_token_s is not None
    assert all(not report.done for report in reports[:-1])
    assert [r.tokens for r in reports] == sorted(r.tokens for r in reports)
    for earlier, later in zip(reports, reports[1:], strict=False):
        assert later.text.startswith(earlier.text)
    last = reports[-1]
    assert last.done and last.text == result
    assert result.startswith("echo: count w0") and len(result.split()) == 40
    assert last.tokens == 40  # the final chunk's eval_count
    assert last.eval_tokens_per_s is not None and last.eval_tokens_per_s > 0
    assert last.load_s is not None
    assert last.elapsed_s >= last.first_token_s


@pytest.mark.anyio
async def test_cancelling_mid_stream_closes_it_frees_the_slot_and_keeps_the_text_so_far(
    fake: FakeOllama, backend: OllamaBackend
) -> None:
    fake.configure(slots=1, reply_tokens=100_000, tokens_per_s=100)  # far longer than the test
    reports: list[GenerationProgress] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(backend.run, request("long", on_progress=reports.append))
        await async_wait_until(lambda: bool(reports) and reports[-1].tokens >= 5, timeout=10)
        tg.cancel_scope.cancel()
    await async_wait_until(lambda: fake.stats()["active"] == 0 and fake.stats()["cancelled"] == 1)
    [call] = fake.stats()["calls"]
    assert call["outcome"] == "cancelled"
    last = reports[-1]
    assert not last.done
    assert last.text.startswith("echo: long w0")
    assert last.tokens >= 5
    fake.configure(reply_tokens=0, tokens_per_s=0)
    assert await backend.run(request("next")) == "echo: next"  # the one slot is free again


@pytest.mark.anyio
async def test_a_timeout_mid_stream_keeps_the_text_so_far_in_the_last_report(
    fake: FakeOllama, backend: OllamaBackend
) -> None:
    fake.configure(reply_tokens=100_000, tokens_per_s=100)
    reports: list[GenerationProgress] = []
    with pytest.raises(TimeoutError):
        with anyio.fail_after(30) as scope:
            async with anyio.create_task_group() as tg:

                async def expire_once_streaming() -> None:
                    await async_wait_until(lambda: bool(reports) and reports[-1].tokens >= 3, timeout=10)
                    scope.deadline = anyio.current_time()

                tg.start_soon(expire_once_streaming)
                await backend.run(request("slow", on_progress=reports.append))
    assert reports[-1].text.startswith("echo: slow")
    await async_wait_until(lambda: fake.stats()["active"] == 0)


@pytest.mark.anyio
async def test_a_request_can_run_on_another_model_than_the_backends(
    fake: FakeOllama, backend: OllamaBackend
) -> None:
    assert await backend.run(request("hi", model="llama3.2")) == "echo: hi"
    assert [call["model"] for call in fake.stats()["calls"]] == ["llama3.2"]
    with pytest.raises(PermanentBackendError) as caught:
        await backend.run(request(model="qwen3-coder:30b"))
    assert caught.value.kind == "model_not_found"
    assert "ollama pull qwen3-coder:30b" in str(caught.value)


@pytest.mark.anyio
async def test_a_thinking_models_reasoning_counts_as_tokens_but_not_as_the_answer() -> None:
    reply = ndjson_stream(
        {"message": {"role": "assistant", "content": "", "thinking": "hmm"}, "done": False},
        {"message": {"role": "assistant", "content": "", "thinking": " ok"}, "done": False},
        {"message": {"role": "assistant", "content": "42"}, "done": False},
        {"message": {"role": "assistant", "content": ""}, "done": True, "done_reason": "stop"},
    )
    reports: list[GenerationProgress] = []
    with scripted(reply) as server:
        backend = OllamaBackend(server.url, MODEL)
        assert await backend.run(request(on_progress=reports.append)) == "42"
    assert reports[-1].tokens == 3 and reports[-1].done
    assert reports[0].first_token_s is not None and reports[0].text == ""


@pytest.mark.anyio
async def test_an_error_in_the_middle_of_the_stream_is_a_transient_server_error() -> None:
    reply = ndjson_stream(
        {"message": {"role": "assistant", "content": "par"}, "done": False},
        {"error": "an error was encountered while running the model"},
    )
    reports: list[GenerationProgress] = []
    with scripted(reply) as server:
        backend = OllamaBackend(server.url, MODEL)
        with pytest.raises(TransientBackendError) as caught:
            await backend.run(request(on_progress=reports.append))
    assert caught.value.kind == "server_error"
    assert "while running the model" in str(caught.value)
    assert reports[-1].text == "par"


@pytest.mark.anyio
async def test_a_stream_that_ends_without_its_final_chunk_is_truncated() -> None:
    reply = ndjson_stream(
        {"message": {"role": "assistant", "content": "half"}, "done": False},
    )
    with scripted(reply) as server:
        backend = OllamaBackend(server.url, MODEL)
        with pytest.raises(PermanentBackendError) as caught:
            await backend.run(request())
    assert caught.value.kind == "malformed"
    assert "truncated" in str(caught.value)


@pytest.mark.anyio
async def test_a_full_queue_is_a_transient_busy_error_naming_ollamas_reason(
    fake: FakeOllama, backend: OllamaBackend
) -> None:
    fake.configure(slots=1, max_queue=0, mode="hang")
    async with anyio.create_task_group() as tg:
        tg.start_soon(backend.run, request("holder"))
        await async_wait_until(lambda: fake.stats()["active"] == 1)
        with pytest.raises(TransientBackendError) as caught:
            await backend.run(request("refused"))
        tg.cancel_scope.cancel()
    assert caught.value.kind == "busy"
    assert "maximum pending requests exceeded" in str(caught.value)


# -- probe ------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_probe_reports_the_version_and_the_pulled_models(backend: OllamaBackend) -> None:
    assert await backend.probe() == {
        "reachable": True,
        "version": "0.12.6",
        "models": [MODEL, "llama3.2:latest"],
        "error": None,
    }


@pytest.mark.anyio
async def test_probe_of_a_dead_server_says_unreachable_and_how_to_fix_it(
    closed_port: int,
) -> None:
    backend = OllamaBackend(f"http://127.0.0.1:{closed_port}", MODEL)
    try:
        result = await backend.probe()
    finally:
        await backend.aclose()
    assert result["reachable"] is False
    assert result["version"] is None
    assert result["models"] == []
    assert "ollama serve" in result["error"]


@pytest.mark.anyio
async def test_probe_of_something_that_is_not_ollama_is_reachable_with_an_error(
    fake: FakeOllama,
) -> None:
    backend = OllamaBackend(fake.url + "/elsewhere", MODEL)
    try:
        result = await backend.probe()
    finally:
        await backend.aclose()
    assert result["reachable"] is True
    assert "404" in result["error"]


def test_model_present_treats_a_missing_tag_as_latest() -> None:
    models = ["llama3.2:latest", "gpt-oss:20b"]
    assert model_present(models, "llama3.2")
    assert model_present(models, "llama3.2:latest")
    assert model_present(["llama3.2"], "llama3.2:latest")
    assert model_present(models, "gpt-oss:20b")
    assert not model_present(models, "gpt-oss")
    assert not model_present(models, "gpt-oss:120b")
    assert not model_present([], "llama3.2")


# -- the fake itself ----------------------------------------------------------------------------


def test_the_fake_streams_ndjson_chat_chunks_by_default_like_ollama(fake: FakeOllama) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "one two"}]}
    response = httpx.post(f"{fake.url}/api/chat", json=body)
    assert response.headers["content-type"] == "application/x-ndjson"
    lines = [json.loads(line) for line in response.text.splitlines()]
    assert "".join(line["message"]["content"] for line in lines) == "echo: one two"
    assert [line["done"] for line in lines][-1] is True
    assert lines[-1]["done_reason"] == "stop"
    assert {"total_duration", "eval_count", "created_at", "model"} <= set(lines[-1])


def test_the_fake_answers_generate_with_a_response_field(fake: FakeOllama) -> None:
    body = {"model": MODEL, "prompt": "why?", "stream": False}
    reply = httpx.post(f"{fake.url}/api/generate", json=body).json()
    assert reply["response"] == "echo: why?"
    assert reply["done"] is True
    assert fake.stats()["by_path"] == {"/api/generate": 1}


def test_the_fake_speaks_the_openai_chat_completions_dialect(fake: FakeOllama) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    reply = httpx.post(f"{fake.url}/v1/chat/completions", json=body).json()
    assert reply["object"] == "chat.completion"
    assert reply["choices"][0]["message"] == {"role": "assistant", "content": "echo: hi"}

    streamed = httpx.post(f"{fake.url}/v1/chat/completions", json={**body, "stream": True})
    events = [line[6:] for line in streamed.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    text = "".join(chunk["choices"][0]["delta"].get("content", "") for chunk in chunks)
    assert text == "echo: hi"

    missing = httpx.post(f"{fake.url}/v1/chat/completions", json={**body, "model": "nope"})
    assert missing.status_code == 404
    assert missing.json()["error"]["type"] == "not_found_error"


def test_the_fake_rejects_unknown_config_keys_and_modes(fake: FakeOllama) -> None:
    assert httpx.post(f"{fake.url}/_fake/config", json={"bogus": 1}).status_code == 400
    assert httpx.post(f"{fake.url}/_fake/config", json={"mode": "weird"}).status_code == 400
    config = httpx.post(f"{fake.url}/_fake/config", json={"latency_s": 0.01}).json()
    assert config["latency_s"] == 0.01


@pytest.mark.anyio
async def test_the_fake_processes_at_most_slots_requests_at_once(fake: FakeOllama) -> None:
    fake.configure(slots=2, mode="hang")
    async with httpx.AsyncClient() as client, anyio.create_task_group() as tg:
        for index in range(4):
            body = {"model": MODEL, "messages": [{"role": "user", "content": f"p{index}"}]}
            tg.start_soon(lambda b=body: client.post(f"{fake.url}/api/chat", json=b, timeout=10))
        # two hold the slots (hanging), two wait at the gate: the work really overlapped
        await async_wait_until(lambda: fake.stats()["active"] == 2 and fake.stats()["in_flight"] == 4)
        fake.configure(mode="ok")
        fake.release()
    stats = fake.stats()
    assert stats["max_concurrency"] == 2
    assert stats["max_in_flight"] == 4
    assert sorted(stats["prompts"]) == ["p0", "p1", "p2", "p3"]


def test_stopping_the_fake_ends_hanging_requests() -> None:
    server = FakeOllama(models=[MODEL], mode="hang").start()
    errors: list[BaseException] = []

    def call() -> None:
        try:
            httpx.post(f"{server.url}/api/chat", json={"model": MODEL, "messages": []}, timeout=30)
        except httpx.HTTPError as exc:
            errors.append(exc)

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    wait_until(lambda: server.stats()["active"] == 1)
    server.stop()
    thread.join(timeout=5)
    assert not thread.is_alive()
    assert errors  # the client saw the connection drop


def test_the_fake_runs_as_a_process_configured_over_http() -> None:
    with FakeOllamaProcess(models=[MODEL], latency_s=0.01) as process:
        assert process.url.startswith("http://127.0.0.1:")
        process.configure(mode="busy503")
        body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stream": False}
        assert httpx.post(f"{process.url}/api/chat", json=body).status_code == 503
        process.configure(mode="ok")
        assert httpx.post(f"{process.url}/api/chat", json=body).json()["message"]["content"] == ("echo: x")
        assert process.stats()["prompts"] == ["x", "x"]
        child = process.process
        assert child is not None
    assert child.returncode is not None


# -- system, options, output schema --------------------------------------------------------

SCHEMA = {"type": "object", "properties": {"summary": {"type": "string"},
                                           "lines": {"type": "integer", "minimum": 1}},
          "required": ["summary", "lines"]}


@pytest.mark.anyio
async def test_a_system_prompt_goes_first_and_task_options_override_the_backends(
    fake: FakeOllama,
) -> None:
    backend = OllamaBackend(fake.url, MODEL, options={"temperature": 0.7, "num_ctx": 4096})
    try:
        answer = await backend.run(BackendRequest(
            "t-1", "hello", 10.0, system="You answer in one word.",
            options={"temperature": 0.0, "seed": 42}))
    finally:
        await backend.aclose()
    assert answer == "echo: hello"
    [call] = fake.stats()["calls"]
    assert call["roles"] == ["system", "user"] and call["system"] == "You answer in one word."
    assert call["options"] == {"temperature": 0.0, "num_ctx": 4096, "seed": 42}
    assert call["format"] is None


@pytest.mark.anyio
async def test_an_output_schema_is_sent_as_the_format_and_the_answer_fits_it(
    fake: FakeOllama, backend: OllamaBackend,
) -> None:
    answer = await backend.run(BackendRequest("t-1", "the text", 10.0, output_schema=SCHEMA))
    assert json.loads(answer) == {"summary": "echo: the text", "lines": 1}
    [call] = fake.stats()["calls"]
    assert call["format"] == SCHEMA and call["outcome"] == "done"


@pytest.mark.anyio
async def test_an_answer_that_misses_the_schema_is_asked_for_once_more(
    fake: FakeOllama, backend: OllamaBackend,
) -> None:
    fake.configure(misfit_next=1)
    answer = await backend.run(BackendRequest("t-1", "again", 10.0, output_schema=SCHEMA))
    assert json.loads(answer)["summary"] == "echo: again"
    assert [c["format"] for c in fake.stats()["calls"]] == [SCHEMA, SCHEMA]


@pytest.mark.anyio
async def test_two_misfits_fail_the_task_saying_where_the_answer_misses(
    fake: FakeOllama, backend: OllamaBackend,
) -> None:
    fake.configure(misfit_next=2)
    with pytest.raises(PermanentBackendError) as caught:
        await backend.run(BackendRequest("t-1", "x", 10.0, output_schema=SCHEMA))
    assert caught.value.kind == "schema_mismatch"
    assert "did not fit output_schema, twice" in str(caught.value)
    assert "is not of type 'object'" in str(caught.value)
    assert fake.stats()["requests"] == 2


# -- the reply's framing, as the client reads it off the socket ---------------------------------

_FINAL = json.dumps({"message": {"role": "assistant", "content": "hi"}, "done": True}).encode()


def _run_blocking(url: str, times: int = 2) -> list[str]:
    backend = OllamaBackend(url, MODEL)
    try:
        return [backend.run_blocking(request(), Abort()) for _ in range(times)]
    finally:
        backend.close()


@pytest.mark.parametrize(("reply", "close_after", "kept"), [
    # a Content-Length body (an Ollama that does not stream): kept alive
    (b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (len(_FINAL) + 1) + _FINAL + b"\n",
     False, True),
    # chunks with extensions, and trailers after the last one
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
     + b"%X;ext=1\r\n" % (len(_FINAL) + 1) + _FINAL + b"\n\r\n0\r\nX-Trailer: t\r\n\r\n",
     False, True),
    # no length, no chunks: the body ends with the connection
    (b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n\r\n" + _FINAL + b"\n",
     True, False),
    # HTTP/1.0 without keep-alive: a new connection each time
    (b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n" % (len(_FINAL) + 1) + _FINAL + b"\n",
     True, False),
    # a 100 Continue before the reply is skipped
    (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n"
     % (len(_FINAL) + 1) + _FINAL + b"\n", False, True),
], ids=["content-length", "chunk-extensions-and-trailers", "until-close", "http-1.0",
        "100-continue"])
def test_every_framing_of_a_reply_is_read_and_keep_alive_follows_it(
    reply: bytes, close_after: bool, kept: bool,
) -> None:
    with scripted(reply, close_after_reply=close_after) as server:
        assert _run_blocking(server.url) == ["hi", "hi"]
    assert server.requests == 2
    assert server.connections == (1 if kept else 2)


@pytest.mark.parametrize(("reply", "reason"), [
    (b"HTTX/1.1 200 OK\r\n\r\n", "not an HTTP/1.x status line"),
    (b"HTTP/1.1 200 OK\r\nBad Header\r\n\r\n", "malformed header line"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\nhello", "bad Content-Length"),
    (b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n", "longer than"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "bad chunk size"),
])
def test_a_reply_that_breaks_http_framing_is_a_malformed_error_naming_what(
    reply: bytes, reason: str,
) -> None:
    with scripted(reply, close_after_reply=True) as server:
        backend = OllamaBackend(server.url, MODEL)
        with pytest.raises(PermanentBackendError) as caught:
            backend.run_blocking(request(), Abort())
        backend.close()
    assert caught.value.kind == "malformed"
    assert reason in str(caught.value)


def test_calls_from_two_threads_at_once_each_get_a_connection(fake: FakeOllama) -> None:
    fake.configure(latency_s=0.3)
    backend = OllamaBackend(fake.url, MODEL)
    answers: list[str] = []
    threads = [threading.Thread(target=lambda i=i: answers.append(
        backend.run_blocking(request(f"t{i}"), Abort()))) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    backend.close()
    assert sorted(answers) == ["echo: t0", "echo: t1"]
    assert fake.stats()["max_in_flight"] == 2  # both requests were at the server at once
