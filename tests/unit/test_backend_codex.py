"""CodexBackend running the fake ``codex`` executable as a real child process."""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from koubou_mcp.backends import (
    MAX_RESULT_CHARS,
    BackendRequest,
    CodexBackend,
    GenerationProgress,
    PermanentBackendError,
)
from koubou_mcp.backends.codex import STDERR_EXCERPT_CHARS, _Tail, oss_base_url
from tests.fakes import read_pidfile, read_records
from tests.fakes.ollama_server import FakeOllama
from tests.support.env import fake_codex_env
from tests.support.paths import FAKE_CODEX_PATH, FAKES_DIR
from tests.support.procfs import pid_alive
from tests.support.waiting import async_wait_until, wait_until

MODEL = "gpt-oss:20b"
OLLAMA_URL = "http://127.0.0.1:11434/"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Harness:
    """Builds backends running the fake codex with a private record file, pidfile and HOME."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.record = tmp_path / "record.jsonl"
        self.pidfile = tmp_path / "pids.json"
        self.home = tmp_path / "home"
        self.home.mkdir()
        self.workdir = tmp_path / "work"
        self.workdir.mkdir()
        self.outputs = tmp_path / "outputs"  # where the backend puts its -o files
        self.outputs.mkdir()
        self.backends: list[CodexBackend] = []

    def env(self, mode: str = "ok", **extra: str) -> dict[str, str]:
        return fake_codex_env(
            HOME=str(self.home),
            FAKE_CODEX_MODE=mode,
            FAKE_CODEX_RECORD=str(self.record),
            FAKE_CODEX_PIDFILE=str(self.pidfile),
            **extra,
        )

    def backend(
        self,
        mode: str = "ok",
        *,
        codex_bin: str | None = None,
        ollama_url: str = OLLAMA_URL,
        kill_grace_s: float = 1.0,
        **extra_env: str,
    ) -> CodexBackend:
        return CodexBackend(
            codex_bin if codex_bin is not None else str(FAKE_CODEX_PATH),
            MODEL,
            ollama_url,
            "workspace-write",
            str(self.workdir),
            env=self.env(mode, **extra_env),
            kill_grace_s=kill_grace_s,
            output_dir=str(self.outputs),
        )

    def records(self) -> list[dict[str, Any]]:
        return read_records(self.record)

    def pids(self) -> dict[str, int] | None:
        return read_pidfile(self.pidfile)


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    harness = Harness(tmp_path)
    yield harness
    # Whatever a test did, no fake codex it started may outlive it.
    pids = harness.pids()
    if pids:
        for pid in pids.values():
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)


def request(
    prompt: str = "write a haiku",
    timeout_s: float = 30.0,
    *,
    model: str | None = None,
    on_progress: Callable[[GenerationProgress], None] | None = None,
) -> BackendRequest:
    return BackendRequest(
        task_id="t-1", prompt=prompt, timeout_s=timeout_s, model=model, on_progress=on_progress
    )


# -- success ---------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_run_returns_what_codex_wrote_to_the_output_file(harness: Harness) -> None:
    assert await harness.backend().run(request("fix the bug")) == "codex: fix the bug"


@pytest.mark.anyio
async def test_codex_is_run_with_exactly_the_documented_arguments(harness: Harness) -> None:
    await harness.backend().run(request())
    [record] = harness.records()
    argv = record["argv"]
    outfile = argv[-2]
    assert record["argv0"] == str(FAKE_CODEX_PATH)
    assert argv == [
        "exec",
        "--oss",
        "--local-provider",
        "ollama",
        "-m",
        MODEL,
        "--skip-git-repo-check",
        "--sandbox",
        "workspace-write",
        "--color",
        "never",
        "--json",
        "-C",
        str(harness.workdir),
        "-o",
        outfile,
        "-",
    ]


@pytest.mark.anyio
async def test_the_output_file_is_private_and_removed_afterwards(harness: Harness) -> None:
    await harness.backend().run(request())
    [record] = harness.records()
    outfile = record["argv"][-2]
    assert record["outfile_mode"] == 0o600
    assert not os.path.exists(outfile)


@pytest.mark.anyio
async def test_the_prompt_goes_to_stdin_and_never_onto_the_command_line(
    harness: Harness,
) -> None:
    token = uuid.uuid4().hex
    prompt = f"multi-line\n{token} with 'quotes' and unicode: 日本語"
    await harness.backend().run(request(prompt))
    [record] = harness.records()
    assert record["stdin"] == prompt
    assert not any(token in arg for arg in record["argv"])


@pytest.mark.anyio
async def test_codex_is_told_ollamas_openai_endpoint_without_a_double_slash(
    harness: Harness,
) -> None:
    await harness.backend(ollama_url="http://gpu-box:11434/").run(request())
    [record] = harness.records()
    assert record["env"]["CODEX_OSS_BASE_URL"] == "http://gpu-box:11434/v1"
    assert oss_base_url("http://gpu-box:11434/v1/") == "http://gpu-box:11434/v1"


@pytest.mark.anyio
async def test_codex_runs_in_a_session_of_its_own(harness: Harness) -> None:
    await harness.backend().run(request())
    [record] = harness.records()
    assert record["sid"] == record["pid"]
    assert record["pgid"] == record["pid"]
    assert record["sid"] != os.getsid(0)


@pytest.mark.anyio
async def test_the_env_really_reaches_codex_which_can_call_the_fake_ollama(
    harness: Harness,
) -> None:
    with FakeOllama(models=[MODEL]) as fake:
        backend = harness.backend(ollama_url=fake.url, FAKE_CODEX_OLLAMA="1")
        assert await backend.run(request("ping")) == "codex: echo: ping"
        assert fake.stats()["by_path"] == {"/v1/chat/completions": 1}


@pytest.mark.anyio
@pytest.mark.parametrize(
    "hostile",
    [
        "--help",
        '-c model="x"',
        "$(touch {canary})",
        "`touch {canary}`",
        "; rm -rf ~",
        "-o /etc/passwd",
        "x' ; touch {canary} ; echo '",
    ],
)
async def test_hostile_prompts_reach_codex_verbatim_and_run_nothing(harness: Harness, hostile: str) -> None:
    canary = Path(f"/tmp/pwned_{uuid.uuid4().hex}")
    keepsake = harness.home / "keepsake"
    keepsake.write_text("still here")
    prompt = hostile.format(canary=canary)
    try:
        result = await harness.backend().run(request(prompt))
        assert result == f"codex: {prompt}"
        [record] = harness.records()
        assert record["stdin"] == prompt
        assert record["argv"][-1] == "-"
        assert prompt not in record["argv"]
        assert not canary.exists()
        assert keepsake.read_text() == "still here"
    finally:
        canary.unlink(missing_ok=True)


@pytest.mark.anyio
async def test_a_bare_name_is_looked_up_on_the_path_of_the_given_env(harness: Harness) -> None:
    path = harness.env()["PATH"]
    backend = harness.backend(codex_bin="codex", PATH=f"{FAKES_DIR}{os.pathsep}{path}")
    assert backend.resolve_binary() == str(FAKE_CODEX_PATH)
    assert await backend.run(request("hi")) == "codex: hi"


@pytest.mark.anyio
async def test_an_empty_output_file_falls_back_to_what_codex_printed(harness: Harness) -> None:
    assert await harness.backend("stdout_only").run(request("hi")) == "codex: hi"


@pytest.mark.anyio
async def test_a_huge_output_file_is_cut_to_the_result_limit(harness: Harness) -> None:
    backend = harness.backend("huge", FAKE_CODEX_HUGE_CHARS=str(MAX_RESULT_CHARS + 123_456))
    result = await backend.run(request())
    assert result.startswith("codex: write a haiku")
    assert len(result) < MAX_RESULT_CHARS + 200
    assert "truncated" in result


@pytest.mark.anyio
async def test_huge_output_on_stdout_and_stderr_is_drained_and_only_a_tail_kept(
    harness: Harness,
) -> None:
    backend = harness.backend("noise", FAKE_CODEX_NOISE_BYTES=str(20 * 1024 * 1024))
    assert await backend.run(request("quiet please")) == "codex: quiet please"
    failing = harness.backend("noise", FAKE_CODEX_NOISE_BYTES=str(20 * 1024 * 1024), FAKE_CODEX_EXIT="5")
    with pytest.raises(PermanentBackendError) as caught:
        await failing.run(request())
    message = str(caught.value)
    assert caught.value.kind == "codex_exit"
    assert "END-OF-NOISE" in message  # the tail, not the head, is what is kept
    assert len(message) < STDERR_EXCERPT_CHARS + 200


def test_the_output_tail_keeps_only_the_last_bytes() -> None:
    tail = _Tail(limit=1000)
    for index in range(10_000):
        tail.feed(f"{index:08d}\n".encode())
    assert tail.total == 90_000
    assert len(tail.text()) == 1000
    assert tail.text().endswith("00009999\n")
    assert tail.kept == 1000


# -- errors ----------------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("codex_bin", ["codex-not-installed-anywhere", "/nonexistent/bin/codex"])
async def test_a_missing_codex_is_permanent_and_says_how_to_install_it(
    harness: Harness, codex_bin: str
) -> None:
    with pytest.raises(PermanentBackendError) as caught:
        await harness.backend(codex_bin=codex_bin).run(request())
    assert caught.value.kind == "codex_missing"
    assert "npm i -g @openai/codex" in str(caught.value)
    assert "KOUBOU_CODEX_BIN" in str(caught.value)


@pytest.mark.anyio
async def test_a_file_that_is_not_executable_counts_as_missing(harness: Harness) -> None:
    plain = harness.tmp_path / "codex"
    plain.write_text("#!/bin/sh\n")
    plain.chmod(0o644)
    with pytest.raises(PermanentBackendError) as caught:
        await harness.backend(codex_bin=str(plain)).run(request())
    assert caught.value.kind == "codex_missing"


@pytest.mark.anyio
async def test_a_missing_workdir_is_permanent(harness: Harness) -> None:
    backend = harness.backend()
    backend.workdir = str(harness.tmp_path / "gone")
    with pytest.raises(PermanentBackendError) as caught:
        await backend.run(request())
    assert caught.value.kind == "workdir_missing"
    assert harness.records() == []


@pytest.mark.anyio
async def test_a_non_zero_exit_is_permanent_with_the_code_and_stderr(harness: Harness) -> None:
    with pytest.raises(PermanentBackendError) as caught:
        await harness.backend("fail").run(request())
    assert caught.value.kind == "codex_exit"
    assert "code 3" in str(caught.value)
    assert "the model refused to cooperate" in str(caught.value)


@pytest.mark.anyio
async def test_the_error_codex_reported_in_its_event_stream_leads_the_message(
    harness: Harness,
) -> None:
    with pytest.raises(PermanentBackendError) as caught:
        await harness.backend("fail").run(request())
    assert str(caught.value).startswith(
        "codex exited with code 3: fake codex failure: the model refused to cooperate"
    )


@pytest.mark.anyio
@pytest.mark.parametrize(("name", "expected"), [("KILL", "SIGKILL"), ("TERM", "SIGTERM")])
async def test_death_by_signal_is_permanent_and_names_the_signal(
    harness: Harness, name: str, expected: str
) -> None:
    with pytest.raises(PermanentBackendError) as caught:
        await harness.backend("signal", FAKE_CODEX_SIGNAL=name).run(request())
    assert caught.value.kind == "codex_signal"
    assert expected in str(caught.value)


@pytest.mark.anyio
async def test_success_without_any_output_is_malformed(harness: Harness) -> None:
    with pytest.raises(PermanentBackendError) as caught:
        await harness.backend("empty").run(request())
    assert caught.value.kind == "malformed"


@pytest.mark.anyio
@pytest.mark.parametrize("mode", ["ok", "fail", "signal", "empty"])
async def test_no_output_file_is_left_behind_whatever_the_outcome(harness: Harness, mode: str) -> None:
    try:
        await harness.backend(mode).run(request())
    except PermanentBackendError:
        pass
    [record] = harness.records()
    assert Path(record["argv"][-2]).parent == harness.outputs
    assert list(harness.outputs.iterdir()) == []


# -- the event stream: progress, model ---------------------------------------------------------


@pytest.mark.anyio
async def test_progress_follows_codexs_steps_and_its_last_message(harness: Harness) -> None:
    reports: list[GenerationProgress] = []
    backend = harness.backend(FAKE_CODEX_STEPS="3")
    assert await backend.run(request("refactor", on_progress=reports.append)) == "codex: refactor"
    assert [r.steps for r in reports] == sorted(r.steps for r in reports)
    assert reports[0].first_token_s is not None
    last = reports[-1]
    assert last.done
    assert last.steps == 4  # three commands and the answer
    assert last.last_message == last.text == "codex: refactor"
    assert last.tokens == 2  # turn.completed's output_tokens


@pytest.mark.anyio
async def test_a_cancelled_run_leaves_the_last_message_it_had_in_the_last_report(
    harness: Harness,
) -> None:
    reports: list[GenerationProgress] = []
    backend = harness.backend("hang")
    async with anyio.create_task_group() as tg:
        tg.start_soon(backend.run, request(on_progress=reports.append))
        await async_wait_until(lambda: bool(reports) and reports[-1].last_message is not None, timeout=20)
        tg.cancel_scope.cancel()
    last = reports[-1]
    assert (last.done, last.steps, last.last_message) == (False, 2, "working on it")
    pids = harness.pids()
    assert pids is not None
    wait_until(lambda: _tree_is_gone(pids))


@pytest.mark.anyio
async def test_the_answer_comes_from_the_event_stream_when_the_output_file_is_empty(
    harness: Harness,
) -> None:
    assert await harness.backend("stdout_only").run(request("hi")) == "codex: hi"


@pytest.mark.anyio
async def test_a_request_can_run_codex_on_another_model(harness: Harness) -> None:
    await harness.backend().run(request(model="qwen3-coder:30b"))
    [record] = harness.records()
    argv = record["argv"]
    assert argv[argv.index("-m") + 1] == "qwen3-coder:30b"


# -- timeouts and cancellation ---------------------------------------------------------------


async def _timeout_once_running(harness: Harness, backend: CodexBackend) -> None:
    """Run a hanging codex under a deadline that passes once its whole tree is up."""
    with anyio.fail_after(30) as scope:

        async def expire_when_started() -> None:
            await async_wait_until(lambda: harness.pids() is not None, timeout=20)
            scope.deadline = anyio.current_time() + 0.05

        async with anyio.create_task_group() as tg:
            tg.start_soon(expire_when_started)
            await backend.run(request())


def _tree_is_gone(pids: dict[str, int]) -> bool:
    return not any(pid_alive(pid) for pid in pids.values())


@pytest.mark.anyio
async def test_a_timeout_kills_the_whole_process_tree(harness: Harness) -> None:
    with pytest.raises(TimeoutError):
        await _timeout_once_running(harness, harness.backend("hang"))
    pids = harness.pids()
    assert pids is not None
    assert not pid_alive(pids["parent"])  # reaped before the timeout propagated
    wait_until(lambda: _tree_is_gone(pids))
    assert list(harness.outputs.iterdir()) == []


@pytest.mark.anyio
async def test_a_tree_that_ignores_sigterm_is_killed_after_the_grace(harness: Harness) -> None:
    backend = harness.backend("hang", kill_grace_s=0.2, FAKE_CODEX_IGNORE_TERM="1")
    with pytest.raises(TimeoutError):
        await _timeout_once_running(harness, backend)
    pids = harness.pids()
    assert pids is not None
    wait_until(lambda: _tree_is_gone(pids))


@pytest.mark.anyio
async def test_cancelling_the_call_kills_the_whole_process_tree(harness: Harness) -> None:
    backend = harness.backend("hang")
    finished = False

    async def run() -> None:
        nonlocal finished
        try:
            await backend.run(request())
        finally:
            finished = True

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        await async_wait_until(lambda: harness.pids() is not None, timeout=20)
        tg.cancel_scope.cancel()
    assert finished
    pids = harness.pids()
    assert pids is not None
    assert not pid_alive(pids["parent"])
    wait_until(lambda: _tree_is_gone(pids))
    assert list(harness.outputs.iterdir()) == []


# -- probe ------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_probe_reports_where_codex_is_and_its_version(harness: Harness) -> None:
    assert await harness.backend().probe() == {
        "found": True,
        "path": str(FAKE_CODEX_PATH),
        "version": "codex-cli 0.0.0-fake",
        "error": None,
    }


@pytest.mark.anyio
async def test_probe_of_a_missing_codex_says_how_to_install_it(harness: Harness) -> None:
    result = await harness.backend(codex_bin="codex-not-installed-anywhere").probe()
    assert result["found"] is False
    assert result["path"] is None
    assert "npm i -g @openai/codex" in result["error"]


@pytest.mark.anyio
async def test_a_task_with_its_own_workdir_runs_codex_there(harness: Harness) -> None:
    project = harness.tmp_path / "project"
    project.mkdir()
    await harness.backend().run(BackendRequest("t-1", "look around", 30.0,
                                               workdir=str(project)))
    [record] = harness.records()
    argv = record["argv"]
    assert argv[argv.index("-C") + 1] == str(project)
    assert record["cwd"] == str(project)


@pytest.mark.anyio
async def test_a_task_whose_workdir_is_gone_fails_before_codex_starts(harness: Harness) -> None:
    with pytest.raises(PermanentBackendError) as caught:
        await harness.backend().run(BackendRequest("t-1", "x", 30.0,
                                                   workdir=str(harness.tmp_path / "gone")))
    assert caught.value.kind == "workdir_missing" and "no longer exists" in str(caught.value)
    assert harness.records() == []
