"""Run a coding task with the Codex CLI (``codex exec --oss --json``) against a local Ollama.

The prompt goes to the child's stdin, never onto its command line and never through a shell,
so nothing in it can become an option or a command. The child runs in its own session; when
the call is cancelled (task cancelled, timeout) the whole process group is terminated, then
killed, and reaped before the cancellation goes on. Output is drained as it comes and only a
bounded tail is kept, so a chatty child cannot exhaust memory. Its JSONL event stream on stdout
(``--json``) is followed for progress (``codex_events``); the answer is the ``-o`` file.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import tempfile
from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from pathlib import Path
from subprocess import DEVNULL, PIPE
from typing import Any

import anyio
import anyio.abc

from koubou_mcp.backends.base import (
    MAX_RESULT_CHARS,
    Abort,
    BackendError,
    BackendRequest,
    PermanentBackendError,
    TransientBackendError,
    bound_result,
    run_coroutine_blocking,
)
from koubou_mcp.backends.codex_events import CodexEvents
from koubou_mcp.config import make_private_dir
from koubou_mcp.processes import GroupLedger, is_subreaper, kill_adopted

#: How much of stderr goes into a ``codex_exit`` error message.
STDERR_EXCERPT_CHARS = 2000
#: Bytes of stderr / stdout kept in memory while the child runs (the rest is drained and dropped).
STDERR_TAIL_BYTES = 64 * 1024
STDOUT_TAIL_BYTES = 1024 * 1024
#: Time given to drain what is left in the pipes once the child has exited.
_DRAIN_GRACE_S = 2.0
#: Upper bound on waiting for a killed child to be reaped (it cannot ignore SIGKILL).
_REAP_TIMEOUT_S = 5.0
_READ_CHUNK = 64 * 1024

#: The children this process started and has not reaped yet: a subreaper's other children
#: are orphans a finished run left behind (``processes.kill_adopted``).
_STARTED: set[int] = set()

_INSTALL_HINT = "install it with `npm i -g @openai/codex`, or set KOUBOU_CODEX_BIN to its path"


class _Tail:
    """The last ``limit`` bytes of a stream, plus how many bytes went by in total."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.total = 0
        self._buffer = bytearray()

    def feed(self, data: bytes) -> None:
        self.total += len(data)
        self._buffer += data
        if len(self._buffer) > 2 * self.limit:
            del self._buffer[: len(self._buffer) - self.limit]

    @property
    def kept(self) -> int:
        return min(len(self._buffer), self.limit)

    def text(self) -> str:
        return bytes(self._buffer[-self.limit :]).decode("utf-8", errors="replace")


class CodexBackend:
    """Runs a prompt through ``codex exec`` using a model served by Ollama."""

    name = "codex"

    def __init__(
        self,
        codex_bin: str,
        model: str,
        ollama_url: str,
        sandbox: str,
        workdir: str,
        *,
        env: Mapping[str, str],
        kill_grace_s: float = 1.0,
        probe_timeout_s: float = 10.0,
        output_dir: str | None = None,
        groups_dir: str | None = None,
    ) -> None:
        self.codex_bin = codex_bin
        self.model = model
        self.ollama_url = ollama_url
        self.sandbox = sandbox
        self.workdir = workdir
        self.kill_grace_s = kill_grace_s
        self.probe_timeout_s = probe_timeout_s
        self.output_dir = output_dir  # where the -o files go (None: the system temp dir)
        # Where each running Codex process group is noted (``processes.GroupLedger``), so
        # whoever reaps a worker that was SIGKILLed (its own session dies with it, Codex's does
        # not) can kill the orphaned tree too.
        self.groups_dir = groups_dir
        # Exactly what the caller allows (``config.codex_environment``): the child runs
        # commands a model wrote, so it gets no more than that.
        self._env = dict(env)
        self._env["CODEX_OSS_BASE_URL"] = oss_base_url(ollama_url)

    def command(self, codex_path: str, outfile: str, model: str | None = None,
                workdir: str | None = None) -> list[str]:
        """The exact argv of one run (the prompt is not in it: it goes to stdin)."""
        return [
            codex_path,
            "exec",
            "--oss",
            "--local-provider",
            "ollama",
            "-m",
            model or self.model,
            "--skip-git-repo-check",
            "--sandbox",
            self.sandbox,
            "--color",
            "never",
            "--json",
            "-C",
            workdir or self.workdir,
            "-o",
            outfile,
            "-",
        ]

    async def run(self, request: BackendRequest) -> str:
        """Run ``codex exec`` with the prompt on stdin; return its last message (``-o`` file)."""
        codex_path = self.resolve_binary()
        workdir = request.workdir or self.workdir
        if not os.path.isdir(workdir):
            raise PermanentBackendError(
                f"the task's working directory {workdir!r} no longer exists (Codex runs in it)",
                kind="workdir_missing",
            )
        events = CodexEvents(request.on_progress)
        try:
            return await self._run(codex_path, request, events)
        except BaseException:
            events.report(force=True)  # the caller keeps the last message so far
            raise

    async def _run(self, codex_path: str, request: BackendRequest, events: CodexEvents) -> str:
        if self.output_dir is not None:
            make_private_dir(Path(self.output_dir))
        # mode 0600, a fresh name each run
        fd, outfile = tempfile.mkstemp(prefix="koubou-codex-", suffix=".txt", dir=self.output_dir)
        os.close(fd)
        try:
            returncode, stdout, stderr = await _run_process(
                self.command(codex_path, outfile, request.model, request.workdir),
                stdin_data=request.prompt.encode("utf-8", errors="replace"),
                env=self._env,
                kill_grace_s=self.kill_grace_s,
                groups_dir=self.groups_dir,
                on_stdout=events.feed_bytes,
            )
            reported = f": {events.error}" if events.error else ""
            if returncode < 0:
                raise PermanentBackendError(
                    f"codex was killed by {_signal_name(-returncode)}{reported}{_stderr_suffix(stderr)}",
                    kind="codex_signal",
                )
            if returncode != 0:
                raise PermanentBackendError(
                    f"codex exited with code {returncode}{reported}{_stderr_suffix(stderr)}",
                    kind="codex_exit",
                )
            result = await anyio.to_thread.run_sync(_read_result_file, outfile)
        finally:
            with suppress(FileNotFoundError):
                os.unlink(outfile)
        if result:
            return result
        if events.message:  # no -o file, but the event stream had the last message
            return bound_result(events.message)
        # an older Codex without --json events prints its answer on stdout
        fallback = "" if events.seen else stdout.text().strip()
        if fallback:
            if stdout.total > stdout.kept:
                cut = stdout.total - stdout.kept
                fallback = f"[koubou-mcp: first {cut} bytes of codex output dropped]\n{fallback}"
            return bound_result(fallback)
        raise PermanentBackendError(
            "codex exited successfully but wrote no last message (-o file empty, no agent "
            f"message among its events, nothing else on stdout){_stderr_suffix(stderr)}",
            kind="malformed",
        )

    async def probe(self) -> dict[str, Any]:
        """Health check: is Codex installed, where, which version.

        Returns ``{"found", "path", "version", "error"}`` and never raises a backend error.
        """
        result: dict[str, Any] = {"found": False, "path": None, "version": None, "error": None}
        try:
            path = self.resolve_binary()
        except PermanentBackendError as exc:
            result["error"] = str(exc)
            return result
        result["found"] = True
        result["path"] = path
        try:
            with anyio.fail_after(self.probe_timeout_s):
                returncode, stdout, stderr = await _run_process(
                    [path, "--version"], stdin_data=None, env=self._env, kill_grace_s=0.2
                )
        except TimeoutError:
            result["error"] = f"`{path} --version` did not finish within {self.probe_timeout_s}s"
            return result
        except BackendError as exc:
            result["error"] = str(exc)
            return result
        lines = stdout.text().strip().splitlines()
        if returncode == 0 and lines:
            result["version"] = lines[0].strip()
        else:
            result["error"] = f"`{path} --version` exited with code {returncode}{_stderr_suffix(stderr)}"
        return result

    def run_blocking(self, request: BackendRequest, abort: Abort) -> str:
        """``run`` on an event loop of its own; ``abort.fire()`` stops the child's group."""
        return run_coroutine_blocking(self.run, request, abort)

    def close(self) -> None:
        """Nothing to release: every run cleans up its own child process."""

    async def aclose(self) -> None:
        """Nothing to release: every run cleans up its own child process."""

    def resolve_binary(self) -> str:
        """The absolute path of the Codex executable, or a ``codex_missing`` error."""
        candidate = self.codex_bin
        if os.sep in candidate or (os.altsep and os.altsep in candidate):
            path = os.path.abspath(os.path.expanduser(candidate))
            if os.path.isfile(path) and os.access(path, os.X_OK):
                return path
            raise PermanentBackendError(
                f"Codex CLI not found or not executable at {path!r}; {_INSTALL_HINT}",
                kind="codex_missing",
            )
        found = shutil.which(candidate, path=self._env.get("PATH", os.defpath))
        if found is None:
            raise PermanentBackendError(
                f"Codex CLI {candidate!r} not found on PATH; {_INSTALL_HINT}",
                kind="codex_missing",
            )
        return os.path.abspath(found)


def oss_base_url(ollama_url: str) -> str:
    """Ollama's OpenAI-compatible endpoint, as Codex expects it in ``CODEX_OSS_BASE_URL``."""
    base = ollama_url.rstrip("/")
    return base if base.endswith("/v1") else f"{base}/v1"


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _stderr_suffix(stderr: _Tail) -> str:
    text = stderr.text().strip()
    if not text:
        return ""
    if len(text) > STDERR_EXCERPT_CHARS:
        text = "…" + text[-STDERR_EXCERPT_CHARS:]
    return f"; stderr:\n{text}"


def _read_result_file(path: str, limit: int = MAX_RESULT_CHARS) -> str:
    """The ``-o`` file's text, reading no more than needed to return ``limit`` characters."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as handle:
            data = handle.read(4 * limit)  # UTF-8 needs at most 4 bytes per character
    except FileNotFoundError:
        return ""
    text = data.decode("utf-8", errors="replace")
    if size <= len(data):
        return bound_result(text, limit)
    return text[:limit] + (
        f"\n\n[koubou-mcp: output truncated, the result file had {size} bytes; "
        f"kept the first {limit} characters]"
    )


async def _run_process(
    argv: Sequence[str],
    *,
    stdin_data: bytes | None,
    env: Mapping[str, str],
    kill_grace_s: float,
    groups_dir: str | None = None,
    on_stdout: Callable[[bytes], None] | None = None,
) -> tuple[int, _Tail, _Tail]:
    """Run ``argv`` in a new session, feeding ``stdin_data`` and keeping tails of its output.

    Returns ``(returncode, stdout_tail, stderr_tail)``; a negative code means a signal. On
    cancellation the whole process group is terminated, killed after ``kill_grace_s``, and
    reaped (shielded) before the cancellation propagates.
    """
    stdout = _Tail(STDOUT_TAIL_BYTES)
    stderr = _Tail(STDERR_TAIL_BYTES)
    try:
        # Shielded so a cancellation cannot land between the fork and our owning the handle.
        with anyio.CancelScope(shield=True):
            process = await anyio.open_process(
                list(argv),
                stdin=PIPE if stdin_data is not None else DEVNULL,
                stdout=PIPE,
                stderr=PIPE,
                env=env,
                start_new_session=True,
            )
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.EACCES, errno.ENOEXEC, errno.EISDIR):
            raise PermanentBackendError(
                f"cannot start {argv[0]!r}: {exc}; {_INSTALL_HINT}", kind="codex_missing"
            ) from exc
        raise TransientBackendError(f"cannot start {argv[0]!r}: {exc}", kind="spawn_failed") from exc
    _STARTED.add(process.pid)
    ledger = GroupLedger(Path(groups_dir)) if groups_dir is not None else None
    noted = ledger is not None and ledger.record(process.pid)
    try:
        returncode = await _communicate(process, stdin_data, stdout, stderr, on_stdout)
    finally:
        with anyio.CancelScope(shield=True):
            await _stop_process_group(process, kill_grace_s)
            _STARTED.discard(process.pid)
            if is_subreaper():
                # what left the group (setsid) and lost its parent came to us: kill it too
                await anyio.to_thread.run_sync(kill_adopted, frozenset(_STARTED))
        if ledger is not None and noted:
            ledger.forget(process.pid)
    return returncode, stdout, stderr


async def _communicate(
    process: anyio.abc.Process,
    stdin_data: bytes | None,
    stdout: _Tail,
    stderr: _Tail,
    on_stdout: Callable[[bytes], None] | None = None,
) -> int:
    """Feed stdin and drain both output pipes until the child exits; return its exit code."""
    drained_out = anyio.Event()
    drained_err = anyio.Event()
    async with anyio.create_task_group() as tg:
        assert process.stdout is not None and process.stderr is not None
        tg.start_soon(_drain, process.stdout, stdout, drained_out, on_stdout)
        tg.start_soon(_drain, process.stderr, stderr, drained_err)
        if stdin_data is not None and process.stdin is not None:
            tg.start_soon(_feed, process.stdin, stdin_data)
        returncode = await _wait_for_exit(process)
        # Anything the child left behind in its group (and holding the pipes open) goes now.
        _signal_group(process.pid, signal.SIGKILL)
        with anyio.move_on_after(_DRAIN_GRACE_S):
            await drained_out.wait()
            await drained_err.wait()
        tg.cancel_scope.cancel()
    return returncode


async def _wait_for_exit(process: anyio.abc.Process) -> int:
    """Wait until the child itself exits.

    Polls ``returncode`` instead of awaiting ``wait()``: on asyncio, ``wait()`` may also wait
    for every pipe to close (CPython gh-119710), which a grandchild holding them would delay.
    """
    delay = 0.005
    while (code := process.returncode) is None:
        await anyio.sleep(delay)
        delay = min(delay * 2, 0.05)
    return code


async def _feed(stream: anyio.abc.ByteSendStream, data: bytes) -> None:
    try:
        if data:
            await stream.send(data)
    except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
        pass  # the child stopped reading; its exit status tells the story
    finally:
        with suppress(anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            await stream.aclose()


async def _drain(
    stream: anyio.abc.ByteReceiveStream,
    tail: _Tail,
    done: anyio.Event,
    on_data: Callable[[bytes], None] | None = None,
) -> None:
    try:
        while True:
            data = await stream.receive(_READ_CHUNK)
            tail.feed(data)
            if on_data is not None:
                on_data(data)
    except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
        pass
    finally:
        done.set()


def _signal_group(pgid: int, signum: int) -> None:
    """Send ``signum`` to a process group; a group that is already gone is fine."""
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


async def _stop_process_group(process: anyio.abc.Process, kill_grace_s: float) -> None:
    """Terminate the child's whole group, force it after the grace, close pipes, reap.

    Must run shielded. Safe to call when the child has already exited (then it only kills
    what the child left behind).
    """
    if process.returncode is None:
        _signal_group(process.pid, signal.SIGTERM)
        with anyio.move_on_after(kill_grace_s):
            await _wait_for_exit(process)
    _signal_group(process.pid, signal.SIGKILL)
    with anyio.move_on_after(_REAP_TIMEOUT_S):
        await process.aclose()  # closes our pipe ends and reaps the child
