"""The watchdog's wake-up is poked from the worker's signal handler as well as its loop; it
sees a new task's deadline in time without a poke per task."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator

import pytest

from koubou_mcp.models import TaskSnapshot, utcnow
from koubou_mcp.watchdog import Interrupt, Run, Watchdog, WatchdogHooks
from tests.support.env import plain_env
from tests.support.waiting import wait_until

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


class _Counted(Watchdog):
    """A watchdog that counts its pokes, running with a 30 s heartbeat and no store."""

    def __init__(self) -> None:
        self.run: Run | None = None
        self.pokes = 0
        super().__init__(WatchdogHooks(current=lambda: self.run, beat=lambda run, gen, obs: None,
                                       drain_started=lambda: None, drain_grace_s=10.0,
                                       heartbeat_s=30.0, clock=utcnow))

    def poke(self) -> None:
        self.pokes += 1
        super().poke()

    def start_task(self, timeout_s: float) -> Run:
        """As the worker starts a task: current run first, then ``watch``."""
        now = utcnow()
        run = Run(TaskSnapshot(
            task_id="t", type="general", prompt="p", status="in_progress", priority=5,
            result=None, error=None, error_kind=None, attempts=1, max_attempts=3,
            timeout_s=timeout_s, worker_id="w", lease_expires_at=None, not_before=None,
            cancel_requested=False, idempotency_key=None, created_at=now, updated_at=now,
            started_at=now, finished_at=None))
        run.deadline = time.monotonic() + timeout_s
        self.run = run
        self.watch(run)
        return run


@pytest.fixture
def dog() -> Iterator[_Counted]:
    watchdog = _Counted()
    watchdog.start()
    yield watchdog
    watchdog.stop()


def _asleep(dog: _Counted) -> None:
    wait_until(lambda: dog._sleeping_until != float("inf"), timeout=5,
               message="the watchdog to go to sleep")


def test_a_deadline_sooner_than_the_next_look_wakes_the_watchdog(dog: _Counted) -> None:
    _asleep(dog)
    run = dog.start_task(timeout_s=0.3)
    assert dog.pokes == 1
    wait_until(lambda: run.interrupt == Interrupt.TIMEOUT, timeout=5,
               message="the time limit to stop the task (the next heartbeat is 30 s away)")


def test_a_deadline_after_the_next_look_costs_no_poke(dog: _Counted) -> None:
    _asleep(dog)
    dog.start_task(timeout_s=3600)
    assert dog.pokes == 0


def test_a_task_that_starts_while_the_watchdog_is_awake_is_seen(dog: _Counted) -> None:
    # awake: between its look at the current run and its sleep, a new run may go unseen
    _asleep(dog)
    dog._sleeping_until = float("inf")  # as at the top of its loop
    run = dog.start_task(timeout_s=0.3)
    assert dog.pokes == 1
    wait_until(lambda: run.interrupt == Interrupt.TIMEOUT, timeout=5,
               message="the time limit to stop the task")
