"""Starting and always stopping the real processes tests use (workers, pools, the CLI)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

from koubou_mcp.config import Settings
from tests.support.env import child_env
from tests.support.paths import REPO_ROOT
from tests.support.procfs import pid_alive
from tests.support.waiting import wait_until


def koubou_command() -> str:
    """The installed ``koubou-mcp`` console script (what Claude Code runs)."""
    beside = Path(sys.executable).parent / "koubou-mcp"
    found = str(beside) if beside.exists() else shutil.which("koubou-mcp")
    if not found:
        raise RuntimeError("the koubou-mcp command is not installed (pip install -e .)")
    return found


class Processes:
    """Every process a test starts, killed (with its process group) when the test ends."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen[bytes]] = []

    def worker(self, settings: Settings, worker_id: str, extra_env: Mapping[str, str] | None = None,
               log: Path | None = None) -> subprocess.Popen[bytes]:
        env = child_env(settings, {"WORKER_ID": worker_id, **(extra_env or {})})
        out = open(log or settings.home / f"{worker_id}.stderr", "ab")  # noqa: SIM115
        with out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "koubou_mcp", "worker"], env=env, stdin=subprocess.DEVNULL,
                stdout=out, stderr=out, start_new_session=True,
            )
        self.started.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in self.started:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)


@contextlib.contextmanager
def processes() -> Iterator[Processes]:
    procs = Processes()
    try:
        yield procs
    finally:
        procs.stop_all()


class PoolProcesses:
    """``koubou-mcp pool`` processes started by a test (``python -m koubou_mcp pool``); each
    gets SIGTERM, then SIGKILL of its whole session, at ``stop_all``."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.started: list[subprocess.Popen[bytes]] = []

    def start(self, settings: Settings, *args: str) -> subprocess.Popen[bytes]:
        n = len(self.started)
        out = open(self.tmp_path / f"pool{n}.stdout", "wb")  # noqa: SIM115 - closed below
        err = open(self.tmp_path / f"pool{n}.stderr", "wb")  # noqa: SIM115
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", "koubou_mcp", "pool", *args], cwd=REPO_ROOT,
                env=child_env(settings), stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                start_new_session=True,
            )
        finally:
            out.close()
            err.close()
        self.started.append(process)
        return process

    def stderr(self, process: subprocess.Popen[bytes]) -> str:
        return (self.tmp_path / f"pool{self.started.index(process)}.stderr").read_text()

    def stdout(self, process: subprocess.Popen[bytes]) -> str:
        return (self.tmp_path / f"pool{self.started.index(process)}.stdout").read_text()

    def stop_all(self) -> None:
        for process in self.started:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        for process in self.started:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(5)


def run_cli(settings: Settings, *args: str, input: str | bytes | None = None,
            extra_env: Mapping[str, str] | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``koubou-mcp ARGS`` as a user would, to completion."""
    raw = subprocess.run(
        [sys.executable, "-m", "koubou_mcp", *args], env=child_env(settings, extra_env),
        input=input.encode() if isinstance(input, str) else input, capture_output=True,
        timeout=timeout, check=False,
    )
    return subprocess.CompletedProcess(raw.args, raw.returncode,
                                       raw.stdout.decode(errors="replace"),
                                       raw.stderr.decode(errors="replace"))


def wait_exit(proc: subprocess.Popen[bytes], timeout: float = 15) -> int:
    wait_until(lambda: proc.poll() is not None, timeout=timeout, message=f"pid {proc.pid} to exit")
    code = proc.returncode
    assert code is not None
    return code


def wait_dead(pid: int, timeout: float = 10) -> None:
    wait_until(lambda: not pid_alive(pid), timeout=timeout, message=f"pid {pid} to be gone")


def bound_by_file_modes() -> list[str]:
    """A command prefix under which file modes bind us, even as root: empty for any other
    user; as root, ``setpriv`` taking CAP_DAC_OVERRIDE and CAP_FOWNER out of the bounding set
    (the child cannot write a read-only file or chmod its way around it), or a skip when
    setpriv is missing.

    The child stays uid 0 and keeps CAP_DAC_READ_SEARCH, so it still reads the checkout, its
    virtual environment and the interpreter wherever they are: switching to user nobody
    instead failed as soon as the checkout sat under a directory only its owner may enter
    (nobody could not open the console script). The home stays ours, as its check wants.
    """
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        import pytest  # here: the benchmarks import this module and need no pytest

        pytest.skip("root writes to read-only files and setpriv is missing to stop that")
    return [setpriv, "--bounding-set=-dac_override,-fowner", "--inh-caps=-all"]
