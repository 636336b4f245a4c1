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
import anyio.to_thread

from koubou_mcp import queue
from koubou_mcp.backends.base import Backend, BackendError, BackendRequest
from koubou_mcp.backends.codex import CodexBackend
from koubou_mcp.backends.ollama import OllamaBackend
from koubou_mcp.config import Settings
from koubou_mcp.models import TaskSnapshot, WorkerStatus, utcnow
from koubou_mcp.store import Store

log = logging.getLogger("koubou_mcp.worker")

Clock = Callable[[], datetime]
P = ParamSpec("P")
R = TypeVar("R")


def build_backends(settings: Settings, worker_id: str) -> dict[str, Backend]:
    """One backend per task type, as configured."""
    return {
        "general": OllamaBackend(settings.ollama_url, settings.general_model),
        "code": CodexBackend(
            settings.codex_bin, settings.code_model, settings.ollama_url,
            settings.codex_sandbox, str(settings.workdir),
            groups_dir=str(settings.child_groups_dir(worker_id)),
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


@dataclass
class _Run:
    """The task being worked on and how to interrupt it."""

    task: TaskSnapshot
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    interrupt: Interrupt | None = None

    def stop(self, why: Interrupt) -> None:
        if self.interrupt is None:
            self.interrupt = why
        self.scope.cancel()


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
        self._listener = store.wakeup.listen(worker_id)
        self._rng = random.Random()

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
        await self._db(queue.register_worker, self.store, self.worker_id, os.getpid(), self.clock(),
                       self.settings.hostname)
        log.info("worker %s started (pid %d)", self.worker_id, os.getpid())
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._watch_signals, tg.cancel_scope)
                await self._serve()
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self._db(queue.mark_worker_offline, self.store, self.worker_id, self.clock())
                for backend in self.backends.values():
                    await backend.aclose()
                self._listener.close()
            log.info("worker %s stopped after %d tasks", self.worker_id, self.tasks_done)

    async def _watch_signals(self, scope: anyio.CancelScope) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                self.request_stop()

    async def _serve(self) -> None:
        await self._db(queue.set_worker_status, self.store, self.worker_id, WorkerStatus.IDLE,
                       self.clock())
        last_beat = last_recovery = anyio.current_time()
        while not self._should_exit():
            if anyio.current_time() - last_recovery >= self.settings.lease_s / 3:
                # Any live worker gives back tasks of workers that died unnoticed, so nothing
                # waits for a supervisor that may be absent (remote workers, `worker` alone).
                recovered = await self._db(queue.requeue_expired, self.store, self.clock())
                for r in recovered:
                    log.warning("%s: its worker's lease expired; now %s", r.task_id, r.status)
                last_recovery = anyio.current_time()
            task = await self._db(queue.claim_next, self.store, self.worker_id, self.clock(),
                                  self.settings.lease_s)
            if task is not None:
                await self._run_task(task)
                last_beat = anyio.current_time()
                continue
            if anyio.current_time() - last_beat >= self.settings.heartbeat_s:
                await self._db(queue.heartbeat, self.store, self.worker_id, None, self.clock(),
                               self.settings.lease_s)
                last_beat = anyio.current_time()
            wait_s = min(self.settings.poll_s, self.settings.heartbeat_s)
            await anyio.to_thread.run_sync(self._listener.wait, wait_s)

    # -- one task ------------------------------------------------------------------------
    async def _run_task(self, task: TaskSnapshot) -> None:
        run = _Run(task)
        self.current = run
        started = anyio.current_time()
        log.info("claimed %s (%s, priority %d, attempt %d/%d)", task.task_id, task.type,
                 task.priority, task.attempts, task.max_attempts)
        result: str | None = None
        error: BaseException | None = None
        try:
            async with anyio.create_task_group() as side:
                side.start_soon(self._keep_alive, run)
                with run.scope:
                    run.scope.deadline = anyio.current_time() + task.timeout_s
                    try:
                        result = await self._backend_for(task).run(
                            BackendRequest(task.task_id, task.prompt, task.timeout_s)
                        )
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

    def _backend_for(self, task: TaskSnapshot) -> Backend:
        try:
            return self.backends[task.type]
        except KeyError:
            raise BackendError(f"no backend for task type {task.type!r}", kind="bad_type") from None

    async def _keep_alive(self, run: _Run) -> None:
        """Renew the lease while the backend works; notice cancels, lost leases and drains."""
        while True:
            await anyio.sleep(self.settings.heartbeat_s)
            beat = await self._db(queue.heartbeat, self.store, self.worker_id, run.task.task_id,
                                  self.clock(), self.settings.lease_s)
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
        if run.interrupt == Interrupt.CANCEL:
            await self._db(queue.mark_cancelled, *args, now)
            log.info("%s: cancelled after %.2fs", task.task_id, elapsed)
        elif run.interrupt == Interrupt.LOST:
            await self._db(queue.set_worker_status, self.store, self.worker_id,
                           WorkerStatus.IDLE, now)
        elif run.interrupt == Interrupt.STOP:
            await self._db(queue.release, *args, now)
            log.info("%s: given back to the queue", task.task_id)
        elif result is not None:
            accepted = await self._db(queue.complete, *args, result, now)
            log.info("%s: completed in %.2fs%s", task.task_id, elapsed,
                     "" if accepted else " (already ended elsewhere; result dropped)")
        elif error is None or elapsed >= task.timeout_s:
            # the scope's deadline passed (or the backend's own read timeout fired with it):
            # a task that ran out of time is not retried, it would only run out again
            await self._db(queue.fail, *args, f"timed out after {task.timeout_s:g} s", now,
                           kind="timeout", retry=False)
            log.warning("%s: timed out after %gs", task.task_id, task.timeout_s)
        else:
            transient = isinstance(error, BackendError) and error.transient
            kind = error.kind if isinstance(error, BackendError) else "internal"
            message = str(error) if isinstance(error, BackendError) else (
                f"internal error in the {task.type} backend: {type(error).__name__}: {error}")
            after = await self._db(
                queue.fail, *args, message, now, kind=kind, retry=transient,
                backoff=(self.settings.retry_base_s, self.settings.retry_max_s),
                jitter=self._rng.uniform(0.5, 1.0),
            )
            log.warning("%s: %s error (%s): %s", task.task_id, kind,
                        after.status if after else "not ours", message)

    @staticmethod
    async def _db(fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        """Run a store call off the event loop so heartbeats and signals stay responsive."""
        return await anyio.to_thread.run_sync(lambda: fn(*args, **kwargs))


def run_worker(settings: Settings, store: Store, worker_id: str, *,
               supervisor_pid: int | None = None, max_tasks: int | None = None) -> None:
    """Run a worker in this process until it is told to stop."""
    worker = Worker(settings, store, worker_id, build_backends(settings, worker_id),
                    supervisor_pid=supervisor_pid, max_tasks=max_tasks)
    anyio.run(worker.run)
