"""The scaling policy: how many workers the pool should run. Numbers in, a decision out.

Nothing here does I/O or reads the clock: the supervisor measures (ready tasks, workers by
state, how long each idle worker has idled) and hands the numbers over, so the policy is tested
exhaustively with made-up snapshots.

The rule (the seed's, made to reach its target in one step):

* ``desired = clamp(max(busy, ceil(ready / threshold)), min, max)``, and at least 1 whenever a
  task is ready. This keeps the seed's growth condition (``pending > active * threshold`` and
  below ``max`` → grow) but asks for the whole needed count at once instead of one worker per
  tick. Workers still starting count as capacity, so a burst is never served twice.
* The model server is the scarce resource: with ``slots`` (its slot limit, see ``admission``)
  known, ``desired`` is at most ``slots + SLOT_HEADROOM`` (and never below the busy count):
  a worker beyond the slots would only wait for one, spending memory. The headroom is one
  worker ready to take a slot the moment the limit grows.
* ``spawn = max(0, desired - (busy + idle + starting))``.
* Retire only idle workers, only once they idled ``idle_timeout``, only while no task is ready
  (the seed shrinks only when nothing is pending) or the pool is above the slot cap, never
  below ``max(min, desired)``, longest idle first. A busy worker is never stopped to scale down.

Workers that keep dying at start-up are restarted one at a time after ``crash_backoff_s``
(exponential, capped): ``CrashBackoff`` keeps that count apart from ``decide``, which stays about
counts; the supervisor asks both.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

#: workers kept beyond the model server's slots, ready for the next slot the limit finds
SLOT_HEADROOM = 1

#: ``ceil`` of a quotient of floats may land a hair above an integer (3 / 0.1 = 30.000…04)
_EPSILON = 1e-9


class Limits(Protocol):
    """The settings the policy reads; ``config.Settings`` is one."""

    @property
    def min_workers(self) -> int: ...

    @property
    def max_workers(self) -> int: ...

    @property
    def scale_up_threshold(self) -> float: ...

    @property
    def idle_timeout_s(self) -> float: ...


@dataclass(frozen=True)
class PoolLimits:
    """Plain limits, for callers without a ``Settings`` (tests, benchmarks)."""

    min_workers: int = 1
    max_workers: int = 5
    scale_up_threshold: float = 2.0
    idle_timeout_s: float = 30.0


@dataclass(frozen=True)
class IdleWorker:
    worker_id: str
    #: seconds since the worker last finished a task (or started), computed by the caller
    idle_s: float


@dataclass(frozen=True)
class Snapshot:
    """The pool and the queue as the supervisor saw them at one instant."""

    #: pending tasks a worker could claim now (not those waiting out a retry backoff)
    ready_pending: int
    busy: int
    starting: int = 0
    idle: Sequence[IdleWorker] = field(default_factory=tuple)
    #: the model server's slot limit (None: unknown, no cap)
    slots: int | None = None

    @property
    def capacity(self) -> int:
        """Workers that serve or will soon serve tasks."""
        return self.busy + len(self.idle) + self.starting


@dataclass(frozen=True)
class Decision:
    """What to do now: start ``spawn`` workers, or gracefully stop the workers in ``retire``."""

    desired: int
    spawn: int
    retire: tuple[str, ...]
    reason: str

    @property
    def changes(self) -> bool:
        return self.spawn > 0 or bool(self.retire)

    def as_dict(self) -> dict[str, Any]:
        return {"desired": self.desired, "spawn": self.spawn, "retire": list(self.retire),
                "reason": self.reason}


class DecisionLog:
    """The decisions a supervisor applied: the last one, the latest that changed something
    (newest last), and running totals for /metrics: the decisions that started workers
    (scale-up events) or retired some (scale-down events), and how many workers."""

    def __init__(self, keep: int = 200) -> None:
        self.last: Decision | None = None
        self.history: deque[tuple[datetime, Decision]] = deque(maxlen=keep)
        self.totals = {"up_events": 0, "down_events": 0, "workers_started": 0,
                       "workers_retired": 0}

    def record(self, now: datetime, decision: Decision, *, started: int, retired: int) -> None:
        """``decision``, applied at ``now``, started ``started`` workers and retired
        ``retired``."""
        self.last = decision
        if decision.changes:
            self.history.append((now, decision))
        self.totals["workers_started"] += started
        self.totals["workers_retired"] += retired
        self.totals["up_events"] += 1 if started else 0
        self.totals["down_events"] += 1 if retired else 0

    def as_dict(self) -> dict[str, Any]:
        """The pool health's view: the last decision, the last change, the totals."""
        change = self.history[-1] if self.history else None
        return {
            "last_decision": self.last.as_dict() if self.last else None,
            "last_change": ({"at": change[0].isoformat() + "Z", **change[1].as_dict()}
                            if change else None),
            "scaling": dict(self.totals),
        }


def desired_workers(ready_pending: int, busy: int, limits: Limits,
                    slots: int | None = None) -> int:
    """How many workers the load calls for, within ``[min, max]`` and the model's slots."""
    wanted = max(busy, math.ceil(ready_pending / limits.scale_up_threshold - _EPSILON))
    if slots is not None:
        wanted = max(busy, min(wanted, slots + SLOT_HEADROOM))
    if ready_pending > 0:
        wanted = max(wanted, 1)
    return max(limits.min_workers, min(limits.max_workers, wanted))


def decide(snapshot: Snapshot, limits: Limits) -> Decision:
    """The scaling decision for ``snapshot``. Pure: same numbers, same answer."""
    _check(snapshot, limits)
    desired = desired_workers(snapshot.ready_pending, snapshot.busy, limits, snapshot.slots)
    capacity = snapshot.capacity
    counts = (f"ready={snapshot.ready_pending} busy={snapshot.busy} idle={len(snapshot.idle)} "
              f"starting={snapshot.starting}")
    if snapshot.slots is not None:
        counts += f" slots={snapshot.slots}"
    spawn = max(0, desired - capacity)
    if spawn:
        return Decision(desired, spawn, (), f"{counts}: want {desired}, starting {spawn}")

    retire: tuple[str, ...] = ()
    # with ready tasks the pool shrinks only below a slot cap: such workers would only wait
    capped = snapshot.slots is not None and capacity > desired
    if snapshot.ready_pending == 0 or capped:
        floor = max(limits.min_workers, desired)
        expired = sorted(
            (w for w in snapshot.idle if w.idle_s >= limits.idle_timeout_s),
            key=lambda w: (-w.idle_s, w.worker_id),
        )
        surplus = max(0, capacity - floor)
        retire = tuple(w.worker_id for w in expired[:surplus])
    if retire:
        reason = (f"{counts}: want {desired}, retiring {len(retire)} idle for "
                  f">= {limits.idle_timeout_s:g}s")
    else:
        reason = f"{counts}: want {desired}, have {capacity}"
    return Decision(desired, 0, retire, reason)


#: a scaling rule; ``decide`` is the pool's (a benchmark runs the seed's through the same pool)
Policy = Callable[[Snapshot, Limits], Decision]


def crash_backoff_s(failures: int, base_s: float = 1.0, cap_s: float = 60.0) -> float:
    """Delay before the next start after ``failures`` start-up failures in a row.

    0 failures → 0; then ``base, 2·base, 4·base, …`` up to ``cap_s``.
    """
    if failures <= 0:
        return 0.0
    # min() on the exponent first keeps 2**n from overflowing for absurd counts
    return float(min(cap_s, base_s * 2 ** min(failures - 1, 62)))


class CrashBackoff:
    """Start-up failures in a row, and what they allow: the crash-loop brake of the pool.

    While workers keep dying before they are ready, the pool starts one at a time (a probe),
    each ``crash_backoff_s(failures)`` after the last failure; the first worker that gets ready
    clears it. Like ``decide`` it never reads the clock: ``now`` is an argument.
    """

    def __init__(self, base_s: float = 1.0, cap_s: float = 60.0) -> None:
        self.base_s = base_s
        self.cap_s = cap_s
        self.failures = 0
        self.last_failure_at: datetime | None = None
        self.last_failure: str | None = None
        self._announced_for = 0

    @property
    def active(self) -> bool:
        return self.failures > 0

    @property
    def delay_s(self) -> float:
        """The wait after the last failure before the next start."""
        return crash_backoff_s(self.failures, self.base_s, self.cap_s)

    def failed(self, now: datetime, message: str) -> None:
        """A worker failed to start at ``now``; ``message`` says how."""
        self.failures += 1
        self.last_failure_at = now
        self.last_failure = message

    def clear(self) -> bool:
        """A worker started fine: forget the failures. True when there were some."""
        had = self.active
        self.failures = self._announced_for = 0
        return had

    def next_start_in_s(self, now: datetime) -> float:
        if not self.active or self.last_failure_at is None:
            return 0.0
        return max(0.0, self.delay_s - (now - self.last_failure_at).total_seconds())

    def allowed_starts(self, wanted: int, now: datetime, *, probing: bool) -> int:
        """How many of ``wanted`` starts may happen at ``now``: all of them without failures;
        else one once the delay is over and no probe (``probing``) is still starting."""
        if wanted <= 0 or not self.active:
            return max(wanted, 0)
        if probing or self.next_start_in_s(now) > 0:
            return 0
        return 1

    def first_wait(self, now: datetime) -> bool:
        """True the first time a start has to wait out the delay of this failure count (so
        the wait is logged once, not every tick)."""
        if self.next_start_in_s(now) <= 0 or self._announced_for == self.failures:
            return False
        self._announced_for = self.failures
        return True

    def as_dict(self, now: datetime) -> dict[str, Any]:
        """The ``crash_loop`` part of the pool's health."""
        return {"active": self.active, "failures_in_a_row": self.failures,
                "backoff_s": self.delay_s, "next_start_in_s": round(self.next_start_in_s(now), 3),
                "last_failure": self.last_failure}


def _check(snapshot: Snapshot, limits: Limits) -> None:
    if snapshot.ready_pending < 0 or snapshot.busy < 0 or snapshot.starting < 0:
        raise ValueError(f"counts cannot be negative: {snapshot}")
    if snapshot.slots is not None and snapshot.slots < 1:
        raise ValueError(f"slots must be at least 1 when known: {snapshot}")
    if not 0 <= limits.min_workers <= limits.max_workers or limits.max_workers < 1:
        raise ValueError(
            f"need 0 <= min_workers <= max_workers and max_workers >= 1, got "
            f"{limits.min_workers}..{limits.max_workers}"
        )
    if not limits.scale_up_threshold > 0:
        raise ValueError(f"scale_up_threshold must be positive, got {limits.scale_up_threshold}")
