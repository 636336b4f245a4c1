"""The watchdog's wake-up is poked from the worker's signal handler as well as its loop."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.support.env import plain_env

# A process pokes its watchdog in a loop (as the worker does when each task starts) while a
# thread sends it SIGUSR1 over and over, whose handler pokes it too (as the stop handler
# does). A handler that runs while the interrupted loop is inside poke must not wait for it.
POKED_FROM_A_HANDLER = textwrap.dedent("""
    import os, signal, sys, threading, time
    from koubou_mcp.models import utcnow
    from koubou_mcp.watchdog import Watchdog, WatchdogHooks

    dog = Watchdog(WatchdogHooks(current=lambda: None, beat=lambda run, gen, obs: None,
                                 drain_started=lambda: None, drain_grace_s=10.0,
                                 heartbeat_s=0.05, clock=utcnow))
    dog.start()
    signal.signal(signal.SIGUSR1, lambda signum, frame: dog.poke())

    def send():
        for _ in range(int(sys.argv[1])):
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(0.0002)

    sender = threading.Thread(target=send)
    sender.start()
    while sender.is_alive():
        dog.poke()
    dog.stop()
    print("done")
""")


def test_a_signal_handler_may_poke_the_watchdog_while_the_loop_pokes_it() -> None:
    try:
        done = subprocess.run([sys.executable, "-c", POKED_FROM_A_HANDLER, "3000"],
                              capture_output=True, text=True, timeout=60, env=plain_env())
    except subprocess.TimeoutExpired:
        raise AssertionError("the process hung: a poke from the handler waited for the "
                             "poke it interrupted") from None
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "done"
