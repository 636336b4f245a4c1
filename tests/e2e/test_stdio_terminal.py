"""The MCP server started by hand in a terminal (the README's first command): a real tmux
terminal shows what a newcomer sees; Ctrl-C ends it quietly and at once."""

from __future__ import annotations

import os
import re
import subprocess

from koubou_mcp.config import Settings
from tests.e2e.conftest import Leftovers
from tests.support.env import child_env
from tests.support.processes import koubou_command
from tests.support.procfs import worker_processes
from tests.support.terminal import terminal
from tests.support.waiting import wait_until

HINT = "this is an MCP server"


def test_in_a_terminal_the_server_says_what_it_is_and_ctrl_c_ends_it_quietly(
    e2e_settings: Settings, leftovers: Leftovers
) -> None:
    with terminal([koubou_command()], child_env(e2e_settings), stderr_to_screen=True) as term:
        screen = wait_until(lambda: "Ctrl-C" in term.screen() and term.screen(), timeout=30,
                            interval=0.1, message="the terminal hint")
        assert HINT in screen and "waits for a client" in screen
        registered = re.search(r"claude mcp add koubou -- (\S+)", screen)
        assert registered, screen
        assert os.path.isabs(registered[1]) and os.access(registered[1], os.X_OK), registered[1]
        assert f"{registered[1]} doctor" in screen
        # the pool started with it, so Ctrl-C has a real shutdown to do
        for pid in wait_until(lambda: worker_processes(e2e_settings.home), timeout=30,
                              message="the pool's first worker"):
            leftovers.add(pid)

        term.keys("C-c")
        code = wait_until(lambda: term.exit_code() is not None and (term.exit_code(),),
                          timeout=15, interval=0.05, message="the server to exit")[0]
        after = term.screen()
    assert code == 0, after
    assert "took longer" not in after and "Traceback" not in after, after


def test_under_a_client_the_server_prints_no_hint(e2e_settings: Settings,
                                                  leftovers: Leftovers) -> None:
    done = subprocess.run([koubou_command(), "--no-pool"], env=child_env(e2e_settings),
                          input=b"", capture_output=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert HINT.encode() not in done.stderr and done.stdout == b""
