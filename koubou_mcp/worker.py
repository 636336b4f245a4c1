"""The worker process: claim a task, run it on its backend under its time limit, record the end.

One task at a time. While the model works, a side task renews the lease every
``heartbeat_s`` and notices a cancel request or a lost lease. Idle, the worker sleeps on its
wake-up channel (no busy polling) and heartbeats on the same interval.

Stopping (signal handlers only set flags; this loop does the work):
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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import ParamSpec, TypeVar

import anyio
import anyio.abc
import anyio.to_thread

from koubou_mcp import queue
from koubou_mcp.admission import Capacity, Observation
from koubou_mcp.backends.base import (
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



class Interrupt(StrEnum):
    """Why a running task was stopped before its backend returned."""

    CANCEL = "cancel"  # the user cancelled it
    LOST = "lost"  # the lease is gone; another worker owns it now
    STOP = "stop"  # the worker was told to stop now (second signal, or drain grace over)


@dataclass
class StopState:
    """Set by signal handlers, read by the loops."""

    draining: bool = False
    forced: bool = False
    drain_started: float | None = None
    requests: int = 0


#: after a store fault, the worker waits about this long before trying again (doubling)
STORE_RETRY_BASE_S = 0.2
STORE_RETRY_MAX_S = 5.0

#: after HTTP 503 "busy", a task waits about this long (doubling while the server stays busy)
BUSY_RETRY_BASE_S = 0.5
BUSY_RETRY_MAX_S = 10.0


@dataclass
class _Run:
    """The task being worked on, how to interrupt it, and what its model produced so far."""

    task: TaskSnapshot
    concurrency: int | None = None
    capacity: Capacity | None = None
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    interrupt: Interrupt | None = None
    progress: GenerationProgress | None = None
    #: the progress last written to the store (a heartbeat writes only when it changed)
    saved: GenerationProgress | None = None
    first_token_seen: bool = False

    def stop(self, why: Interrupt) -> None:
        if self.interrupt is None:
            self.interrupt = why
        self.scope.cancel()

    def generated(self) -> queue.Generated | None:
        p = self.progress
        if p is None:
            return None
        return queue.Generated(p.text or None, p.tokens, p.first_token_s)


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
        self.worker_id = worker_id
        self.backends = backends
        self.supervisor_pid = supervisor_pid
        self.clock = clock
        self.max_tasks = max_tasks
        self.stop_state = StopState()
        self.current: _Run | None = None
        self.tasks_done = 0
        # one_of_many: a new task wakes one idle worker, not every one (where the store can)
        self._listener = store.wakeup.listen(worker_id, one_of_many=True)
        self._rng = random.Random()
        self.model_url = settings.ollama_url
        self._busy_streak = 0
        self._store_down_since: float | None = None
        self._store_faults = 0
        self._last_beat = self._last_recovery = 0.0

    # -- stopping ------------------------------------------------------------------------
    def request_stop(self) -> None:
        """Called on each stop signal: the first drains, the second forces."""
        state = self.stop_state
        state.requests += 1
        if state.requests == 1:
            state.draining = True
            state.drain_started = anyio.current_time()
            log.info("stop requested: finishing the current task, then exiting")
        else:
            state.forced = True
            log.warning("second stop request: giving the current task back and exiting")
            if self.current is not None:
                self.current.stop(Interrupt.STOP)
        self._listener.poke()

    def _supervisor_gone(self) -> bool:
        return self.supervisor_pid is not None and os.getppid() != self.supervisor_pid

    def _should_exit(self) -> bool:
        if self.stop_state.draining:
            return True
        if self._supervisor_gone():
            log.warning("the supervisor (pid %s) is gone; exiting", self.supervisor_pid)
            return True
        return self.max_tasks is not None and self.tasks_done >= self.max_tasks

    # -- main loop -----------------------------------------------------------------------
    async def run(self) -> None:
        """Serve tasks until told to stop."""
        await self._store(queue.register_worker, self.store, self.worker_id, os.getpid(),
                          self.clock(), self.settings.hostname)
        await self._store(queue.configure_model_server, self.store, self.model_url,
                          self.settings.ollama_parallel or None, self.clock())
        log.info("worker %s started (pid %d)", self.worker_id, os.getpid())
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._watch_signals, tg.cancel_scope)
                await self._serve()
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                try:
                    await self._db(queue.mark_worker_offline, self.store, self.worker_id,
                                   self.clock())
                except Exception as exc:  # the store is down: the row goes silent instead
                    if not is_store_fault(exc):
                        raise
                    log.warning("could not mark this worker offline: %s", _fault_text(exc))
                for backend in self.backends.values():
                    await backend.aclose()
                self._listener.close()
            log.info("worker %s stopped after %d tasks", self.worker_id, self.tasks_done)

    async def _watch_signals(self, scope: anyio.CancelScope) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                self.request_stop()

    async def _serve(self) -> None:
        await self._store(queue.set_worker_status, self.store, self.worker_id, WorkerStatus.IDLE,
                          self.clock())
        self._last_beat = self._last_recovery = anyio.current_time()
        while not self._should_exit():
            if (problem := self.store.file_problem()) is not None:
                log.error("%s; this worker stops (restart the server to open a new one)",
                          problem)
                return
            try:
                await self._serve_once()
            except Exception as exc:
                if not is_store_fault(exc):
                    raise
                await self._store_fault(exc)

    async def _serve_once(self) -> None:
        """One round of the idle loop: recovery now and then, a claim, or a heartbeat and a
        wait for work. A store fault raised here is waited out by ``_serve``."""
        if anyio.current_time() - self._last_recovery >= self.settings.lease_s / 3:
            # Any live worker gives back tasks of workers that died unnoticed, so nothing
            # waits for a supervisor that may be absent (remote workers, `worker` alone).
            recovered = await self._db(queue.requeue_expired, self.store, self.clock())
            for r in recovered:
                log.warning("%s: its worker's lease expired; now %s", r.task_id, r.status)
            for task_id in await self._db(queue.expire_waiting, self.store, self.clock(),
                                          self.settings.max_wait_s):
                log.warning("%s: waited over %gs for a model slot; failed", task_id,
                            self.settings.max_wait_s)
            self._last_recovery = anyio.current_time()
        admitted = await self._db(queue.admit_next, self.store, self.worker_id, self.clock(),
                                  self.settings.lease_s, self.model_url)
        self._store_back()
        if admitted is not None:
            await self._run_task(admitted)
            self._last_beat = anyio.current_time()
            return
        if anyio.current_time() - self._last_beat >= self.settings.heartbeat_s:
            await self._db(queue.heartbeat, self.store, self.worker_id, None, self.clock(),
                           self.settings.lease_s)
            self._last_beat = anyio.current_time()
        wait_s = min(self.settings.poll_s, self.settings.heartbeat_s)
        await anyio.to_thread.run_sync(self._listener.wait, wait_s)

    # -- one task ------------------------------------------------------------------------
    async def _run_task(self, admitted: queue.Admitted) -> None:
        task = admitted.task
        run = _Run(task, admitted.concurrency, admitted.capacity)
        self.current = run
        started = anyio.current_time()
        log.info("claimed %s (%s, priority %d, attempt %d/%d, slot %s of %s)", task.task_id,
                 task.type, task.priority, task.attempts, task.max_attempts, run.concurrency,
                 run.capacity.limit if run.capacity else "-")
        result: str | None = None
        error: BaseException | None = None
        try:
            async with anyio.create_task_group() as side:
                side.start_soon(self._keep_alive, run)
                with run.scope:
                    # the time limit starts now that the task holds a slot: it measures the
                    # run on the model, not the wait for one
                    run.scope.deadline = anyio.current_time() + task.timeout_s
                    try:
                        backend = self._backend_for(task)
                        prompt = await anyio.to_thread.run_sync(self._prompt_of, task)
                        result = await backend.run(BackendRequest(
                            task.task_id, prompt, task.timeout_s, model=task.model,
                            system=task.system_prompt, options=task.options,
                            output_schema=task.schema, workdir=task.workdir,
                            on_progress=lambda p: self._on_progress(run, side, p),
                        ))
                    except BackendError as exc:
                        error = exc
                    except Exception as exc:  # a bug in a backend must not kill the worker
                        log.exception("backend crashed on %s", task.task_id)
                        error = exc
                side.cancel_scope.cancel()
        finally:
            self.current = None
        elapsed = anyio.current_time() - started
        with anyio.CancelScope(shield=True):
            await self._record(run, result, error, elapsed)
        self.tasks_done += 1

    def _on_progress(self, run: _Run, side: anyio.abc.TaskGroup,
                     progress: GenerationProgress) -> None:
        """Called by the backend as output arrives: keep it in memory (heartbeats save it)."""
        run.progress = progress
        if progress.first_token_s is None or run.first_token_seen:
            return
        run.first_token_seen = True
        expected = run.capacity.expected_ttft_s() if run.capacity else None
        if expected is not None and progress.first_token_s > expected:
            # the request waited inside the model server (its limit was set too high): that
            # wait is not the task's run, so its time limit does not pay for it
            run.scope.deadline += progress.first_token_s - expected
        if run.concurrency is not None:
            side.start_soon(self._observe, Observation(run.concurrency,
                                                       first_token_s=progress.first_token_s))

    async def _observe(self, observation: Observation) -> None:
        try:
            cap = await self._db(queue.observe_model_server, self.store, self.model_url,
                                 observation, self.clock(), self.settings.max_workers)
        except Exception:  # a measurement is not worth a task: log and go on
            log.exception("could not record a measurement of %s", self.model_url)
            return
        log.debug("%s: %s -> limit %d", self.model_url, observation, cap.limit)

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

    async def _keep_alive(self, run: _Run) -> None:
        """Renew the lease while the backend works; notice cancels, lost leases and drains."""
        while True:
            await anyio.sleep(self.settings.heartbeat_s)
            progress = run.progress
            generated = run.generated() if progress is not run.saved else None
            beat: queue.Beat | None = None
            try:
                beat = await self._db(queue.heartbeat, self.store, self.worker_id,
                                      run.task.task_id, self.clock(), self.settings.lease_s,
                                      generated)
            except Exception as exc:
                if not is_store_fault(exc):
                    raise
                # the model goes on: the lease lasts three beats, and the next one may pass
                self._store_failed(exc)
            else:
                self._store_back()
                run.saved = progress
            if beat == queue.Beat.CANCEL:
                log.info("%s: cancel requested; stopping it", run.task.task_id)
                run.stop(Interrupt.CANCEL)
            elif beat == queue.Beat.LOST:
                log.warning("%s: lease lost to another worker; abandoning it", run.task.task_id)
                run.stop(Interrupt.LOST)
            state = self.stop_state
            if (state.draining and state.drain_started is not None and
                    anyio.current_time() - state.drain_started > self.settings.drain_grace_s):
                log.warning("%s: drain grace of %gs over; giving it back", run.task.task_id,
                            self.settings.drain_grace_s)
                run.stop(Interrupt.STOP)

    async def _record(self, run: _Run, result: str | None, error: BaseException | None,
                      elapsed: float) -> None:
        task, now = run.task, self.clock()
        args = (self.store, task.task_id, self.worker_id)
        generated = run.generated()
        if isinstance(error, BackendError) and error.kind == "busy" and run.interrupt is None:
            await self._model_busy(run, str(error))
            return
        self._busy_streak = 0
        if run.interrupt == Interrupt.CANCEL:
            await self._store(queue.mark_cancelled, *args, now, generated)
            log.info("%s: cancelled after %.2fs", task.task_id, elapsed)
        elif run.interrupt == Interrupt.LOST:
            await self._store(queue.set_worker_status, self.store, self.worker_id,
                           WorkerStatus.IDLE, now)
        elif run.interrupt == Interrupt.STOP:
            await self._store(queue.release, *args, now)
            log.info("%s: given back to the queue", task.task_id)
        elif result is not None:
            accepted = await self._store(queue.complete, *args, result, now, generated)
            log.info("%s: completed in %.2fs%s", task.task_id, elapsed,
                     "" if accepted else " (already ended elsewhere; result dropped)")
            if run.concurrency is not None and run.progress and run.progress.eval_tokens_per_s:
                await self._observe(Observation(run.concurrency,
                                                tokens_per_s=run.progress.eval_tokens_per_s))
        elif error is None or elapsed >= task.timeout_s:
            # the scope's deadline passed (or the backend's own read timeout fired with it):
            # a task that ran out of time is not retried, it would only run out again
            await self._store(queue.fail, *args, f"timed out after {task.timeout_s:g} s", now,
                           kind="timeout", retry=False, generated=generated)
            log.warning("%s: timed out after %gs", task.task_id, task.timeout_s)
        else:
            transient = isinstance(error, BackendError) and error.transient
            kind = error.kind if isinstance(error, BackendError) else "internal"
            message = str(error) if isinstance(error, BackendError) else (
                f"internal error in the {task.type} backend: {type(error).__name__}: {error}")
            after = await self._store(
                queue.fail, *args, message, now, kind=kind, retry=transient,
                backoff=(self.settings.retry_base_s, self.settings.retry_max_s),
                jitter=self._rng.uniform(0.5, 1.0),
            )
            log.warning("%s: %s error (%s): %s", task.task_id, kind,
                        after.status if after else "not ours", message)

    async def _model_busy(self, run: _Run, message: str) -> None:
        """HTTP 503 "busy" is backpressure, not a failure: the task goes back without using
        an attempt, a little later, and the server's slot limit steps down."""
        self._busy_streak += 1
        delay = min(BUSY_RETRY_MAX_S, BUSY_RETRY_BASE_S * 2 ** min(self._busy_streak - 1, 10))
        delay *= self._rng.uniform(0.75, 1.25)
        await self._store(queue.release, self.store, run.task.task_id, self.worker_id, self.clock(),
                       retry_after_s=delay, reason=f"{message}; retrying in {delay:.1f} s")
        log.info("%s: model server busy; back in the queue for %.1fs", run.task.task_id, delay)
        if run.concurrency is not None:
            await self._observe(Observation(run.concurrency, busy=True))

    # -- store faults ---------------------------------------------------------------------
    async def _store(self, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        """A store call that must happen (registering, recording a task's end): on a store
        fault, wait and try again until it works, so a locked database or a lost connection
        never costs a task its attempt. Gives up only when the worker is forced to stop."""
        while True:
            try:
                result = await self._db(fn, *args, **kwargs)
            except Exception as exc:
                if not is_store_fault(exc) or self.stop_state.forced:
                    raise
                await self._store_fault(exc)
                continue
            self._store_back()
            return result

    async def _store_fault(self, exc: BaseException) -> None:
        """Note a store fault and back off (doubling, with jitter, up to STORE_RETRY_MAX_S)."""
        self._store_failed(exc)
        delay = min(STORE_RETRY_MAX_S, STORE_RETRY_BASE_S * 2 ** min(self._store_faults - 1, 10))
        await anyio.sleep(delay * self._rng.uniform(0.5, 1.0))

    def _store_failed(self, exc: BaseException) -> None:
        self._store_faults += 1
        if self._store_down_since is None:  # once per outage, not once per try
            self._store_down_since = anyio.current_time()
            log.warning("the task store failed (%s); retrying with backoff", _fault_text(exc))

    def _store_back(self) -> None:
        if self._store_down_since is not None:
            log.warning("the task store answers again after %.1f s (%d failed calls)",
                        anyio.current_time() - self._store_down_since, self._store_faults)
            self._store_down_since = None
            self._store_faults = 0

    @staticmethod
    async def _db(fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        """Run a store call off the event loop so heartbeats and signals stay responsive."""
        return await anyio.to_thread.run_sync(lambda: fn(*args, **kwargs))


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
    anyio.run(worker.run)
