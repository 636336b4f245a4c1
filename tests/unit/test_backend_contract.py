"""The contract every backend keeps, run over each backend against its stand-in.

A backend answers a prompt; honours the worker's timeout (an anyio deadline) and a cancel
at once; cleans up what it started; and reports failures only as BackendError.
"""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import pytest

from koubou_mcp.backends import (
    Backend,
    BackendError,
    BackendRequest,
    CodexBackend,
    GenerationProgress,
    OllamaBackend,
)
from tests.fakes import read_pidfile, read_records
from tests.fakes.ollama_server import FakeOllama
from tests.support.env import fake_codex_env
from tests.support.paths import FAKE_CODEX_PATH
from tests.support.procfs import pid_alive
from tests.support.waiting import async_wait_until, wait_until

MODEL = "gpt-oss:20b"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@dataclass
class Case:
    """One backend wired to its stand-in, with the hooks the shared tests need."""

    name: str
    make: Callable[[str], Backend]  # mode ("ok" | "hang" | "fail") -> backend
    answer: Callable[[str], str]  # prompt -> expected result
    started: Callable[[], bool]  # a hanging call has reached the stand-in
    cleaned_up: Callable[[], bool]  # nothing the call started is left running
    models_used: Callable[[], list[str]]  # the model of each call the stand-in saw
    backends: list[Backend] = field(default_factory=list)

    def backend(self, mode: str = "ok") -> Backend:
        backend = self.make(mode)
        self.backends.append(backend)
        return backend


def _ollama_case(fake: FakeOllama) -> Case:
    def make(mode: str) -> Backend:
        fake.configure(mode={"ok": "ok", "hang": "hang", "fail": "error500"}[mode])
        return OllamaBackend(fake.url, MODEL)

    return Case(
        name="ollama",
        make=make,
        answer=lambda prompt: f"echo: {prompt}",
        started=lambda: fake.stats()["active"] >= 1,
        # the stream is closed: the stand-in noticed and freed its slot
        cleaned_up=lambda: fake.stats()["active"] == 0 and fake.stats()["cancelled"] >= 1,
        models_used=lambda: [call["model"] for call in fake.stats()["calls"]],
    )


def _codex_case(tmp_path: Path) -> Case:
    pidfile = tmp_path / "pids.json"
    record = tmp_path / "record.jsonl"

    def make(mode: str) -> Backend:
        env = fake_codex_env(
            FAKE_CODEX_MODE=mode, FAKE_CODEX_PIDFILE=str(pidfile), FAKE_CODEX_RECORD=str(record)
        )
        return CodexBackend(
            str(FAKE_CODEX_PATH),
            MODEL,
            "http://127.0.0.1:11434",
            "read-only",
            str(tmp_path),
            env=env,
        )

    def cleaned_up() -> bool:
        pids = read_pidfile(pidfile)
        return pids is not None and not any(pid_alive(pid) for pid in pids.values())

    return Case(
        name="codex",
        make=make,
        answer=lambda prompt: f"codex: {prompt}",
        started=lambda: pidfile.exists(),
        cleaned_up=cleaned_up,
        models_used=lambda: [r["argv"][r["argv"].index("-m") + 1] for r in read_records(record)],
    )


@pytest.fixture(params=["ollama", "codex"])
async def case(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Case]:
    if request.param == "ollama":
        with FakeOllama(models=[MODEL, "llama3.2"]) as fake:
            case = _ollama_case(fake)
            yield case
            for backend in case.backends:
                await backend.aclose()
    else:
        case = _codex_case(tmp_path)
        yield case
        for backend in case.backends:
            await backend.aclose()
        pids = read_pidfile(tmp_path / "pids.json") or {}
        for pid in pids.values():
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)


def request(
    prompt: str = "summarise the plan",
    timeout_s: float = 30.0,
    *,
    model: str | None = None,
    on_progress: Callable[[GenerationProgress], None] | None = None,
) -> BackendRequest:
    return BackendRequest(
        task_id="t-contract", prompt=prompt, timeout_s=timeout_s, model=model,
        on_progress=on_progress,
    )


@pytest.mark.anyio
async def test_a_backend_returns_the_answer_to_the_prompt(case: Case) -> None:
    backend = case.backend()
    assert await backend.run(request("2+2?")) == case.answer("2+2?")


@pytest.mark.anyio
async def test_a_backend_has_a_stable_name(case: Case) -> None:
    assert case.backend().name == case.name


@pytest.mark.anyio
async def test_a_backend_reports_failure_as_a_backend_error(case: Case) -> None:
    with pytest.raises(BackendError) as caught:
        await case.backend("fail").run(request())
    assert caught.value.kind
    assert isinstance(caught.value.transient, bool)


@pytest.mark.anyio
async def test_a_backend_stops_when_the_workers_deadline_passes(case: Case) -> None:
    backend = case.backend("hang")
    with pytest.raises(TimeoutError):
        with anyio.fail_after(30) as scope:
            async with anyio.create_task_group() as tg:

                async def expire_once_started() -> None:
                    await async_wait_until(case.started, timeout=20)
                    scope.deadline = anyio.current_time() + 0.05

                tg.start_soon(expire_once_started)
                await backend.run(request())
    wait_until(case.cleaned_up)


@pytest.mark.anyio
async def test_a_backend_stops_at_once_when_cancelled(case: Case) -> None:
    backend = case.backend("hang")
    outcome: list[str] = []

    async def run() -> None:
        try:
            await backend.run(request())
            outcome.append("returned")
        except anyio.get_cancelled_exc_class():
            outcome.append("cancelled")
            raise

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        await async_wait_until(case.started, timeout=20)
        tg.cancel_scope.cancel()
    assert outcome == ["cancelled"]
    wait_until(case.cleaned_up)


@pytest.mark.anyio
async def test_a_backend_can_be_closed_twice(case: Case) -> None:
    backend = case.backend()
    await backend.aclose()
    await backend.aclose()


@pytest.mark.anyio
async def test_a_backend_reports_progress_ending_in_a_done_report_with_the_answer(
    case: Case,
) -> None:
    reports: list[GenerationProgress] = []
    result = await case.backend().run(request("2+2?", on_progress=reports.append))
    assert reports, "no progress was reported"
    last = reports[-1]
    assert last.done and last.text == result == case.answer("2+2?")
    assert last.first_token_s is not None and last.elapsed_s >= last.first_token_s


@pytest.mark.anyio
async def test_a_cancelled_backend_reports_its_progress_before_it_stops(case: Case) -> None:
    reports: list[GenerationProgress] = []
    backend = case.backend("hang")
    async with anyio.create_task_group() as tg:
        tg.start_soon(backend.run, request(on_progress=reports.append))
        await async_wait_until(case.started, timeout=20)
        tg.cancel_scope.cancel()
    assert reports and not reports[-1].done
    wait_until(case.cleaned_up)


@pytest.mark.anyio
async def test_a_request_runs_on_the_model_it_names(case: Case) -> None:
    backend = case.backend()
    await backend.run(request())
    await backend.run(request(model="llama3.2"))
    assert case.models_used() == [MODEL, "llama3.2"]
