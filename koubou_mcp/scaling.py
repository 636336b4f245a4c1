"""The scaling policy: how many workers the pool should run. Numbers in, a decision out.

Nothing here does I/O or reads the clock: the supervisor measures (ready tasks, workers by
state, how long each idle worker has idled) and hands the numbers over, so the policy is tested
exhaustively with made-up snapshots.

The rule (the seed's, made to reach its target in one step):

* ``desired = clamp(max(busy, ceil(ready / threshold)), min, max)``, and at least 1 whenever a
  task is ready. This keeps the seed's growth condition (``pending > active * threshold`` and
  below ``max`` → grow) but asks for the whole needed count at once instead of one worker per
  tick. Workers still starting count as capacity, so a burst is never served twice.
* ``spawn = max(0, desired - (busy + idle + starting))``.
* Retire only idle workers, only once they idled ``idle_timeout``, only while no task is ready
  (the seed shrinks only when nothing is pending), never below ``max(min, desired)``, longest
  idle first. A busy worker is never stopped to scale down.

Workers that keep dying at start-up are restarted after ``crash_backoff_s`` (exponential,
capped); the supervisor applies that delay, the policy stays about counts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

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


def desired_workers(ready_pending: int, busy: int, limits: Limits) -> int:
    """How many workers the load calls for, within ``[min, max]``."""
    wanted = max(busy, math.ceil(ready_pending / limits.scale_up_threshold - _EPSILON))
    if ready_pending > 0:
        wanted = max(wanted, 1)
    return max(limits.min_workers, min(limits.max_workers, wanted))


def decide(snapshot: Snapshot, limits: Limits) -> Decision:
    """The scaling decision for ``snapshot``. Pure: same numbers, same answer."""
    _check(snapshot, limits)
    desired = desired_workers(snapshot.ready_pending, snapshot.busy, limits)
    capacity = snapshot.capacity
    counts = (f"ready={snapshot.ready_pending} busy={snapshot.busy} idle={len(snapshot.idle)} "
              f"starting={snapshot.starting}")
    spawn = max(0, desired - capacity)
    if spawn:
        return Decision(desired, spawn, (), f"{counts}: want {desired}, starting {spawn}")

    retire: tuple[str, ...] = ()
    if snapshot.ready_pending == 0:
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


def crash_backoff_s(failures: int, base_s: float = 1.0, cap_s: float = 60.0) -> float:
    """Delay before the next start after ``failures`` start-up failures in a row.

    0 failures → 0; then ``base, 2·base, 4·base, …`` up to ``cap_s``.
    """
    if failures <= 0:
        return 0.0
    # min() on the exponent first keeps 2**n from overflowing for absurd counts
    return float(min(cap_s, base_s * 2 ** min(failures - 1, 62)))


def _check(snapshot: Snapshot, limits: Limits) -> None:
    if snapshot.ready_pending < 0 or snapshot.busy < 0 or snapshot.starting < 0:
        raise ValueError(f"counts cannot be negative: {snapshot}")
    if not 0 <= limits.min_workers <= limits.max_workers or limits.max_workers < 1:
        raise ValueError(
            f"need 0 <= min_workers <= max_workers and max_workers >= 1, got "
            f"{limits.min_workers}..{limits.max_workers}"
        )
    if not limits.scale_up_threshold > 0:
        raise ValueError(f"scale_up_threshold must be positive, got {limits.scale_up_threshold}")
