"""The control loop of the worker pool: what to do, at ``now``, to keep the right workers alive.

The supervisor never reads the clock and never waits: ``pool.py`` runs it in time (every
``Tuning.tick_s``, at once on new work) and only while it holds the home's leader lock
(``leader.py``). One ``tick(now)``:

1. reaps exited workers: a worker that died holding a task gets it back in the queue at once
   (``queue.requeue_worker``), not when its lease runs out; its row goes ``offline``, and the
   Codex process groups it left (``processes.GroupLedger``) are killed;
2. every few seconds, gives back tasks whose lease expired (workers that vanished unnoticed,
   maybe on another machine) and marks silent worker rows offline;
3. kills (SIGKILL, whole process group) a worker whose task ran past ``timeout_s`` plus a grace,
   and fails that task ("timed out after N s", not retried); also a worker that ignored its
   retirement, that never finished starting, or that hangs (no heartbeat for a whole lease
   while the store answered us: it would hold its place in the pool for ever);
4. counts the processes it manages (never rows) as starting, idle or busy, asks the policy
   (``scaling.decide``) and applies the answer, braked by ``scaling.CrashBackoff`` while workers
   keep dying at start-up: spawn workers, or SIGTERM idle ones (they exit);
5. every ``stats_interval_s`` writes the statistics block to the pool log (``report.StatsLog``).

Stopping the workers (SIGTERM, a second SIGTERM, SIGKILL) is timed by ``pool.drain``; each
exit is then reaped like any other.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from koubou_mcp import queue
from koubou_mcp.config import Settings
from koubou_mcp.leader import LeaderLock, read_holder
from koubou_mcp.models import WorkerSnapshot, WorkerStatus
from koubou_mcp.processes import (
    GroupLedger,
    Launcher,
    Managed,
    ManagedWorkers,
    Phase,
    ProcessLauncher,
    describe_exit,
)
from koubou_mcp.report import StatsLog
from koubou_mcp.scaling import CrashBackoff, Decision, DecisionLog, IdleWorker, Policy, Snapshot, decide
from koubou_mcp.store import Store

LOGGER_NAME = "koubou_mcp.supervisor"
log = logging.getLogger(LOGGER_NAME)

@dataclass(frozen=True)
class Tuning:
    """Internal timings of the pool: the supervisor's deadlines and policy, and the pace
    ``pool.py`` runs it at. The defaults suit production; tests and benchmarks change them
    (``policy`` lets a benchmark run the seed's rule through the same machinery)."""

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


class Supervisor:
    """Keeps the right number of workers alive for one store. See the module docstring."""

    def __init__(self, settings: Settings, store: Store, *, launcher: Launcher | None = None,
                 role: str = "pool", tuning: Tuning | None = None) -> None:
        self.settings = settings
        self.store = store
        self.launcher: Launcher = launcher or ProcessLauncher(settings)
        self.role = role
        self.tuning = tuning or Tuning()
        self.workers = ManagedWorkers()
        self.leader_lock = LeaderLock(settings.run_dir)
        self.backoff = CrashBackoff(self.tuning.crash_backoff_base_s,
                                    self.tuning.crash_backoff_cap_s)
        self.stats_log = StatsLog(str(settings.home), settings.stats_interval_s)
        self.decisions = DecisionLog()
        self.log = logging.LoggerAdapter(log, {"koubou_home": str(settings.home)})
        #: the pool is stopping its workers (``pool.drain``)
        self.stopping = False
        #: the last failed tick, as its hosting loop reported it
        self.last_error: str | None = None
        self._next_maintenance: datetime | None = None
        #: since when ticks came without a gap and the store answered each (``_watched``)
        self._watching_since: datetime | None = None
        self._last_tick: datetime | None = None
        self._health: dict[str, Any] = {"leader": False, "pid": os.getpid(), "role": role,
                                        "home": str(settings.home)}

    # -- leadership ----------------------------------------------------------------------
    @property
    def is_leader(self) -> bool:
        return self.leader_lock.held

    def try_lead(self) -> bool:
        """Become the pool's supervisor if no one else is. True when this one leads; else its
        health names the leader."""
        if self.is_leader:
            return True
        if not self.leader_lock.acquire(self.role):
            holder = read_holder(self.settings.run_dir)
            self._health = {**self._health, "leader": False,
                            "leader_pid": holder.pid if holder else None}
            return False
        self._next_maintenance = None
        self.stats_log.restart()
        s = self.settings
        self.log.info(
            "supervising the worker pool for %s (pid %d, role %s; min %d, max %d, threshold %g, "
            "idle timeout %gs)", s.home, os.getpid(), self.role, s.min_workers, s.max_workers,
            s.scale_up_threshold, s.idle_timeout_s,
        )
        return True

    def resign(self) -> None:
        """Give up leadership (after ``pool.drain``): a standing-by supervisor takes over."""
        if not self.is_leader:
            return
        self.log.info("no longer supervising the pool for %s", self.settings.home)
        self.leader_lock.release()
        self._health = {**self._health, "leader": False}

    # -- one decision ----------------------------------------------------------------------
    def tick(self, now: datetime) -> Decision:
        """Reap, recover, enforce deadlines, decide and apply, at time ``now``. Leader only."""
        if not self.is_leader:
            raise RuntimeError("tick() needs leadership; call try_lead() first")
        self.reap(now)
        try:
            if self._next_maintenance is None or now >= self._next_maintenance:
                self._maintain(now)
            rows = {w.worker_id: w for w in queue.list_workers(self.store)}
        except Exception:
            self._watching_since = None
            raise
        self._watched(now)
        self._observe(rows)
        self._enforce_deadlines(now)
        self._kill_hung(rows, now)
        decision = self.tuning.policy(self.snapshot(rows, now), self.settings)
        self._apply(decision, now)
        if self.stats_log.due(now):
            self.write_stats(now)
        self.publish_health(now)
        return decision

    def snapshot(self, rows: Mapping[str, WorkerSnapshot], now: datetime) -> Snapshot:
        """Our running workers by state (from their rows) and the ready tasks, for the policy.

        Retiring, stopping and killed workers are on their way out: they are not capacity.
        """
        busy = starting = 0
        idle: list[IdleWorker] = []
        for m in self.workers.running():
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
        # the model server's slots cap the pool: a worker beyond them would only wait
        server = queue.model_server(self.store, self.settings.ollama_url, now)
        slots = server.capacity.limit if server is not None else None
        return Snapshot(ready_pending=ready, busy=busy, starting=starting, idle=tuple(idle),
                        slots=slots)

    def _observe(self, rows: Mapping[str, WorkerSnapshot]) -> None:
        for m in self.workers.values():
            row = rows.get(m.worker_id)
            if row is None:
                m.status = WorkerStatus.OFFLINE.value if m.ready else WorkerStatus.STARTING.value
                continue
            m.status = row.status
            if not m.ready and row.status in (WorkerStatus.IDLE.value, WorkerStatus.BUSY.value):
                m.ready = True
                if self.backoff.clear():
                    self.log.info("worker %s started fine; start-up backoff cleared",
                                  m.worker_id)

    def _apply(self, decision: Decision, now: datetime) -> None:
        if decision.changes:
            self.log.info("scale: %s", decision.reason)
        retired = sum(self._retire(worker_id, now) for worker_id in decision.retire)
        spawns = self.backoff.allowed_starts(decision.spawn, now, probing=self.workers.probing)
        if spawns < decision.spawn and self.backoff.first_wait(now):
            self.log.warning("workers keep failing at start-up (%d in a row); next start in %gs. "
                             "Last: %s", self.backoff.failures, self.backoff.delay_s,
                             self.backoff.last_failure)
        started = sum(self._spawn(now) for _ in range(spawns))
        self.decisions.record(now, decision, started=started, retired=retired)

    def _spawn(self, now: datetime) -> bool:
        worker_id = queue.new_worker_id(now)
        while worker_id in self.workers:
            worker_id = queue.new_worker_id(now)
        try:
            process = self.launcher(worker_id)
        except OSError as exc:
            self._startup_failed(now, f"cannot start a worker: {exc}")
            return False
        self.workers[worker_id] = Managed(worker_id, process, now)
        self.log.info("started worker %s (pid %d)", worker_id, process.pid)
        return True

    def _retire(self, worker_id: str, now: datetime) -> bool:
        m = self.workers.get(worker_id)
        if m is None or m.phase != Phase.RUNNING:
            return False
        m.terminate(Phase.RETIRING, now)
        self._db(queue.set_worker_status, self.store, worker_id, WorkerStatus.STOPPING, now)
        self.log.info("retiring idle worker %s (pid %d)", worker_id, m.process.pid)
        return True

    # -- exits -----------------------------------------------------------------------------
    def reap(self, now: datetime) -> None:
        """Handle the workers that exited: their tasks back to the queue, their rows offline."""
        for m, code in self.workers.exited():
            self._reaped(m, code, now)

    def _reaped(self, m: Managed, code: int, now: datetime) -> None:
        how = describe_exit(code)
        for pgid in GroupLedger(self.settings.child_groups_dir(m.worker_id)).kill_all():
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
        self.backoff.failed(now, message)
        n = self.backoff.failures
        self.log.warning("%s (%d start-up failure%s in a row; next start in %gs)", message, n,
                         "" if n == 1 else "s", self.backoff.delay_s)

    def _worker_log(self, worker_id: str) -> str:
        return str(self.settings.worker_log(worker_id))

    # -- deadlines and recovery --------------------------------------------------------------
    def _enforce_deadlines(self, now: datetime) -> None:
        """Kill workers stuck past a deadline: a task over its time limit, a retirement not
        obeyed, a start that never finished."""
        for task in queue.running_task_deadlines(self.store):
            m = self.workers.get(task.worker_id or "")
            if m is None or m.phase == Phase.KILLED or task.started_at is None:
                continue
            # time spent before the first token may have been a wait inside the model server,
            # which the worker does not count against the limit either
            over_s = ((now - task.started_at).total_seconds() - task.timeout_s
                      - (task.first_token_s or 0.0))
            if over_s <= self.tuning.overdue_grace_s:
                continue
            self.log.warning("%s ran %gs past its %gs limit; killing worker %s (pid %d)",
                             task.task_id, over_s, task.timeout_s, m.worker_id, m.process.pid)
            m.kill(now)
            self._db(queue.fail, self.store, task.task_id, m.worker_id,
                     f"timed out after {task.timeout_s:g} s", now, kind="timeout", retry=False)
        stop_limit_s = self.settings.drain_grace_s + self.tuning.drain_margin_s
        for m in list(self.workers.values()):
            if m.phase == Phase.RETIRING and m.signalled_at is not None and \
                    (now - m.signalled_at).total_seconds() > stop_limit_s:
                self.log.warning("worker %s did not stop within %gs of SIGTERM; killing it",
                                 m.worker_id, stop_limit_s)
                m.kill(now)
            elif m.phase == Phase.RUNNING and not m.ready and \
                    (now - m.started_at).total_seconds() > self.tuning.startup_timeout_s:
                m.kill(now)
                self._startup_failed(
                    now, f"worker {m.worker_id} was not ready {self.tuning.startup_timeout_s:g}s "
                         f"after its start and was killed; see {self._worker_log(m.worker_id)}")

    def _watched(self, now: datetime) -> None:
        """Note a tick at ``now`` whose store reads worked. A gap of half a lease since the
        last tick (this process stalled: a store call that waited for a lock, a machine that
        slept) starts the watch again, like a failed tick: the workers' heartbeats may have
        waited for the same thing."""
        gap_s = None if self._last_tick is None else (now - self._last_tick).total_seconds()
        if self._watching_since is None or (gap_s is not None and
                                            gap_s > self.settings.lease_s / 2):
            self._watching_since = now
        self._last_tick = now

    def _kill_hung(self, rows: Mapping[str, WorkerSnapshot], now: datetime) -> None:
        """Kill a running worker whose row had no heartbeat for a whole lease.

        Its watchdog beats every ``heartbeat_s`` whatever the worker is doing, so silence this
        long means the process is stuck (stopped, deadlocked): its task's lease runs out and
        the task goes back, but the process would keep its place in the pool for ever, and
        with ``max_workers`` reached nothing would run. Silence only counts within a watch
        (``_watched``) a lease long: after a store outage or a stall of ours, the workers get
        a lease to be heard again."""
        lease_s = self.settings.lease_s
        if self._watching_since is None or \
                (now - self._watching_since).total_seconds() < lease_s:
            return
        for m in list(self.workers.values()):
            row = rows.get(m.worker_id)
            if m.phase != Phase.RUNNING or not m.ready or row is None:
                continue
            silent_s = (now - row.last_heartbeat).total_seconds()
            if silent_s > lease_s:
                self.log.warning("worker %s (pid %d) sent no heartbeat for %.0fs (a lease is "
                                 "%gs): it hangs; killing it", m.worker_id, m.process.pid,
                                 silent_s, lease_s)
                m.kill(now)

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
        self.stats_log.write(queue.stats(self.store), now)

    def close(self, now: datetime) -> None:
        """Resign and release. Stop the workers first (``pool.drain``): any still here are
        killed rather than left unsupervised."""
        if self.workers:
            self.log.warning("killing %d workers still running: %s", len(self.workers),
                             ", ".join(self.workers))
        self.workers.kill_all(now)
        self.reap(now)
        self.resign()

    # -- health ------------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        """Leader or not, workers by state, start-up failures, the last decision. Thread-safe
        (it returns what the supervisor's thread published last)."""
        return dict(self._health)

    def publish_health(self, now: datetime) -> None:
        """Make the state at ``now`` what ``health`` returns (from the supervisor's thread)."""
        self._health = {
            "leader": self.is_leader, "pid": os.getpid(), "role": self.role,
            "home": str(self.settings.home), "stopping": self.stopping,
            "workers": {**self.workers.by_state(), "total": len(self.workers)},
            "managed": [{"worker_id": m.worker_id, "pid": m.process.pid, "phase": m.phase.value,
                         "status": m.status} for m in self.workers.values()],
            "crash_loop": self.backoff.as_dict(now),
            **self.decisions.as_dict(),
            "last_tick": now.isoformat() + "Z",
            "last_error": self.last_error,
        }

    def _db(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """A store call whose failure must not stop what we are doing (reaping, stopping):
        logged, None returned."""
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            self.log.error("%s failed: %s: %s", getattr(fn, "__name__", fn),
                           type(exc).__name__, exc)
            return None


__all__ = ["LOGGER_NAME", "Supervisor", "Tuning"]
