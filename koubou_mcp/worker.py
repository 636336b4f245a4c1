"""The worker process: claim a task, run it on its backend under its time limit, record the end.

One task at a time, on one thread that blocks in the backend call: no event loop and no
thread hop on the hot path (see docs/benchmarks.md for what that saved). Beside it the
watchdog thread (``watchdog``) renews the lease every ``heartbeat_s``, notices a cancel
request or a lost lease, and enforces the time limit; it stops a task by aborting its backend
call, which ends at once. Completing a task and claiming the next is one transaction
(``queue.complete_and_admit``). Idle, the worker sleeps on its wake-up channel (no busy
polling); its safety-net poll grows while nothing happens (``IdleWait``).

Stopping (signal handlers only set flags and abort; this loop does the work):
* first SIGTERM/SIGINT: finish the current task (up to ``drain_grace_s``), then exit;
* second: abort the current task, give it back to the queue, exit.
A worker started by a supervisor also exits, after its current task, once that supervisor is
gone (it would otherwise outlive a killed server).
"""

from __future__ import annotations

import logging
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from types import FrameType
from typing import ParamSpec, TypeVar

from koubou_mcp import queue
from koubou_mcp.admission import Observation
from koubou_mcp.backends.base import (
    Aborted,
    Backend,
    BackendError,
    BackendRequest,
    GenerationProgress,
    PermanentBackendError,
)
from koubou_mcp.backends.codex import CodexBackend
from koubou_mcp.backends.ollama import OllamaBackend
from koubou_mcp.config import Settings
from koubou_mcp.models import TaskSnapshot, TaskType, WorkerStatus, utcnow
from koubou_mcp.processes import become_subreaper
from koubou_mcp.store import Store, is_store_fault
from koubou_mcp.taskfiles import FileRefused, prompt_with_files, read_files
from koubou_mcp.watchdog import Interrupt, Run, Watchdog, WatchdogHooks

log = logging.getLogger("koubou_mcp.worker")

Clock = Callable[[], datetime]
P = ParamSpec("P")
R = TypeVar("R")


def build_backends(settings: Settings, worker_id: str) -> dict[str, Backend]:
    """One backend per task type, as configured."""
    return {
        TaskType.GENERAL.value: OllamaBackend(settings.ollama_url, settings.general_model),
        TaskType.CODE.value: CodexBackend(
            settings.codex_bin, settings.code_model, settings.ollama_url,
            settings.codex_sandbox, str(settings.workdir), env=settings.codex_env,
            groups_dir=str(settings.child_groups_dir(worker_id)),
            # the -o files live beside the group notes, so whoever reaps a SIGKILLed worker
            # (GroupLedger.kill_all) removes them with the notes
            output_dir=str(settings.child_groups_dir(worker_id)),
        ),
    }



@dataclass
class StopState:
    """Set by signal handlers, read by the loops."""

    draining: bool = False
    forced: bool = False
    drain_started: float | None = None
    requests: int = 0

    def sleep(self, seconds: float) -> None:
        """Sleep, but wake within a tenth of a second when a stop is forced."""
        deadline = time.monotonic() + seconds
        while not self.forced and (left := deadline - time.monotonic()) > 0:
            time.sleep(min(left, 0.1))


#: after a store fault, the worker waits about this long before trying again (doubling)
STORE_RETRY_BASE_S = 0.2
STORE_RETRY_MAX_S = 5.0

#: after HTTP 503 "busy", a task waits about this long (doubling while the server stays busy)
BUSY_RETRY_BASE_S = 0.5
BUSY_RETRY_MAX_S = 10.0


class IdleWait:
    """How long an idle worker sleeps before it looks again with no wake-up: ``poll_s`` at
    first, doubling while nothing happens up to ``poll_max_s`` (never below ``poll_s``), and
    ``poll_s`` again after work or a wake-up.

    Wake-ups bring the work; the poll is a safety net (a wake-up lost with a dropped
    connection, a submitter whose wake-ups do not reach this host). Every time a sleeping
    process wakes it pays for it (about 0.8 ms of CPU after a 1 s sleep on our 2-core test
    machine, see docs/benchmarks.md), so a pool that stays quiet looks less and less often.
    """

    def __init__(self, poll_s: float, poll_max_s: float) -> None:
        self.poll_s = poll_s
        self.poll_max_s = max(poll_s, poll_max_s)
        self.wait_s = poll_s

    def waited(self, *, woken: bool) -> None:
        """A wait ended: in a wake-up (start over) or in its timeout (wait longer)."""
        self.wait_s = self.poll_s if woken else min(self.wait_s * 2, self.poll_max_s)

    def reset(self) -> None:
        """Work was found: the next quiet spell starts from ``poll_s``."""
        self.wait_s = self.poll_s


class Worker:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        worker_id: str,
        backends: Mapping[str, Backend],
        *,
        supervisor_pid: int | None = None,
        clock: Clock = utcnow,
        max_tasks: int | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        # the loop's own transactions (claims, hand-overs) run on one kept connection, the
        # watchdog thread's heartbeats on another (a thread each: a connection is not shared)
        self.hot = store.pinned()
        self.beats = store.pinned()
        self.worker_id = worker_id
        self.backends = backends
        self.supervisor_pid = supervisor_pid
        self.clock = clock
        self.max_tasks = max_tasks
        self.stop_state = StopState()
        self.current: Run | None = None
        self.tasks_done = 0
        # one_of_many: a new task wakes one idle worker, not every one (where the store can)
        self._listener = store.wakeup.listen(worker_id, one_of_many=True)
        self._rng = random.Random()
        self.model_url = settings.ollama_url
        self._busy_streak = 0
        self._faults = threading.Lock()  # both threads note store faults
        self._store_down_since: float | None = None
        self._store_faults = 0
        self._last_recovery = 0.0
        #: the last wait ended in a wake-up: new work is likely there (PostgreSQL claims at
        #: once, without a look first)
        self._woken = False
        #: the last hand-over found no next task and looked after its commit: none ready
        self._nothing_ready = False
        self._idle = IdleWait(settings.poll_s, settings.poll_max_s)
        self.watchdog = Watchdog(WatchdogHooks(
            current=lambda: self.current, beat=self._beat,
            drain_started=lambda: self.stop_state.drain_started,
            drain_grace_s=settings.drain_grace_s, heartbeat_s=settings.heartbeat_s,
            clock=clock, idle_beat_s=settings.lease_s / 3,
        ))

    # -- stopping ------------------------------------------------------------------------
    def request_stop(self, signum: int | None = None, frame: FrameType | None = None) -> None:
        """The stop signals' handler: the first drains, the second forces. Only flags, an
        abort and a poke: nothing here may block or take a lock the loop could hold."""
        state = self.stop_state
        state.requests += 1
        if state.requests == 1:
            state.draining = True
            state.drain_started = time.monotonic()
            log.info("stop requested: finishing the current task, then exiting")
        else:
            state.forced = True
            log.warning("second stop request: giving the current task back and exiting")
            current = self.current
            if current is not None:
                current.stop(Interrupt.STOP)
        self._listener.poke()
        self.watchdog.poke()

    def _supervisor_gone(self) -> bool:
        return self.supervisor_pid is not None and os.getppid() != self.supervisor_pid

    def _should_exit(self) -> bool:
        if self.stop_state.draining:
            return True
        if self._supervisor_gone():
            log.warning("the supervisor (pid %s) is gone; exiting", self.supervisor_pid)
            return True
        return self.max_tasks is not None and self.tasks_done >= self.max_tasks

    def _may_take_another(self) -> bool:
        """Whether, after the task just counted in ``tasks_done``, this worker goes on (so it
        may claim the next with the record of this one)."""
        state = self.stop_state
        if state.draining or self._supervisor_gone():
            return False
        return self.max_tasks is None or self.tasks_done < self.max_tasks

    # -- main loop -----------------------------------------------------------------------
    def run(self) -> None:
        """Serve tasks until told to stop (call from the main thread: it takes the signals)."""
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self.request_stop)
        self._store(queue.register_worker, self.store, self.worker_id, os.getpid(),
                    self.clock(), self.settings.hostname)
        self._store(queue.configure_model_server, self.store, self.model_url,
                    self.settings.ollama_parallel or None, self.clock())
        log.info("worker %s started (pid %d)", self.worker_id, os.getpid())
        self.watchdog.start()
        try:
            self._serve()
        finally:
            self.watchdog.stop()
            try:
                queue.mark_worker_offline(self.store, self.worker_id, self.clock())
            except Exception as exc:  # the store is down: the row goes silent instead
                if not is_store_fault(exc):
                    raise
                log.warning("could not mark this worker offline: %s", _fault_text(exc))
            for backend in self.backends.values():
                backend.close()
            self._listener.close()
            self.hot.close()
            self.beats.close()
            log.info("worker %s stopped after %d tasks", self.worker_id, self.tasks_done)

    def _serve(self) -> None:
        self._store(queue.set_worker_status, self.store, self.worker_id, WorkerStatus.IDLE,
                    self.clock())
        self._last_recovery = time.monotonic()
        admitted: queue.Admitted | None = None
        # a task claimed with the last one's record is this worker's current task: a drain
        # finishes it too (leaving it would strand it until its lease runs out)
        while admitted is not None or not self._should_exit():
            if (problem := self.store.file_problem()) is not None:
                log.error("%s; this worker stops (restart the server to open a new one)",
                          problem)
                return
            try:
                task = admitted if admitted is not None else self._claim_or_wait()
                admitted = None  # a fault while running it must not run it twice
                if task is not None:
                    admitted = self._run_task(task)
            except Exception as exc:
                if not is_store_fault(exc):
                    raise
                self._store_fault(exc)

    def _claim_or_wait(self) -> queue.Admitted | None:
        """Recovery now and then, then a claim, or a wait for work. A store fault raised
        here is waited out by ``_serve``."""
        if time.monotonic() - self._last_recovery >= self.settings.lease_s / 3:
            # Any live worker gives back tasks of workers that died unnoticed, so nothing
            # waits for a supervisor that may be absent (remote workers, `worker` alone).
            for r in queue.requeue_expired(self.store, self.clock()):
                log.warning("%s: its worker's lease expired; now %s", r.task_id, r.status)
            for task_id in queue.expire_waiting(self.store, self.clock(),
                                                self.settings.max_wait_s):
                log.warning("%s: waited over %gs for a model slot; failed", task_id,
                            self.settings.max_wait_s)
            self._last_recovery = time.monotonic()
        admitted = None
        if not self._nothing_ready:  # else the hand-over's look stands for this one
            admitted = queue.admit_next(self.hot, self.worker_id, self.clock(),
                                        self.settings.lease_s, self.model_url,
                                        woken=self._woken)
            self._store_back()
        self._nothing_ready = self._woken = False
        if admitted is None:
            self._woken = self._listener.wait(self._idle_wait_s())
            self._idle.waited(woken=self._woken)
        else:
            self._idle.reset()
        return admitted

    def _idle_wait_s(self) -> float:
        """The idle wait, cut short where something is due that no wake-up announces: the
        recovery of expired leases, and the end of a task's retry backoff."""
        wait_s = self._idle.wait_s
        recovery_in = self.settings.lease_s / 3 - (time.monotonic() - self._last_recovery)
        wait_s = min(wait_s, max(recovery_in, 0.01))
        if wait_s > self.settings.poll_s:
            # only a wait longer than the plain poll asks (the poll would have caught it);
            # a little past the end, so the claim finds the task ready
            ready_in = queue.next_ready_in(self.hot, self.clock())
            if ready_in is not None:
                wait_s = min(wait_s, ready_in + 0.05)
        return wait_s

    # -- one task ------------------------------------------------------------------------
    def _run_task(self, admitted: queue.Admitted) -> queue.Admitted | None:
        """Run one task and record its end; returns the next task when the record claimed
        one."""
        task = admitted.task
        run = Run(task, admitted.concurrency, admitted.capacity)
        log.info("claimed %s (%s, priority %d, attempt %d/%d, slot %s of %s)", task.task_id,
                 task.type, task.priority, task.attempts, task.max_attempts, run.concurrency,
                 run.capacity.limit if run.capacity else "-")
        started = time.monotonic()
        # the time limit starts now that the task holds a slot: it measures the run on the
        # model, not the wait for one
        run.deadline = started + task.timeout_s
        self.current = run
        if self.stop_state.forced:
            run.stop(Interrupt.STOP)  # claimed as the stop came: straight back to the queue
        self.watchdog.watch(run)
        result: str | None = None
        error: BaseException | None = None
        try:
            backend = self._backend_for(task)
            result = backend.run_blocking(BackendRequest(
                task.task_id, self._prompt_of(task), task.timeout_s, model=task.model,
                system=task.system_prompt, options=task.options, output_schema=task.schema,
                workdir=task.workdir, on_progress=lambda p: self._on_progress(run, p),
            ), run.abort)
        except Aborted:
            pass  # run.interrupt says why
        except BackendError as exc:
            error = exc
        except Exception as exc:  # a bug in a backend must not kill the worker
            log.exception("backend crashed on %s", task.task_id)
            error = exc
        finally:
            self.current = None
        if run.interrupt is not None:
            result = None  # an answer that raced the stop is not the task's
        return self._record(run, result, error, time.monotonic() - started)

    def _on_progress(self, run: Run, progress: GenerationProgress) -> None:
        """Called by the backend as output arrives: keep it in memory (heartbeats save it)."""
        run.progress = progress
        if progress.first_token_s is None or run.first_token_seen:
            return
        run.first_token_seen = True
        expected = run.capacity.expected_ttft_s() if run.capacity else None
        if expected is not None and progress.first_token_s > expected:
            # the request waited inside the model server (its limit was set too high): that
            # wait is not the task's run, so its time limit does not pay for it
            run.deadline += progress.first_token_s - expected
        if run.concurrency is not None:
            run.observations += (Observation(run.concurrency,
                                             first_token_s=progress.first_token_s),)

    def _prompt_of(self, task: TaskSnapshot) -> str:
        """The prompt with the task's files, read now (they were checked at submit, but may
        have changed or gone since): a file that breaks a rule now fails the task."""
        names = task.file_list
        if not names:
            return task.prompt
        try:
            files = read_files(names, task.workdir or str(self.settings.workdir),
                               self.settings.max_files_bytes)
        except FileRefused as exc:
            raise PermanentBackendError(f"cannot give the task its files: {exc}",
                                        kind="file_unusable") from None
        return prompt_with_files(task.prompt, files)

    def _backend_for(self, task: TaskSnapshot) -> Backend:
        try:
            return self.backends[task.type]
        except KeyError:
            raise BackendError(f"no backend for task type {task.type!r}", kind="bad_type") from None

    def _beat(self, run: Run | None, generated: queue.Generated | None,
              observations: tuple[Observation, ...]) -> queue.Beat | None:
        """The watchdog's heartbeat: renew the lease (or the idle row), save the progress and
        the measurements. None when the store failed: the model goes on (the lease lasts
        three beats, and the next one may pass)."""
        try:
            now = self.clock()
            if run is not None:
                for observation in observations:
                    self._observe(observation)
            beat = queue.heartbeat(self.beats, self.worker_id,
                                   run.task.task_id if run is not None else None, now,
                                   self.settings.lease_s, generated)
        except Exception as exc:
            if not is_store_fault(exc):
                log.exception("heartbeat failed")
                return None
            self._store_failed(exc)
            return None
        self._store_back()
        return beat

    def _observe(self, observation: Observation) -> None:
        cap = queue.observe_model_server(self.store, self.model_url, observation, self.clock(),
                                         self.settings.max_workers)
        log.debug("%s: %s -> limit %d", self.model_url, observation, cap.limit)

    def _record(self, run: Run, result: str | None, error: BaseException | None,
                elapsed: float) -> queue.Admitted | None:
        """Record how the run ended; a completion also claims the next task."""
        task, now = run.task, self.clock()
        args = (self.store, task.task_id, self.worker_id)
        generated = run.generated()
        self.tasks_done += 1
        if isinstance(error, BackendError) and error.kind == "busy" and run.interrupt is None:
            self._model_busy(run, str(error))
            return None
        self._busy_streak = 0
        if result is not None:
            return self._complete(run, result, elapsed, generated)
        if run.interrupt == Interrupt.CANCEL:
            self._store(queue.mark_cancelled, *args, now, generated)
            log.info("%s: cancelled after %.2fs", task.task_id, elapsed)
        elif run.interrupt == Interrupt.LOST:
            self._store(queue.set_worker_status, self.store, self.worker_id,
                        WorkerStatus.IDLE, now)
        elif run.interrupt == Interrupt.STOP:
            self._store(queue.release, *args, now)
            log.info("%s: given back to the queue", task.task_id)
        elif run.interrupt == Interrupt.TIMEOUT or error is None or elapsed >= task.timeout_s:
            # the time limit passed (or the backend's own read timeout fired with it): a task
            # that ran out of time is not retried, it would only run out again
            self._store(queue.fail, *args, f"timed out after {task.timeout_s:g} s", now,
                        kind="timeout", retry=False, generated=generated)
            log.warning("%s: timed out after %gs", task.task_id, task.timeout_s)
        else:
            self._failed(run, error, now)
        self._write_observations(run)
        return None

    def _complete(self, run: Run, result: str, elapsed: float,
                  generated: queue.Generated | None) -> queue.Admitted | None:
        """Store the result, what was measured, and claim the next task: one transaction."""
        observations = run.take_observations()
        if run.concurrency is not None and run.progress and run.progress.eval_tokens_per_s:
            observations += (Observation(run.concurrency,
                                         tokens_per_s=run.progress.eval_tokens_per_s),)
        claim = (queue.NextClaim(self.settings.lease_s, self.model_url)
                 if self._may_take_another() else None)
        handed = self._store(
            queue.complete_and_admit, self.hot, run.task.task_id, self.worker_id, result,
            self.clock(), generated, observations=observations,
            max_limit=self.settings.max_workers,
            model_url=self.model_url if run.concurrency is not None else None, claim=claim)
        log.info("%s: completed in %.2fs%s", run.task.task_id, elapsed,
                 "" if handed.accepted else " (already ended elsewhere; result dropped)")
        self._nothing_ready = handed.nothing_ready
        return handed.next

    def _failed(self, run: Run, error: BaseException, now: datetime) -> None:
        task = run.task
        transient = isinstance(error, BackendError) and error.transient
        kind = error.kind if isinstance(error, BackendError) else "internal"
        message = str(error) if isinstance(error, BackendError) else (
            f"internal error in the {task.type} backend: {type(error).__name__}: {error}")
        after = self._store(
            queue.fail, self.store, task.task_id, self.worker_id, message, now, kind=kind,
            retry=transient, backoff=(self.settings.retry_base_s, self.settings.retry_max_s),
            jitter=self._rng.uniform(0.5, 1.0), generated=run.generated(),
        )
        log.warning("%s: %s error (%s): %s", task.task_id, kind,
                    after.status if after else "not ours", message)

    def _write_observations(self, run: Run) -> None:
        for observation in run.take_observations():
            try:
                self._observe(observation)
            except Exception:  # a measurement is not worth a task: log and go on
                log.exception("could not record a measurement of %s", self.model_url)

    def _model_busy(self, run: Run, message: str) -> None:
        """HTTP 503 "busy" is backpressure, not a failure: the task goes back without using
        an attempt, a little later, and the server's slot limit steps down."""
        self._busy_streak += 1
        delay = min(BUSY_RETRY_MAX_S, BUSY_RETRY_BASE_S * 2 ** min(self._busy_streak - 1, 10))
        delay *= self._rng.uniform(0.75, 1.25)
        self._store(queue.release, self.store, run.task.task_id, self.worker_id, self.clock(),
                    retry_after_s=delay, reason=f"{message}; retrying in {delay:.1f} s")
        log.info("%s: model server busy; back in the queue for %.1fs", run.task.task_id, delay)
        if run.concurrency is not None:
            run.observations += (Observation(run.concurrency, busy=True),)
        self._write_observations(run)

    # -- store faults ---------------------------------------------------------------------
    def _store(self, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        """A store call that must happen (registering, recording a task's end): on a store
        fault, wait and try again until it works, so a locked database or a lost connection
        never costs a task its attempt. Gives up only when the worker is forced to stop."""
        while True:
            try:
                result = fn(*args, **kwargs)
            except Exception as exc:
                if not is_store_fault(exc) or self.stop_state.forced:
                    raise
                self._store_fault(exc)
                continue
            self._store_back()
            return result

    def _store_fault(self, exc: BaseException) -> None:
        """Note a store fault and back off (doubling, with jitter, up to STORE_RETRY_MAX_S)."""
        faults = self._store_failed(exc)
        delay = min(STORE_RETRY_MAX_S, STORE_RETRY_BASE_S * 2 ** min(faults - 1, 10))
        self.stop_state.sleep(delay * self._rng.uniform(0.5, 1.0))

    def _store_failed(self, exc: BaseException) -> int:
        with self._faults:
            self._store_faults += 1
            if self._store_down_since is None:  # once per outage, not once per try
                self._store_down_since = time.monotonic()
                log.warning("the task store failed (%s); retrying with backoff",
                            _fault_text(exc))
            return self._store_faults

    def _store_back(self) -> None:
        if self._store_down_since is None:  # the hot path: no lock when all is well
            return
        with self._faults:
            if self._store_down_since is not None:
                log.warning("the task store answers again after %.1f s (%d failed calls)",
                            time.monotonic() - self._store_down_since, self._store_faults)
                self._store_down_since = None
                self._store_faults = 0


def _fault_text(exc: BaseException) -> str:
    """The first line of a store error (the driver's own words), without SQL and parameters."""
    detail = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return f"{type(exc).__name__}: {detail[0] if detail else ''}"


def run_worker(settings: Settings, store: Store, worker_id: str, *,
               supervisor_pid: int | None = None, max_tasks: int | None = None) -> None:
    """Run a worker in this process until it is told to stop."""
    # Descendants of a Codex run that leave its process group come back to us when orphaned,
    # so the run's end can kill them too (processes.kill_adopted).
    if not become_subreaper():
        log.info("no child subreaper here: a Codex descendant that leaves its process group "
                 "is not killed with it")
    worker = Worker(settings, store, worker_id, build_backends(settings, worker_id),
                    supervisor_pid=supervisor_pid, max_tasks=max_tasks)
    worker.run()
