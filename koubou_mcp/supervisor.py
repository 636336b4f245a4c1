"""The worker pool: starts, watches, retires and replaces worker processes as the load changes.

One supervisor runs per ``KOUBOU_HOME``: it holds an ``flock`` on ``run/supervisor.lock`` (the
kernel releases it when the process dies, however it dies) and writes its pid and role to
``run/supervisor.pid``. Others stand by and try the lock every second; the first to get it after
the leader goes away takes over.

The leader applies a decision at least every ``Tuning.tick_s`` and at once when new work is
announced (``store.wakeup``). One ``tick(now)``:

1. reaps exited workers (``poll``): a worker that died holding a task gets it back in the queue at
   once (``queue.requeue_worker``), not when its lease runs out; its row goes ``offline``;
2. every few seconds, gives back tasks whose lease expired (workers that vanished unnoticed,
   maybe on another machine) and marks silent worker rows offline;
3. kills (SIGKILL, whole process group) a worker whose task ran past ``timeout_s`` plus a grace,
   and fails that task ("timed out after N s", not retried); also a worker that ignored its
   retirement, or that never finished starting;
4. counts the processes it manages (never rows) as starting, idle or busy, asks the policy
   (``scaling.decide``) and applies the answer: spawn workers, or SIGTERM idle ones (they exit);
5. every ``stats_interval_s`` writes the statistics block to ``logs/worker_pool.log``.

Workers that keep dying before they are ready are restarted one at a time after an exponential
backoff (``scaling.crash_backoff_s``); ``health()`` shows it.

Stopping (``request_stop``, called by signal handlers or ``PoolHandle.stop``): every worker gets
SIGTERM and finishes its task (it gives the task back after ``drain_grace_s``); after
``drain_grace_s`` plus a margin, the rest are killed and their tasks re-queued. A second stop
request forces: workers give their tasks back at once. Workers also exit by themselves, after
their current task, when the supervisor process is gone.

Two ways to run it: ``run_pool(settings)`` in the foreground (``koubou-mcp pool``, with signal
handlers), or ``start_in_thread(settings)`` inside another process (the MCP server), which
installs no signal handlers and never writes to stdout.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol, TextIO

from koubou_mcp import queue
from koubou_mcp.config import Settings, make_private_dir
from koubou_mcp.models import WorkerSnapshot, WorkerStatus, utcnow
from koubou_mcp.report import stats_block
from koubou_mcp.scaling import Decision, IdleWorker, Limits, Snapshot, crash_backoff_s, decide
from koubou_mcp.store import Store, open_store
from koubou_mcp.wakeup import Listener

LOGGER_NAME = "koubou_mcp.supervisor"
STATS_LOGGER_NAME = "koubou_mcp.supervisor.stats"
POOL_LOG = "worker_pool.log"
LOCK_FILE = "supervisor.lock"
PID_FILE = "supervisor.pid"

log = logging.getLogger(LOGGER_NAME)

Clock = Callable[[], datetime]
Policy = Callable[[Snapshot, Limits], Decision]


@dataclass(frozen=True)
class Tuning:
    """Internal timings of the supervisor. The defaults suit production; tests and benchmarks
    change them (``policy`` lets a benchmark run the seed's rule through the same machinery)."""

    #: longest wait between two decisions
    tick_s: float = 0.5
    #: after a wake-up, let the rest of a burst land for this long before deciding
    settle_s: float = 0.05
    #: how often a standing-by supervisor tries the lock
    lock_retry_s: float = 1.0
    #: decide at once when new work is announced (else only every ``tick_s``)
    wake_on_work: bool = True
    policy: Policy = decide
    #: a worker not ready (idle or busy) this long after its start is killed as a failed start
    startup_timeout_s: float = 30.0
    #: a task running this long past its ``timeout_s`` gets its worker killed
    overdue_grace_s: float = 10.0
    #: extra time a stopping worker gets beyond ``drain_grace_s`` before it is killed
    drain_margin_s: float = 3.0
    #: after a forced stop, how long workers get to give their tasks back before SIGKILL
    force_wait_s: float = 3.0
    crash_backoff_base_s: float = 1.0
    crash_backoff_cap_s: float = 60.0
    #: longest interval between lease-expiry sweeps (also at most half a lease)
    maintenance_s: float = 5.0


# -- worker processes ---------------------------------------------------------------------

class WorkerProcess(Protocol):
    """A started worker process, as the supervisor handles it."""

    @property
    def pid(self) -> int: ...

    def poll(self) -> int | None:
        """Its exit code once it exited (reaping it), else None."""
        ...

    def terminate(self) -> None:
        """SIGTERM: the first one makes the worker finish its task and exit; a second, give
        the task back and exit."""
        ...

    def kill(self) -> None:
        """SIGKILL its whole process group."""
        ...


Launcher = Callable[[str], WorkerProcess]


class PopenWorker:
    """A worker started with ``subprocess.Popen`` in its own session (so its own group)."""

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self.popen = popen

    @property
    def pid(self) -> int:
        return self.popen.pid

    def poll(self) -> int | None:
        return self.popen.poll()

    def terminate(self) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        # Until we reap it, its pid (= its process group id) cannot be reused, so this reaches
        # only the worker and whatever it started in its group.
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.popen.pid, signal.SIGKILL)


def worker_command() -> list[str]:
    """How a worker is started: this interpreter, this package."""
    return [sys.executable, "-m", "koubou_mcp", "worker"]


class ProcessLauncher:
    """Starts ``koubou-mcp worker`` processes for a supervisor.

    Each worker runs in its own session, reads nothing from stdin, and writes stdout and stderr
    to ``$KOUBOU_HOME/logs/workers/<id>.log`` (mode 0600), never to the supervisor's stdout,
    which carries the MCP protocol when the server hosts the pool.
    """

    def __init__(self, settings: Settings, command: list[str] | None = None) -> None:
        self.settings = settings
        self.command = command or worker_command()

    def environment(self, worker_id: str) -> dict[str, str]:
        # The inherited environment carries PATH, HOME and the like, which the worker and the
        # Codex CLI it runs need; the settings then override every KOUBOU_* knob.
        env = dict(os.environ)
        env.update(self.settings.to_env())
        env["WORKER_ID"] = worker_id
        env["KOUBOU_HOME"] = str(self.settings.home)
        env["KOUBOU_SUPERVISOR_PID"] = str(os.getpid())
        return env

    def log_path(self, worker_id: str) -> Path:
        return self.settings.worker_logs_dir / f"{worker_id}.log"

    def __call__(self, worker_id: str) -> PopenWorker:
        path = self.log_path(worker_id)
        make_private_dir(path.parent)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            popen = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
                self.command, stdin=subprocess.DEVNULL, stdout=fd, stderr=fd,
                env=self.environment(worker_id), start_new_session=True, close_fds=True,
            )
        finally:
            os.close(fd)
        return PopenWorker(popen)


class Phase(StrEnum):
    """Where a managed worker is in its life, from the supervisor's side."""

    RUNNING = "running"  # serving tasks (or starting to)
    RETIRING = "retiring"  # sent SIGTERM because it idled too long
    STOPPING = "stopping"  # sent SIGTERM because the pool stops
    KILLED = "killed"  # sent SIGKILL; waiting to reap it


@dataclass
class Managed:
    """One worker process this supervisor started."""

    worker_id: str
    process: WorkerProcess
    started_at: datetime
    phase: Phase = Phase.RUNNING
    #: the status its row showed at the last tick (``starting`` until it registered)
    status: str = WorkerStatus.STARTING.value
    #: seen idle or busy at least once: it started fine
    ready: bool = False
    signalled_at: datetime | None = None


# -- the single-supervisor lock -------------------------------------------------------------

@dataclass(frozen=True)
class Holder:
    """What ``run/supervisor.pid`` says about the supervisor holding the lock."""

    pid: int
    role: str


class LeaderLock:
    """An exclusive ``flock`` on ``run/supervisor.lock`` plus the pid file naming its holder.

    ``flock`` locks belong to an open file description, so the lock conflicts even between two
    supervisors in one process, and the kernel drops it when the holder dies. The descriptor is
    not inherited by workers (Python opens files close-on-exec; Popen closes the rest).
    """

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.path = run_dir / LOCK_FILE
        self.pid_path = run_dir / PID_FILE
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, role: str) -> bool:
        """Take the lock without waiting; True when this object now holds it."""
        if self._fd is not None:
            return True
        make_private_dir(self.run_dir)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        try:
            tmp = self.run_dir / f".{PID_FILE}.{os.getpid()}.tmp"
            tmp_fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(tmp_fd, "w") as f:
                f.write(f"{os.getpid()}\n{role}\n")
            os.replace(tmp, self.pid_path)
        except BaseException:
            self.release()
            raise
        return True

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        # remove the pid file first: once unlocked, a successor may write its own
        holder = read_holder(self.run_dir)
        if holder is not None and holder.pid == os.getpid():
            with contextlib.suppress(FileNotFoundError):
                self.pid_path.unlink()
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def read_holder(run_dir: Path) -> Holder | None:
    """The pid and role in ``run/supervisor.pid``, or None when absent or unreadable."""
    try:
        lines = (run_dir / PID_FILE).read_text().split()
        return Holder(int(lines[0]), lines[1] if len(lines) > 1 else "pool")
    except (OSError, ValueError, IndexError):
        return None


def lock_is_held(run_dir: Path) -> bool:
    """Whether some supervisor (in any process, this one included) holds the pool lock."""
    try:
        fd = os.open(run_dir / LOCK_FILE, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops the probe's own lock, if it got one
    return False


# -- waiting --------------------------------------------------------------------------------

class _Waker:
    """A self-pipe: ``poke`` is safe in a signal handler and from any thread."""

    def __init__(self) -> None:
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        os.set_blocking(self._w, False)
        self._closed = False

    def poke(self) -> None:
        if not self._closed:
            with contextlib.suppress(OSError):
                os.write(self._w, b"!")

    def wait(self, timeout_s: float) -> bool:
        try:
            ready, _, _ = select.select([self._r], [], [], max(timeout_s, 0.0))
        except (InterruptedError, OSError):
            return False
        if ready:
            with contextlib.suppress(OSError):
                while os.read(self._r, 4096):
                    pass
        return bool(ready)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            for fd in (self._r, self._w):
                with contextlib.suppress(OSError):
                    os.close(fd)


class _HomeFilter(logging.Filter):
    """Lets through only the records of the supervisor of one home (several may share a
    process, in tests)."""

    def __init__(self, home: str) -> None:
        super().__init__()
        self.home = home

    def filter(self, record: logging.LogRecord) -> bool:
        return getattr(record, "koubou_home", None) == self.home


# -- the supervisor -------------------------------------------------------------------------

class Supervisor:
    """Keeps the right number of workers alive for one store. See the module docstring."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        *,
        launcher: Launcher | None = None,
        clock: Clock = utcnow,
        role: str = "pool",
        tuning: Tuning | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.launcher: Launcher = launcher or ProcessLauncher(settings)
        self.clock = clock
        self.role = role
        self.tuning = tuning or Tuning()
        self.workers: dict[str, Managed] = {}
        self.leader_lock = LeaderLock(settings.run_dir)
        #: the decisions that changed something, newest last
        self.history: deque[tuple[datetime, Decision]] = deque(maxlen=200)
        self.last_decision: Decision | None = None
        #: running totals since this supervisor started, for /metrics: decisions that started
        #: (scale-up events) or retired (scale-down events) workers, and the workers concerned
        self.scaling = {"up_events": 0, "down_events": 0, "workers_started": 0,
                        "workers_retired": 0}
        self.log = logging.LoggerAdapter(log, {"koubou_home": str(settings.home)})
        self._stats_log = logging.LoggerAdapter(
            logging.getLogger(STATS_LOGGER_NAME), {"koubou_home": str(settings.home)})
        self._stop_requests = 0
        self._force = False
        self._waker = _Waker()
        self._listener: Listener | None = None
        self._log_handler: logging.Handler | None = None
        self._failures = 0
        self._last_failure_at: datetime | None = None
        self._last_failure: str | None = None
        self._backoff_logged_for: int = 0
        self._next_maintenance: datetime | None = None
        self._next_stats: datetime | None = None
        self._last_error: str | None = None
        self._health: dict[str, Any] = {"leader": False, "pid": os.getpid(), "role": role,
                                        "home": str(settings.home)}

    # -- leadership ----------------------------------------------------------------------
    @property
    def is_leader(self) -> bool:
        return self.leader_lock.held

    def try_lead(self) -> bool:
        """Become the pool's supervisor if no one else is. True when this one leads."""
        if self.is_leader:
            return True
        if not self.leader_lock.acquire(self.role):
            return False
        self._attach_pool_log()
        if self.tuning.wake_on_work:
            try:
                self._listener = self.store.wakeup.listen(f"supervisor-{os.getpid()}")
            except Exception as exc:  # polling still works; do not fail to lead over it
                self.log.warning("no wake-ups for new work (%s); deciding every %gs instead",
                                 exc, self.tuning.tick_s)
        self._next_maintenance = None
        self._next_stats = None
        s = self.settings
        self.log.info(
            "supervising the worker pool for %s (pid %d, role %s; min %d, max %d, threshold %g, "
            "idle timeout %gs)", s.home, os.getpid(), self.role, s.min_workers, s.max_workers,
            s.scale_up_threshold, s.idle_timeout_s,
        )
        return True

    def resign(self) -> None:
        """Give up leadership (after ``stop_workers``): a standing-by supervisor takes over."""
        if not self.is_leader:
            return
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        self.log.info("no longer supervising the pool for %s", self.settings.home)
        self.leader_lock.release()
        self._detach_pool_log()
        self._health = {**self._health, "leader": False}

    # -- one decision ----------------------------------------------------------------------
    def tick(self, now: datetime) -> Decision:
        """Reap, recover, enforce deadlines, decide and apply, at time ``now``. Leader only."""
        if not self.is_leader:
            raise RuntimeError("tick() needs leadership; call try_lead() first")
        self._reap(now)
        if self._next_maintenance is None or now >= self._next_maintenance:
            self._maintain(now)
        rows = {w.worker_id: w for w in queue.list_workers(self.store)}
        self._observe(rows)
        self._enforce_deadlines(now)
        snapshot = self.snapshot(rows, now)
        decision = self.tuning.policy(snapshot, self.settings)
        self._apply(decision, now)
        if self._next_stats is None:
            self._next_stats = now + timedelta(seconds=self.settings.stats_interval_s)
        elif now >= self._next_stats:
            self.write_stats(now)
        self._publish_health(now, decision)
        return decision

    def snapshot(self, rows: Mapping[str, WorkerSnapshot], now: datetime) -> Snapshot:
        """Our running workers by state (from their rows) and the ready tasks, for the policy.

        Retiring, stopping and killed workers are on their way out: they are not capacity.
        """
        busy = starting = 0
        idle: list[IdleWorker] = []
        for m in self.workers.values():
            if m.phase != Phase.RUNNING:
                continue
            if m.status == WorkerStatus.BUSY.value:
                busy += 1
            elif m.status == WorkerStatus.IDLE.value:
                row = rows.get(m.worker_id)
                since = row.idle_since if row is not None else None
                idle_s = max(0.0, (now - since).total_seconds()) if since else 0.0
                idle.append(IdleWorker(m.worker_id, idle_s))
            elif m.status == WorkerStatus.STARTING.value:
                starting += 1
        ready = queue.ready_pending_count(self.store, now)
        return Snapshot(ready_pending=ready, busy=busy, starting=starting, idle=tuple(idle))

    def _observe(self, rows: Mapping[str, WorkerSnapshot]) -> None:
        for m in self.workers.values():
            row = rows.get(m.worker_id)
            if row is None:
                m.status = WorkerStatus.OFFLINE.value if m.ready else WorkerStatus.STARTING.value
                continue
            m.status = row.status
            if not m.ready and row.status in (WorkerStatus.IDLE.value, WorkerStatus.BUSY.value):
                m.ready = True
                if self._failures:
                    self.log.info("worker %s started fine; start-up backoff cleared",
                                  m.worker_id)
                    self._failures = 0
                    self._backoff_logged_for = 0

    def _apply(self, decision: Decision, now: datetime) -> None:
        self.last_decision = decision
        if decision.changes:
            self.history.append((now, decision))
            self.log.info("scale: %s", decision.reason)
        started, retired = self.scaling["workers_started"], self.scaling["workers_retired"]
        for worker_id in decision.retire:
            self._retire(worker_id, now)
        spawns = self._allowed_spawns(decision.spawn, now)
        for _ in range(spawns):
            self._spawn(now)
        if self.scaling["workers_started"] > started:
            self.scaling["up_events"] += 1
        if self.scaling["workers_retired"] > retired:
            self.scaling["down_events"] += 1

    def _allowed_spawns(self, wanted: int, now: datetime) -> int:
        """``wanted``, unless workers keep failing at start-up: then one at a time, after the
        backoff."""
        if wanted <= 0 or not self._failures:
            return wanted
        delay = self._backoff_s()
        assert self._last_failure_at is not None
        if now < self._last_failure_at + timedelta(seconds=delay):
            if self._backoff_logged_for != self._failures:
                self._backoff_logged_for = self._failures
                self.log.warning("workers keep failing at start-up (%d in a row); next start "
                                 "in %gs. Last: %s", self._failures, delay, self._last_failure)
            return 0
        if any(m.phase == Phase.RUNNING and not m.ready for m in self.workers.values()):
            return 0  # the probe is still starting
        return 1

    def _backoff_s(self) -> float:
        return crash_backoff_s(self._failures, self.tuning.crash_backoff_base_s,
                               self.tuning.crash_backoff_cap_s)

    def _spawn(self, now: datetime) -> None:
        worker_id = queue.new_worker_id(now)
        while worker_id in self.workers:
            worker_id = queue.new_worker_id(now)
        try:
            process = self.launcher(worker_id)
        except OSError as exc:
            self._startup_failed(now, f"cannot start a worker: {exc}")
            return
        self.workers[worker_id] = Managed(worker_id, process, now)
        self.scaling["workers_started"] += 1
        self.log.info("started worker %s (pid %d)", worker_id, process.pid)

    def _retire(self, worker_id: str, now: datetime) -> None:
        m = self.workers.get(worker_id)
        if m is None or m.phase != Phase.RUNNING:
            return
        m.process.terminate()
        m.phase, m.signalled_at = Phase.RETIRING, now
        self.scaling["workers_retired"] += 1
        self._db(queue.set_worker_status, self.store, worker_id, WorkerStatus.STOPPING, now)
        self.log.info("retiring idle worker %s (pid %d)", worker_id, m.process.pid)

    def _kill(self, m: Managed, now: datetime) -> None:
        m.process.kill()
        m.phase, m.signalled_at = Phase.KILLED, now

    # -- exits -----------------------------------------------------------------------------
    def _reap(self, now: datetime) -> None:
        for m in list(self.workers.values()):
            code = m.process.poll()
            if code is None:
                continue
            del self.workers[m.worker_id]
            self._reaped(m, code, now)

    def _reaped(self, m: Managed, code: int, now: datetime) -> None:
        how = describe_exit(code)
        for pgid in kill_orphaned_groups(self.settings.child_groups_dir(m.worker_id)):
            self.log.warning("killed process group %d that worker %s left running", pgid,
                             m.worker_id)
        row = None if m.ready else self._db(queue.get_worker, self.store, m.worker_id)
        started = m.ready or (row is not None and row.status != WorkerStatus.STARTING.value)
        recovered = self._db(queue.requeue_worker, self.store, m.worker_id, now,
                             f"worker {m.worker_id} {how}") or []
        for r in recovered:
            self.log.warning("%s: taken back from worker %s, which %s; now %s", r.task_id,
                             m.worker_id, how, r.status)
        if m.phase != Phase.RUNNING:
            self.log.info("worker %s %s (%s)", m.worker_id, how, m.phase.value)
        elif started:
            self.log.warning("worker %s (pid %d) %s unexpectedly; see %s", m.worker_id,
                             m.process.pid, how, self._worker_log(m.worker_id))
        else:
            self._startup_failed(now, f"worker {m.worker_id} {how} before it was ready; "
                                      f"see {self._worker_log(m.worker_id)}")

    def _startup_failed(self, now: datetime, message: str) -> None:
        self._failures += 1
        self._last_failure_at = now
        self._last_failure = message
        self.log.warning("%s (%d start-up failure%s in a row; next start in %gs)", message,
                         self._failures, "" if self._failures == 1 else "s", self._backoff_s())

    def _worker_log(self, worker_id: str) -> Path:
        return self.settings.worker_logs_dir / f"{worker_id}.log"

    # -- deadlines and recovery --------------------------------------------------------------
    def _enforce_deadlines(self, now: datetime) -> None:
        """Kill workers stuck past a deadline: a task over its time limit, a retirement not
        obeyed, a start that never finished."""
        grace = self.tuning.overdue_grace_s
        for task in queue.running_task_deadlines(self.store):
            m = self.workers.get(task.worker_id or "")
            if m is None or m.phase == Phase.KILLED or task.started_at is None:
                continue
            over_s = (now - task.started_at).total_seconds() - task.timeout_s
            if over_s <= grace:
                continue
            self.log.warning("%s ran %gs past its %gs limit; killing worker %s (pid %d)",
                             task.task_id, over_s, task.timeout_s, m.worker_id, m.process.pid)
            self._kill(m, now)
            self._db(queue.fail, self.store, task.task_id, m.worker_id,
                     f"timed out after {task.timeout_s:g} s", now, kind="timeout", retry=False)
        stop_limit_s = self.settings.drain_grace_s + self.tuning.drain_margin_s
        for m in list(self.workers.values()):
            if m.phase == Phase.RETIRING and m.signalled_at is not None and \
                    (now - m.signalled_at).total_seconds() > stop_limit_s:
                self.log.warning("worker %s did not stop within %gs of SIGTERM; killing it",
                                 m.worker_id, stop_limit_s)
                self._kill(m, now)
            elif m.phase == Phase.RUNNING and not m.ready and \
                    (now - m.started_at).total_seconds() > self.tuning.startup_timeout_s:
                self._kill(m, now)
                self._startup_failed(
                    now, f"worker {m.worker_id} was not ready {self.tuning.startup_timeout_s:g}s "
                         f"after its start and was killed; see {self._worker_log(m.worker_id)}")

    def _maintain(self, now: datetime) -> None:
        """Recover what vanished without our noticing: expired leases, silent worker rows."""
        for r in queue.requeue_expired(self.store, now):
            self.log.warning("%s: its worker stopped renewing the lease; now %s", r.task_id,
                             r.status)
        lost = queue.mark_silent_workers_offline(self.store, now, self.settings.lease_s,
                                                 keep=list(self.workers))
        if lost:
            self.log.info("marked silent workers offline: %s", ", ".join(lost))
        interval = min(self.tuning.maintenance_s, self.settings.lease_s / 2)
        self._next_maintenance = now + timedelta(seconds=interval)

    def write_stats(self, now: datetime) -> None:
        """Write the seed's statistics block to the pool log now."""
        self._stats_log.info("pool statistics\n%s", stats_block(queue.stats(self.store)))
        self._next_stats = now + timedelta(seconds=self.settings.stats_interval_s)

    # -- stopping ----------------------------------------------------------------------------
    def request_stop(self, force: bool = False) -> None:
        """Ask the loop to stop: the first request drains, a second (or ``force``) forces.
        Safe in a signal handler and from any thread."""
        self._stop_requests += 1
        if force:
            self._force = True
        self._poke()

    @property
    def stop_requested(self) -> bool:
        return self._stop_requests > 0

    @property
    def forced(self) -> bool:
        return self._force or self._stop_requests >= 2

    def stop_workers(self, *, force: bool = False) -> None:
        """Stop every managed worker and wait for them (outer-loop code: reads the clock).

        SIGTERM lets each finish its task (it gives the task back after ``drain_grace_s``);
        whoever still runs ``drain_grace_s`` + a margin later is killed with its process group
        and its task re-queued. ``force`` (or a second stop request meanwhile) sends the second
        SIGTERM: tasks go back at once.
        """
        if not self.workers:
            return
        now = self.clock()
        for m in self.workers.values():
            if m.phase == Phase.RUNNING:
                m.process.terminate()
                m.phase, m.signalled_at = Phase.STOPPING, now
        self.log.info("stopping %d workers; running tasks get up to %gs to finish",
                      len(self.workers), self.settings.drain_grace_s)
        start = time.monotonic()
        deadline = start + self.settings.drain_grace_s + self.tuning.drain_margin_s
        forced_at: float | None = None
        killed_at: float | None = None
        while True:
            self._reap(self.clock())
            if not self.workers:
                break
            mono = time.monotonic()
            # the second SIGTERM goes a moment after the first: signals sent back to back
            # can merge into one
            if forced_at is None and (force or self.forced) and mono - start >= 0.1:
                forced_at = mono
                self.log.warning("forced stop: workers give their tasks back now")
                for m in self.workers.values():
                    if m.phase != Phase.KILLED:
                        m.process.terminate()
                deadline = min(deadline, mono + self.tuning.force_wait_s)
            if killed_at is None and mono >= deadline:
                killed_at = mono
                self.log.warning("killing %d workers that did not stop in time: %s",
                                 len(self.workers), ", ".join(self.workers))
                for m in self.workers.values():
                    self._kill(m, self.clock())
            if killed_at is not None and mono - killed_at > 10:
                self.log.error("workers %s did not die after SIGKILL; giving up on them",
                               ", ".join(self.workers))
                break
            self._waker.wait(0.05)
        if self.is_leader:
            self._publish_health(self.clock(), self.last_decision)

    # -- the loop --------------------------------------------------------------------------
    def run(self) -> int:
        """Stand by until leading, supervise until told to stop, drain, resign. Returns 0."""
        if not self._wait_for_leadership():
            return 0
        try:
            self._lead()
        finally:
            try:
                self.stop_workers(force=self.forced)
                self._db(self.write_stats, self.clock())
            finally:
                self.resign()
        return 0

    def _wait_for_leadership(self) -> bool:
        announced = False
        while not self.stop_requested:
            if self.try_lead():
                return True
            holder = read_holder(self.settings.run_dir)
            self._health = {**self._health, "leader": False,
                            "leader_pid": holder.pid if holder else None}
            if not announced:
                announced = True
                self.log.info("the pool for %s is supervised by pid %s; standing by to take "
                              "over", self.settings.home, holder.pid if holder else "?")
            self._waker.wait(self.tuning.lock_retry_s)
        return False

    def _lead(self) -> None:
        while not self.stop_requested:
            try:
                self.tick(self.clock())
                self._last_error = None
            except Exception as exc:  # the store may be back at the next tick
                message = f"{type(exc).__name__}: {exc}"
                if message != self._last_error:
                    self._last_error = message
                    self.log.exception("supervisor tick failed; trying again")
            if self._sleep(self.tuning.tick_s) and self.tuning.settle_s > 0:
                self._waker.wait(self.tuning.settle_s)  # ends early only on a stop request

    def _sleep(self, timeout_s: float) -> bool:
        """Wait for new work, a stop request or the timeout; True when woken early."""
        listener = self._listener
        if listener is not None:
            return listener.wait(timeout_s)
        return self._waker.wait(timeout_s)

    def _poke(self) -> None:
        self._waker.poke()
        listener = self._listener
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.poke()

    def close(self) -> None:
        """Release everything: stop any worker still managed (forcing), resign, close."""
        if self.workers:
            self.stop_workers(force=True)
        self.resign()
        self._waker.close()

    # -- health and logs ---------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        """Leader or not, workers by state, start-up failures, the last decision. Thread-safe
        (it returns what the supervisor's thread published last)."""
        return dict(self._health)

    def _publish_health(self, now: datetime, decision: Decision | None) -> None:
        by_state = {"starting": 0, "idle": 0, "busy": 0, "retiring": 0, "stopping": 0,
                    "killed": 0}
        for m in self.workers.values():
            if m.phase != Phase.RUNNING:
                by_state[m.phase.value] += 1
            elif m.status in by_state:
                by_state[m.status] += 1
        next_start_in = 0.0
        if self._failures and self._last_failure_at is not None:
            next_start_in = max(0.0, self._backoff_s() -
                                (now - self._last_failure_at).total_seconds())
        last_change = self.history[-1] if self.history else None
        self._health = {
            "leader": self.is_leader,
            "pid": os.getpid(),
            "role": self.role,
            "home": str(self.settings.home),
            "stopping": self.stop_requested,
            "workers": {**by_state, "total": len(self.workers)},
            "managed": [{"worker_id": m.worker_id, "pid": m.process.pid, "phase": m.phase.value,
                         "status": m.status} for m in self.workers.values()],
            "crash_loop": {
                "active": self._failures > 0,
                "failures_in_a_row": self._failures,
                "backoff_s": self._backoff_s(),
                "next_start_in_s": round(next_start_in, 3),
                "last_failure": self._last_failure,
            },
            "last_decision": decision.as_dict() if decision else None,
            "last_change": ({"at": last_change[0].isoformat() + "Z", **last_change[1].as_dict()}
                            if last_change else None),
            "last_tick": now.isoformat() + "Z",
            "last_error": self._last_error,
            "scaling": dict(self.scaling),
        }

    def _attach_pool_log(self) -> None:
        """Make sure the supervisor's lines (and the statistics) reach ``logs/worker_pool.log``
        even when the process logs elsewhere (the MCP server logs to mcp_server.log)."""
        logger = logging.getLogger(LOGGER_NAME)
        if logger.level == logging.NOTSET:
            logger.setLevel(self.settings.log_level)
        logging.getLogger(STATS_LOGGER_NAME).setLevel(logging.INFO)
        path = (self.settings.logs_dir / POOL_LOG).absolute()
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.FileHandler) and \
                    Path(handler.baseFilename).absolute() == path:
                return  # `koubou-mcp pool` logs there already
        try:
            make_private_dir(path.parent)
            os.close(os.open(path, os.O_CREAT | os.O_APPEND | os.O_WRONLY, 0o600))
            handler = logging.FileHandler(path, encoding="utf-8")
        except OSError as exc:
            self.log.warning("cannot write %s: %s", path, exc)
            return
        handler.setFormatter(logging.Formatter(
            "%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s"))
        handler.addFilter(_HomeFilter(str(self.settings.home)))
        logger.addHandler(handler)
        self._log_handler = handler

    def _detach_pool_log(self) -> None:
        handler, self._log_handler = self._log_handler, None
        if handler is not None:
            logging.getLogger(LOGGER_NAME).removeHandler(handler)
            handler.close()

    def _db(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """A store call whose failure must not stop what we are doing (reaping, stopping):
        logged, None returned."""
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            self.log.error("%s failed: %s: %s", getattr(fn, "__name__", fn),
                           type(exc).__name__, exc)
            return None


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name}"
    return f"exited with code {code}"


# -- running it -------------------------------------------------------------------------------

def run_pool(settings: Settings) -> int:
    """``koubou-mcp pool``: supervise in the foreground until SIGTERM/SIGINT (a second one
    forces). Stands by while another supervisor holds this home. Returns the exit code."""
    store = open_store(settings.database_url, settings.run_dir)
    supervisor = Supervisor(settings, store, role="pool")

    def on_signal(signum: int, frame: Any) -> None:
        supervisor.request_stop()  # only flags and a pipe write: the loop does the work

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return supervisor.run()
    except OSError as exc:
        log.error("the pool cannot run: %s", exc)
        return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        supervisor.close()
        store.close()


class PoolHandle:
    """A supervisor running in a background thread of this process (see ``start_in_thread``)."""

    def __init__(self, supervisor: Supervisor, thread: threading.Thread) -> None:
        self.supervisor = supervisor
        self.thread = thread

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
        self.supervisor.request_stop(force=not drain)
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
    supervisor = Supervisor(settings, the_store, role=role, tuning=tuning, launcher=launcher)

    def target() -> None:
        try:
            supervisor.run()
        except Exception:
            log.exception("the worker pool stopped on an error")
        finally:
            try:
                supervisor.close()  # stops any worker left (forcing) and releases the lock
            finally:
                if own_store:
                    the_store.close()

    thread = threading.Thread(target=target, name="koubou-supervisor", daemon=True)
    thread.start()
    return PoolHandle(supervisor, thread)


# -- stopping a pool from outside -------------------------------------------------------------

def stop_pool(settings: Settings, timeout_s: float, *, out: TextIO | None = None,
              err: TextIO | None = None) -> int:
    """``koubou-mcp stop``: SIGTERM the ``koubou-mcp pool`` of this home and wait for it to
    drain. After ``timeout_s`` it is asked again (which forces). Exit code 0 once it is gone;
    1 when no pool runs, the pid is not a koubou-mcp pool, or it would not stop."""
    out = out or sys.stdout
    err = err or sys.stderr
    run_dir = settings.run_dir
    if not lock_is_held(run_dir):
        print(f"koubou-mcp: no pool is running for {settings.home} "
              f"(nothing holds {run_dir / LOCK_FILE})", file=err)
        return 1
    holder = read_holder(run_dir)
    if holder is None:
        print(f"koubou-mcp: a supervisor holds {run_dir / LOCK_FILE} but {run_dir / PID_FILE} "
              "is missing or unreadable; cannot tell which process to stop", file=err)
        return 1
    if holder.role != "pool":
        print(f"koubou-mcp: the pool for {settings.home} runs inside a koubou-mcp {holder.role} "
              f"(pid {holder.pid}); it stops when that process exits", file=err)
        return 1
    cmdline = process_cmdline(holder.pid)
    if cmdline is not None and not any("koubou" in arg for arg in cmdline):
        print(f"koubou-mcp: pid {holder.pid} in {run_dir / PID_FILE} is not koubou-mcp "
              f"({' '.join(cmdline)[:120]}); not signalling it", file=err)
        return 1
    try:
        os.kill(holder.pid, signal.SIGTERM)
    except ProcessLookupError:
        print(f"the pool (pid {holder.pid}) had already stopped", file=out)
        return 0
    print(f"stopping the pool (pid {holder.pid}); running tasks get up to "
          f"{settings.drain_grace_s:g}s to finish", file=out, flush=True)
    if _wait_gone(holder.pid, timeout_s):
        print("pool stopped", file=out)
        return 0
    print(f"koubou-mcp: the pool did not stop within {timeout_s:g}s; forcing it (running tasks "
          "go back to the queue)", file=err, flush=True)
    with contextlib.suppress(ProcessLookupError):
        os.kill(holder.pid, signal.SIGTERM)
    tuning = Tuning()
    if _wait_gone(holder.pid, tuning.force_wait_s + tuning.drain_margin_s + 10.0):
        print("pool stopped (forced)", file=out)
        return 0
    print(f"koubou-mcp: the pool (pid {holder.pid}) is still running; see "
          f"{settings.logs_dir / POOL_LOG}", file=err)
    return 1


def process_cmdline(pid: int) -> list[str] | None:
    """The argv of ``pid`` from /proc, or None where /proc cannot tell."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def process_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
    except (OSError, IndexError):
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _wait_gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while process_alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)  # another process: nothing to wait on but its disappearance
    return True


__all__ = [
    "Holder", "LeaderLock", "Managed", "Phase", "PoolHandle", "PopenWorker", "ProcessLauncher",
    "Supervisor", "Tuning", "WorkerProcess", "lock_is_held", "read_holder", "run_pool",
    "start_in_thread", "stop_pool",
]


def kill_orphaned_groups(directory: Path) -> list[int]:
    """SIGKILL the process groups a dead worker noted in ``directory`` (its Codex children run
    in sessions of their own and would outlive it), then remove the notes."""
    killed: list[int] = []
    try:
        entries = list(directory.iterdir())
    except FileNotFoundError:
        return killed
    for entry in entries:
        if entry.name.isdigit():
            try:
                os.killpg(int(entry.name), signal.SIGKILL)
                killed.append(int(entry.name))
            except (ProcessLookupError, PermissionError):
                pass  # already gone
        with contextlib.suppress(OSError):
            entry.unlink()
    with contextlib.suppress(OSError):
        directory.rmdir()
    return killed
