"""The worker's second thread: heartbeats, cancel and lost-lease notices, time limits.

The worker's own thread runs one task at a time and blocks in the backend call (see
``worker``). This thread keeps time beside it: it renews the lease every ``heartbeat_s``
(saving what the model generated so far, and what was measured of the model server), and it
stops the task (``Run.stop``: the backend call is aborted at once) when a heartbeat finds a
cancel request or the lease lost, when the task's time limit passes, or when a drain's grace
is over. Idle, it heartbeats the worker row every ``idle_beat_s`` (a third of a lease).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum

from koubou_mcp import queue
from koubou_mcp.admission import Capacity, Observation
from koubou_mcp.backends.base import Abort, GenerationProgress
from koubou_mcp.models import TaskSnapshot
from koubou_mcp.wakeup import SelfPipe

log = logging.getLogger("koubou_mcp.worker")


class Interrupt(StrEnum):
    """Why a running task was stopped before its backend returned."""

    CANCEL = "cancel"  # the user cancelled it
    LOST = "lost"  # the lease is gone; another worker owns it now
    STOP = "stop"  # the worker was told to stop now (second signal, or drain grace over)
    TIMEOUT = "timeout"  # the task's time limit passed


@dataclass
class Run:
    """The task being worked on, how to interrupt it, and what its model produced so far.

    Shared by the two threads: the worker's writes ``progress``, ``deadline`` and
    ``observations``; the watchdog reads them and sets ``interrupt``. Each field is replaced
    whole (never mutated in place), which is atomic in Python.
    """

    task: TaskSnapshot
    concurrency: int | None = None
    capacity: Capacity | None = None
    abort: Abort = field(default_factory=Abort)
    #: when the time limit passes (time.monotonic); it starts when the task holds a slot
    deadline: float = float("inf")
    interrupt: Interrupt | None = None
    progress: GenerationProgress | None = None
    #: the progress last written to the store (a heartbeat writes only when it changed)
    saved: GenerationProgress | None = None
    first_token_seen: bool = False
    #: measurements of the model server not yet written (the watchdog's next beat writes
    #: them, or the hand-over to the next task does)
    observations: tuple[Observation, ...] = ()

    def stop(self, why: Interrupt) -> None:
        """Stop the task (from any thread or a signal handler): its backend call ends now."""
        if self.interrupt is None:
            self.interrupt = why
        self.abort.fire()

    def generated(self) -> queue.Generated | None:
        p = self.progress
        if p is None:
            return None
        return queue.Generated(p.text or None, p.tokens, p.first_token_s)

    def take_observations(self) -> tuple[Observation, ...]:
        taken, self.observations = self.observations, ()
        return taken


@dataclass(frozen=True)
class WatchdogHooks:
    """What the watchdog needs of its worker (kept narrow so it can be tested alone)."""

    current: Callable[[], Run | None]
    #: one heartbeat: (the run or None, the progress to save or None, observations) -> what
    #: it learned, or None when the store failed (nothing was written; the next beat retries)
    beat: Callable[[Run | None, queue.Generated | None, tuple[Observation, ...]],
                   queue.Beat | None]
    #: when the drain started (time.monotonic), or None when the worker is not draining
    drain_started: Callable[[], float | None]
    drain_grace_s: float
    heartbeat_s: float
    clock: Callable[[], datetime]
    #: between heartbeats while no task runs (None: ``heartbeat_s``). An idle row only says
    #: the worker lives, which everyone judges over a whole lease; a beat a second from each
    #: idle worker was most of an idle pool's CPU (docs/benchmarks.md)
    idle_beat_s: float | None = None


class Watchdog:
    """Runs ``WatchdogHooks`` on a thread of its own until ``stop``."""

    def __init__(self, hooks: WatchdogHooks) -> None:
        self.hooks = hooks
        # a pipe, not a threading.Event: the worker's signal handler pokes this, and an
        # Event's set() takes a lock that the interrupted main thread may be holding (it
        # pokes too, as each task starts): the handler then waited on its own thread forever
        self._wake = SelfPipe()
        self._stopped = False
        #: when the loop next looks on its own (time.monotonic); infinity while it is awake,
        #: when a new deadline may not have been seen yet
        self._sleeping_until = float("inf")
        self._thread = threading.Thread(target=self._loop, name="koubou-watchdog", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def poke(self) -> None:
        """Look again now (a task started: its deadline counts from now). Safe in a signal
        handler and from any thread."""
        self._wake.poke()

    def watch(self, run: Run) -> None:
        """A task started (``run`` is the hooks' current one): poke when its deadline comes
        before the loop's next look. Most deadlines are further off than the next heartbeat,
        and a poke per task was a sixth of a worker's CPU at zero model latency (two thread
        switches). The loop says when it sleeps only after it has read the current run: if
        it read the one before, it is still awake, and this pokes."""
        if min(run.deadline, time.monotonic() + self.hooks.heartbeat_s) < self._sleeping_until:
            self.poke()  # a deadline soon, or an idle loop's long sleep (its lease needs beats)

    def stop(self) -> None:
        self._stopped = True
        self._wake.poke()
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self._wake.close()

    def _loop(self) -> None:
        busy_s = self.hooks.heartbeat_s
        idle_s = max(busy_s, self.hooks.idle_beat_s or busy_s)
        next_beat = time.monotonic() + busy_s
        watched: Run | None = None
        while not self._stopped:
            self._sleeping_until = float("inf")
            run = self.hooks.current()
            now = time.monotonic()
            if run is not None and run is not watched:
                # a new task: its lease and its cancel requests are heard every heartbeat_s
                # from now on, whatever the idle rhythm was
                next_beat = min(next_beat, now + busy_s)
            watched = run
            if run is not None and run.interrupt is None:
                self._check_limits(run, now)
            if now >= next_beat:
                self._beat(run)
                next_beat = time.monotonic() + (busy_s if run is not None else idle_s)
            wait = next_beat - time.monotonic()
            if run is not None and run.interrupt is None:
                wait = min(wait, run.deadline - time.monotonic())
            wait = max(0.0, wait)
            self._sleeping_until = time.monotonic() + wait
            self._wake.wait(wait)

    def _check_limits(self, run: Run, now: float) -> None:
        if now >= run.deadline:
            log.warning("%s: time limit of %gs reached; stopping it", run.task.task_id,
                        run.task.timeout_s)
            run.stop(Interrupt.TIMEOUT)
            return
        started = self.hooks.drain_started()
        if started is not None and now - started > self.hooks.drain_grace_s:
            log.warning("%s: drain grace of %gs over; giving it back", run.task.task_id,
                        self.hooks.drain_grace_s)
            run.stop(Interrupt.STOP)

    def _beat(self, run: Run | None) -> None:
        progress = run.progress if run is not None else None
        generated = None
        if run is not None and progress is not run.saved:
            generated = run.generated()
        observations = run.take_observations() if run is not None else ()
        beat = self.hooks.beat(run, generated, observations)
        if run is None:
            return
        if beat is None:  # not written: keep what was to be written for the next beat
            run.observations = observations + run.observations
            return
        if beat is not queue.Beat.LOST:
            run.saved = progress
        if run is not self.hooks.current():
            return  # the task ended while we wrote: what the beat says is about the past
        if beat == queue.Beat.CANCEL:
            log.info("%s: cancel requested; stopping it", run.task.task_id)
            run.stop(Interrupt.CANCEL)
        elif beat == queue.Beat.LOST:
            log.warning("%s: lease lost to another worker; abandoning it", run.task.task_id)
            run.stop(Interrupt.LOST)
