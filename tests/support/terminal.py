"""A real terminal for tests: a private tmux server runs a command in a window of a known
size; ``screen`` reads what it shows (capture-pane), ``keys`` types (send-keys). The command's
exit code and stderr are written to files by the shell tmux runs it in."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

TMUX = shutil.which("tmux")
SESSION = "t"


@dataclass
class Terminal:
    socket: Path
    exit_file: Path
    stderr_file: Path

    def tmux(self, *args: str) -> str:
        assert TMUX is not None
        return subprocess.run([TMUX, "-S", str(self.socket), *args], capture_output=True,
                              text=True, timeout=10, check=True).stdout

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-J", "-t", SESSION)

    def keys(self, *keys: str) -> None:
        self.tmux("send-keys", "-t", SESSION, *keys)

    def exit_code(self) -> int | None:
        text = self.exit_file.read_text() if self.exit_file.exists() else ""
        return int(text) if text.strip() else None


@contextmanager
def terminal(argv: list[str], env: Mapping[str, str], *, stderr_to_screen: bool = False,
             width: int = 120, height: int = 50) -> Iterator[Terminal]:
    """``argv`` running in a ``width`` x ``height`` tmux window. Its stderr goes to a file, or
    with ``stderr_to_screen`` to the terminal (and the file stays empty)."""
    assert TMUX, "these tests need tmux (Debian package tmux; .ci/run installs it)"
    short = Path(tempfile.mkdtemp(prefix="kt-"))  # a unix socket path must stay short
    term = Terminal(short / "tmux.sock", short / "exit", short / "stderr")
    term.stderr_file.touch()
    command = " ".join(shlex.quote(a) for a in argv)
    redirect = "" if stderr_to_screen else f" 2>{shlex.quote(str(term.stderr_file))}"
    exit_file = shlex.quote(str(term.exit_file))
    # written aside and renamed: a reader never sees an empty exit file
    shell = f"{command}{redirect}; echo $? >{exit_file}.part; mv {exit_file}.part {exit_file}"
    # the window stays after the command exits, so its last screen can still be read
    config = short / "tmux.conf"
    config.write_text("set -g remain-on-exit on\n")
    subprocess.run([TMUX, "-S", str(term.socket), "-f", str(config), "new-session", "-d",
                    "-s", SESSION,
                    "-x", str(width), "-y", str(height), shell], env=dict(env), check=True,
                   timeout=10)
    try:
        yield term
    finally:
        subprocess.run([TMUX, "-S", str(term.socket), "kill-server"], capture_output=True,
                       timeout=10, check=False)
        shutil.rmtree(short, ignore_errors=True)
