"""Hosting the worker pool: running a supervisor in time, in the foreground, in the background
or in a thread.

``run_pool(settings)`` (``koubou-mcp pool``) runs it in the foreground, with signal handlers.
``run_pool(settings, detached=True)`` (``koubou-mcp pool --detached``, what a server starts in
a session of its own: ``attachment.PoolLink``) does the same in the background: it exits at
once when another pool leads the home, and by itself once it has had no task and no server
attached for ``pool_linger_s`` (``attachment.Linger``). ``start_in_thread(settings)`` runs it
inside another process (tests, benchmarks), installing no signal handlers and never writing to
stdout. All drive one ``PoolRunner``: stand by until the home's leader lock is free, then tick
every ``Tuning.tick_s`` and at once when new work is announced, until asked to stop; then
``drain`` the workers, resign, and let a standing-by supervisor take over. ``PoolLog`` makes
sure the pool's lines and statistics reach ``logs/worker_pool.log`` even when the process logs
elsewhere.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from koubou_mcp import queue
from koubou_mcp.attachment import Linger, attached_servers
from koubou_mcp.config import Settings
from koubou_mcp.home import private_log_handler
from koubou_mcp.logformat import LineFormatter
from koubou_mcp.models import utcnow
from koubou_mcp.processes import Launcher, Phase
from koubou_mcp.store import Store, open_store
from koubou_mcp.supervisor import LOGGER_NAME, Supervisor, Tuning
from koubou_mcp.wakeup import Listener, SelfPipe

#: how often a background pool looks whether it still has work or an attached server, s
LINGER_CHECK_S = 1.0
#: how often the leading supervisor publishes its health for the servers attached to it, s
PUBLISH_S = 1.0

log = logging.getLogger(LOGGER_NAME)

Clock = Callable[[], datetime]


# -- the pool log -----------------------------------------------------------------------------

class _HomeFilter(logging.Filter):
    """Lets through only the records of the supervisor of one home (several may share a
    process, in tests)."""

    def __init__(self, home: str) -> None:
        super().__init__()
        self.home = home

    def filter(self, record: logging.LogRecord) -> bool:
        return getattr(record, "koubou_home", None) == self.home


class PoolLog:
    """The supervisor's lines and statistics of one home, sent to ``logs/worker_pool.log``
    (mode 0600) while attached, unless the process logs there already (``koubou-mcp pool``)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.path = settings.pool_log.absolute()
        self._handler: logging.Handler | None = None

    def attach(self) -> None:
        logger = logging.getLogger(LOGGER_NAME)
        if logger.level == logging.NOTSET:
            logger.setLevel(self.settings.log_level)
        if self._handler is not None or self._root_writes_there():
            return
        try:
            handler = private_log_handler(self.path)
        except OSError as exc:  # an unsafe file too (home.UnsafeHome)
            log.warning("cannot write %s: %s", self.path, exc)
            return
        handler.setFormatter(LineFormatter())
        handler.addFilter(_HomeFilter(str(self.settings.home)))
        logger.addHandler(handler)
        self._handler = handler

    def detach(self) -> None:
        handler, self._handler = self._handler, None
        if handler is not None:
            logging.getLogger(LOGGER_NAME).removeHandler(handler)
            handler.close()

    def _root_writes_there(self) -> bool:
        return any(isinstance(h, logging.FileHandler) and
                   Path(h.baseFilename).absolute() == self.path
                   for h in logging.getLogger().handlers)


# -- running a supervisor in time -------------------------------------------------------------

def drain(supervisor: Supervisor, *, force: bool = False,
          forced: Callable[[], bool] = lambda: False,
          wait: Callable[[float], object] = time.sleep, clock: Clock = utcnow) -> None:
    """Stop every worker of ``supervisor`` and wait for them (this reads the clock).

    SIGTERM lets each finish its task (it gives the task back after ``drain_grace_s``);
    whoever still runs ``drain_grace_s`` + a margin later is killed with its process group
    and its task re-queued. ``force`` (or ``forced()`` turning true meanwhile: a second stop
    request) sends the second SIGTERM: tasks go back at once.
    """
    workers, tuning, say = supervisor.workers, supervisor.tuning, supervisor.log
    if not workers:
        return
    supervisor.stopping = True
    workers.terminate_running(Phase.STOPPING, clock())
    say.info("stopping %d workers; running tasks get up to %gs to finish", len(workers),
             supervisor.settings.drain_grace_s)
    start = time.monotonic()
    deadline = start + supervisor.settings.drain_grace_s + tuning.drain_margin_s
    forced_at: float | None = None
    killed_at: float | None = None
    while True:
        supervisor.reap(clock())  # each exit handled as in a tick: its task back, its row off
        if not workers:
            break
        mono = time.monotonic()
        # the second SIGTERM goes a moment after the first: signals sent back to back can
        # merge into one
        if forced_at is None and (force or forced()) and mono - start >= 0.1:
            forced_at = mono
            say.warning("forced stop: workers give their tasks back now")
            workers.terminate_again()
            deadline = min(deadline, mono + tuning.force_wait_s)
        if killed_at is None and mono >= deadline:
            killed_at = mono
            say.warning("killing %d workers that did not stop in time: %s", len(workers),
                        ", ".join(workers))
            workers.kill_all(clock())
        if killed_at is not None and mono - killed_at > 10:
            say.error("workers %s did not die after SIGKILL; giving up on them",
                      ", ".join(workers))
            break
        wait(0.05)
    if supervisor.is_leader:
        supervisor.publish_health(clock())


class PoolRunner:
    """Runs one supervisor in time: stands by until it leads, ticks, drains when told to stop.

    ``request_stop`` only counts and pokes a pipe, so it is safe in a signal handler and from
    any thread; the loop does the work. The first request drains, a second (or ``force``)
    forces.
    """

    def __init__(self, supervisor: Supervisor, clock: Clock = utcnow, *,
                 linger: Linger | None = None, stand_by: bool = True,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self.supervisor = supervisor
        self.clock = clock
        #: with a ``Linger``, the pool stops by itself once idle with no server attached
        self.linger = linger
        #: without ``stand_by``, a pool that finds another leading returns at once
        self.stand_by = stand_by
        self.wall_clock = wall_clock
        self._next_linger_check: datetime | None = None
        self._next_publish: datetime | None = None
        self._attached: int | None = None
        self._stop_requests = 0
        self._force = False
        self._pipe = SelfPipe()
        self._listener: Listener | None = None

    def request_stop(self, force: bool = False) -> None:
        self._stop_requests += 1
        if force:
            self._force = True
        self._pipe.poke()
        listener = self._listener
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.poke()

    @property
    def stop_requested(self) -> bool:
        return self._stop_requests > 0

    @property
    def forced(self) -> bool:
        return self._force or self._stop_requests >= 2

    def run(self) -> int:
        """Stand by until leading, supervise until told to stop, drain, resign. Returns 0."""
        sup, tuning = self.supervisor, self.supervisor.tuning
        if not self._wait_for_leadership():
            return 0
        self._listen_for_work()
        try:
            while not self.stop_requested:
                self._tick()
                if self._lingered_alone():
                    break
                if self._sleep(tuning.tick_s) and tuning.settle_s > 0:
                    self._pipe.wait(tuning.settle_s)  # ends early only on a stop request
        finally:
            try:
                self.drain(force=self.forced)
                try:
                    sup.write_stats(self.clock())
                except Exception as exc:
                    sup.log.error("the last statistics block failed: %s: %s",
                                  type(exc).__name__, exc)
            finally:
                self._stop_listening()
                sup.resign()
        return 0

    def drain(self, *, force: bool = False) -> None:
        drain(self.supervisor, force=force, forced=lambda: self.forced, wait=self._pipe.wait,
              clock=self.clock)

    def close(self) -> None:
        """Release everything: stop any worker still managed (forcing), resign, close."""
        self.drain(force=True)
        self._stop_listening()
        self.supervisor.close(self.clock())
        self._pipe.close()

    def _wait_for_leadership(self) -> bool:
        sup = self.supervisor
        announced = False
        while not self.stop_requested:
            if sup.try_lead():
                return True
            if not self.stand_by:
                sup.log.info("the pool for %s already runs (pid %s); this one leaves",
                             sup.settings.home, sup.health().get("leader_pid") or "?")
                return False
            if not announced:
                announced = True
                sup.log.info("the pool for %s is supervised by pid %s; standing by to take over",
                             sup.settings.home, sup.health().get("leader_pid") or "?")
            self._pipe.wait(sup.tuning.lock_retry_s)
        return False

    def _lingered_alone(self) -> bool:
        """For a background pool: True once it has had no task and no attached server for
        ``linger.linger_s`` (looked at every ``LINGER_CHECK_S``)."""
        linger, sup = self.linger, self.supervisor
        if linger is None:
            return False
        now = self.clock()
        if self._next_linger_check is not None and now < self._next_linger_check:
            return False
        self._next_linger_check = now + timedelta(seconds=LINGER_CHECK_S)
        try:
            counts = queue.counts_by_status(sup.store)
        except Exception:  # the store may be back soon; meanwhile there may be work
            return False
        work = bool(counts.get("pending") or counts.get("in_progress"))
        servers = attached_servers(sup.settings.run_dir, self.wall_clock(), sweep=True)
        if len(servers) != self._attached:
            self._attached = len(servers)
            sup.log.info("%d server%s attached to the pool%s", len(servers),
                         "" if len(servers) == 1 else "s",
                         f" (pids {', '.join(map(str, servers))})" if servers else "")
        if not linger.observe(now, work=work, attached=len(servers)):
            return False
        sup.log.info("no task and no server attached for %gs: the background pool exits",
                     linger.linger_s)
        return True

    def _listen_for_work(self) -> None:
        sup = self.supervisor
        if not sup.tuning.wake_on_work:
            return
        try:
            self._listener = sup.store.wakeup.listen(f"supervisor-{os.getpid()}")
        except Exception as exc:  # polling still works; do not fail to lead over it
            sup.log.warning("no wake-ups for new work (%s); deciding every %gs instead", exc,
                            sup.tuning.tick_s)

    def _stop_listening(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()

    def _tick(self) -> None:
        sup = self.supervisor
        try:
            sup.tick(self.clock())
            sup.last_error = None
        except Exception as exc:  # the store may be back at the next tick
            message = f"{type(exc).__name__}: {exc}"
            if message != sup.last_error:
                sup.last_error = message
                sup.log.exception("supervisor tick failed; trying again")
        self._publish()

    def _publish(self) -> None:
        """Every ``PUBLISH_S``: the supervisor's health, for attached servers to show (they
        run in other processes)."""
        now = self.clock()
        if self._next_publish is not None and now < self._next_publish:
            return
        self._next_publish = now + timedelta(seconds=PUBLISH_S)
        sup = self.supervisor
        try:
            sup.leader_lock.publish({**sup.health(), "last_error": sup.last_error})
        except OSError as exc:  # only the servers' view suffers; the pool goes on
            sup.log.warning("cannot publish the pool's health: %s", exc)

    def _sleep(self, timeout_s: float) -> bool:
        """Wait for new work, a stop request or the timeout; True when woken early."""
        listener = self._listener
        return listener.wait(timeout_s) if listener is not None else self._pipe.wait(timeout_s)


# -- hosting ----------------------------------------------------------------------------------

def run_pool(settings: Settings, *, detached: bool = False) -> int:
    """``koubou-mcp pool``: supervise until SIGTERM/SIGINT (a second one forces). Stands by
    while another supervisor holds this home. ``detached`` (the background pool a server
    starts): leave at once when another supervisor holds the home, and exit once idle with no
    server attached for ``pool_linger_s``. Returns the exit code."""
    store = open_store(settings.database_url, settings.run_dir)
    supervisor = Supervisor(settings, store, role="detached" if detached else "pool")
    runner = (PoolRunner(supervisor, linger=Linger(settings.pool_linger_s), stand_by=False)
              if detached else PoolRunner(supervisor))
    pool_log = PoolLog(settings)

    def on_signal(signum: int, frame: Any) -> None:
        runner.request_stop()  # only counts and writes to a pipe: the loop does the work

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        pool_log.attach()
        return runner.run()
    except OSError as exc:
        log.error("the pool cannot run: %s", exc)
        return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        runner.close()
        pool_log.detach()
        store.close()


class PoolHandle:
    """A supervisor running in a background thread of this process (see ``start_in_thread``)."""

    def __init__(self, runner: PoolRunner, thread: threading.Thread) -> None:
        self.runner = runner
        self.thread = thread

    @property
    def supervisor(self) -> Supervisor:
        return self.runner.supervisor

    @property
    def is_leader(self) -> bool:
        return self.supervisor.is_leader

    @property
    def running(self) -> bool:
        return self.thread.is_alive()

    def health(self) -> dict[str, Any]:
        return {**self.supervisor.health(), "running": self.running}

    def stop(self, drain: bool = True, timeout_s: float | None = None) -> bool:
        """Stop the pool. ``drain``: workers finish their tasks (up to ``drain_grace_s``);
        otherwise they give them back at once. Calling it again forces. Waits up to
        ``timeout_s`` (default: long enough for a drain) and returns True once stopped."""
        self.runner.request_stop(force=not drain)
        if timeout_s is None:
            tuning = self.supervisor.tuning
            timeout_s = (self.supervisor.settings.drain_grace_s + tuning.drain_margin_s +
                         tuning.force_wait_s + 15.0)
        self.thread.join(timeout_s)
        return not self.thread.is_alive()


def start_in_thread(
    settings: Settings,
    *,
    store: Store | None = None,
    role: str = "server",
    tuning: Tuning | None = None,
    launcher: Launcher | None = None,
) -> PoolHandle:
    """Run a supervisor in a daemon thread of this process (the MCP server's way).

    Installs no signal handlers and never writes to stdout. When another supervisor holds the
    home, this one stands by and takes over when it goes away (``handle.is_leader``). With no
    ``store``, it opens its own and closes it when it stops.
    """
    own_store = store is None
    the_store = store if store is not None else open_store(settings.database_url,
                                                           settings.run_dir)
    runner = PoolRunner(Supervisor(settings, the_store, role=role, tuning=tuning,
                                   launcher=launcher))
    pool_log = PoolLog(settings)
    pool_log.attach()

    def target() -> None:
        try:
            runner.run()
        except Exception:
            log.exception("the worker pool stopped on an error")
        finally:
            try:
                runner.close()  # stops any worker left (forcing) and releases the lock
            finally:
                pool_log.detach()
                if own_store:
                    the_store.close()

    thread = threading.Thread(target=target, name="koubou-supervisor", daemon=True)
    thread.start()
    return PoolHandle(runner, thread)


__all__ = ["LINGER_CHECK_S", "PoolHandle", "PoolLog", "PoolRunner", "drain", "run_pool",
           "start_in_thread"]
