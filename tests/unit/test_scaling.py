"""The scaling policy: a table of situations, then properties checked on generated snapshots.

The policy is pure, so "time" here is just the idle seconds handed to it.
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from koubou_mcp.config import Settings
from koubou_mcp.scaling import (
    CrashBackoff,
    Decision,
    DecisionLog,
    IdleWorker,
    PoolLimits,
    Snapshot,
    crash_backoff_s,
    decide,
    desired_workers,
)

SEED = PoolLimits(min_workers=1, max_workers=5, scale_up_threshold=2, idle_timeout_s=30)


def idle(*seconds: float) -> tuple[IdleWorker, ...]:
    return tuple(IdleWorker(f"w{i}", s) for i, s in enumerate(seconds))


# (description, snapshot, limits, expected desired, expected spawn, expected retired ids)
TABLE = [
    ("an empty pool starts the minimum",
     Snapshot(0, busy=0), SEED, 1, 1, ()),
    ("one idle worker and nothing to do: nothing changes",
     Snapshot(0, busy=0, idle=idle(5)), SEED, 1, 0, ()),
    ("a burst of 50 with one idle worker grows to max in one decision",
     Snapshot(50, busy=0, idle=idle(1)), SEED, 5, 4, ()),
    ("a burst of 50 with one busy worker grows to max in one decision",
     Snapshot(50, busy=1), SEED, 5, 4, ()),
    ("starting workers count as capacity: a burst is not served twice",
     Snapshot(50, busy=1, starting=2), SEED, 5, 2, ()),
    ("the seed's rule: 3 pending > 1 active x 2 grows by one",
     Snapshot(3, busy=1), SEED, 2, 1, ()),
    ("the seed's rule: 2 pending = 1 active x 2 does not grow",
     Snapshot(2, busy=1), SEED, 1, 0, ()),
    ("a lower threshold asks for more workers",
     Snapshot(3, busy=0), PoolLimits(1, 10, 0.5, 30), 6, 6, ()),
    ("a fractional threshold does not round up past the exact quotient",
     Snapshot(3, busy=0), PoolLimits(0, 50, 0.1, 30), 30, 30, ()),
    ("min 0 still starts one worker for a single task",
     Snapshot(1, busy=0), PoolLimits(0, 5, 2, 30), 1, 1, ()),
    ("min 0 and nothing to do: the idle worker retires after the timeout",
     Snapshot(0, busy=0, idle=idle(31)), PoolLimits(0, 5, 2, 30), 0, 0, ("w0",)),
    ("one model slot: a burst of 50 asks for the slot plus one worker of headroom",
     Snapshot(50, busy=0, slots=1), SEED, 2, 2, ()),
    ("four model slots: a burst of 50 asks for five workers",
     Snapshot(50, busy=0, slots=4), PoolLimits(1, 10, 2, 30), 5, 5, ()),
    ("the slot cap never stops busy workers",
     Snapshot(50, busy=4, slots=1), SEED, 4, 0, ()),
    ("above the slot cap, idle workers past the timeout retire although tasks are ready",
     Snapshot(50, busy=1, idle=idle(31, 40, 5), slots=1), SEED, 2, 0, ("w1", "w0")),
    ("busy workers are never stopped, even above the load",
     Snapshot(0, busy=5), SEED, 5, 0, ()),
    ("idle workers below the timeout stay",
     Snapshot(0, busy=0, idle=idle(29.9, 10, 0)), SEED, 1, 0, ()),
    ("only workers past the timeout retire, longest idle first",
     Snapshot(0, busy=0, idle=idle(10, 40, 35, 5)), SEED, 1, 0, ("w1", "w2")),
    ("retiring stops at min",
     Snapshot(0, busy=0, idle=idle(100, 90, 80, 70)), PoolLimits(2, 5, 2, 30), 2, 0,
     ("w0", "w1")),
    ("retiring stops at the busy count (desired), not only at min",
     Snapshot(0, busy=3, idle=idle(100, 90)), SEED, 3, 0, ("w0", "w1")),
    ("a starting worker is capacity: an expired idle one can go",
     Snapshot(0, busy=0, starting=1, idle=idle(100)), SEED, 1, 0, ("w0",)),
    ("nothing retires while tasks are ready (the seed shrinks only when idle)",
     Snapshot(1, busy=0, idle=idle(100, 90, 80)), SEED, 1, 0, ()),
    ("at max with a backlog nothing more starts",
     Snapshot(100, busy=5), SEED, 5, 0, ()),
    ("above max (settings lowered) nothing starts and busy ones stay",
     Snapshot(10, busy=7), SEED, 5, 0, ()),
    ("an idle timeout of 0 retires surplus idle workers at once",
     Snapshot(0, busy=0, idle=idle(0, 0, 0)), PoolLimits(1, 5, 2, 0), 1, 0, ("w0", "w1")),
]


@pytest.mark.parametrize(("snapshot", "limits", "desired", "spawn", "retired"),
                         [case[1:] for case in TABLE], ids=[case[0] for case in TABLE])
def test_policy_table(snapshot: Snapshot, limits: PoolLimits, desired: int, spawn: int,
                      retired: tuple[str, ...]) -> None:
    decision = decide(snapshot, limits)
    assert (decision.desired, decision.spawn, decision.retire) == (desired, spawn, retired)


def test_settings_are_accepted_as_limits() -> None:
    settings = Settings.from_env({}, home="/tmp/koubou-scaling-test", max_workers=3)
    assert decide(Snapshot(20, busy=0), settings).spawn == 3


def test_the_reason_names_the_counts() -> None:
    decision = decide(Snapshot(50, busy=1, starting=1, idle=idle(2)), SEED)
    assert "ready=50 busy=1 idle=1 starting=1" in decision.reason
    assert decision.as_dict()["spawn"] == 2


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="negative"):
        decide(Snapshot(-1, busy=0), SEED)
    with pytest.raises(ValueError, match="min_workers"):
        decide(Snapshot(0, busy=0), PoolLimits(3, 2, 2, 30))
    with pytest.raises(ValueError, match="threshold"):
        decide(Snapshot(0, busy=0), PoolLimits(1, 2, 0, 30))


# -- properties ---------------------------------------------------------------------------

@st.composite
def limits_st(draw: st.DrawFn) -> PoolLimits:
    max_workers = draw(st.integers(1, 20))
    min_workers = draw(st.integers(0, max_workers))
    threshold = draw(st.one_of(st.sampled_from([0.5, 1.0, 1.5, 2.0, 3.0, 5.0]),
                               st.floats(0.05, 20, allow_nan=False)))
    idle_timeout = draw(st.one_of(st.just(0.0), st.floats(0, 120, allow_nan=False)))
    return PoolLimits(min_workers, max_workers, threshold, idle_timeout)


@st.composite
def snapshot_st(draw: st.DrawFn) -> Snapshot:
    idle_s = draw(st.lists(st.floats(0, 300, allow_nan=False), max_size=20))
    return Snapshot(
        ready_pending=draw(st.one_of(st.just(0), st.integers(0, 500))),
        busy=draw(st.integers(0, 20)),
        starting=draw(st.integers(0, 5)),
        idle=tuple(IdleWorker(f"idle{i}", s) for i, s in enumerate(idle_s)),
    )


def after(snapshot: Snapshot, decision: Decision) -> int:
    """How many workers there are once the decision is carried out."""
    return snapshot.capacity + decision.spawn - len(decision.retire)


@settings(max_examples=500)
@given(snapshot_st(), limits_st())
def test_never_above_max_or_below_min(snapshot: Snapshot, limits: PoolLimits) -> None:
    decision = decide(snapshot, limits)
    total = after(snapshot, decision)
    assert total >= limits.min_workers
    if snapshot.capacity <= limits.max_workers:
        assert total <= limits.max_workers
    else:  # already above max: it never adds
        assert decision.spawn == 0


@settings(max_examples=500)
@given(snapshot_st(), limits_st())
def test_only_idle_workers_past_the_timeout_retire_longest_first(
    snapshot: Snapshot, limits: PoolLimits
) -> None:
    decision = decide(snapshot, limits)
    by_id = {w.worker_id: w for w in snapshot.idle}
    assert len(set(decision.retire)) == len(decision.retire)
    for worker_id in decision.retire:
        assert by_id[worker_id].idle_s >= limits.idle_timeout_s  # never a busy or starting one
    kept = [w for w in snapshot.idle if w.worker_id not in decision.retire
            and w.idle_s >= limits.idle_timeout_s]
    for worker_id in decision.retire:
        assert all(by_id[worker_id].idle_s >= w.idle_s for w in kept)


@settings(max_examples=500)
@given(snapshot_st(), limits_st())
def test_one_decision_reaches_the_needed_count(snapshot: Snapshot, limits: PoolLimits) -> None:
    decision = decide(snapshot, limits)
    needed = min(limits.max_workers,
                 max(limits.min_workers, snapshot.busy,
                     math.ceil(snapshot.ready_pending / limits.scale_up_threshold - 1e-9)))
    assert decision.desired == needed == desired_workers(snapshot.ready_pending, snapshot.busy,
                                                         limits)
    assert after(snapshot, decision) >= needed
    # carrying it out leaves nothing more to start: the next decision spawns none
    retired = set(decision.retire)
    next_snapshot = Snapshot(snapshot.ready_pending, snapshot.busy,
                             snapshot.starting + decision.spawn,
                             tuple(w for w in snapshot.idle if w.worker_id not in retired))
    assert decide(next_snapshot, limits).spawn == 0


@settings(max_examples=500)
@given(snapshot_st(), limits_st())
def test_the_seed_conditions_hold(snapshot: Snapshot, limits: PoolLimits) -> None:
    decision = decide(snapshot, limits)
    active = snapshot.capacity
    # grow: pending > active * threshold and active < max
    if snapshot.ready_pending > active * limits.scale_up_threshold + 1e-6 and \
            active < limits.max_workers:
        assert decision.spawn >= 1
    # shrink only when nothing is pending, and never below min
    if decision.retire:
        assert snapshot.ready_pending == 0
        assert after(snapshot, decision) >= limits.min_workers
    # spawning and retiring never happen together
    assert not (decision.spawn and decision.retire)
    # anything pending keeps at least one worker
    if snapshot.ready_pending:
        assert after(snapshot, decision) >= 1


@given(st.integers(0, 20), st.integers(0, 10), st.integers(0, 10))
def test_an_idle_pool_shrinks_to_min_once_everyone_idled_long_enough(
    min_workers: int, extra: int, busy: int
) -> None:
    limits = PoolLimits(min_workers, min_workers + extra + busy + 1, 2, 30)
    snapshot = Snapshot(0, busy=busy, idle=tuple(
        IdleWorker(f"w{i}", 30 + i) for i in range(min_workers + extra)))
    decision = decide(snapshot, limits)
    assert after(snapshot, decision) == max(min_workers, busy)


@given(st.integers(0, 200))
def test_crash_backoff_is_exponential_and_capped(failures: int) -> None:
    delay = crash_backoff_s(failures, base_s=1.0, cap_s=60.0)
    assert 0 <= delay <= 60
    assert crash_backoff_s(failures + 1) >= delay
    if failures == 0:
        assert delay == 0
    elif 2 ** (failures - 1) <= 60:
        assert delay == 2 ** (failures - 1)
    else:
        assert delay == 60


def test_crash_backoff_sequence() -> None:
    assert [crash_backoff_s(n, 0.5, 5) for n in range(7)] == [0, 0.5, 1, 2, 4, 5, 5]


# -- the crash-loop brake ----------------------------------------------------------------------

def _t(seconds: float) -> datetime:
    return datetime(2026, 1, 1) + timedelta(seconds=seconds)


def test_without_failures_every_wanted_start_is_allowed() -> None:
    backoff = CrashBackoff()
    assert not backoff.active and backoff.delay_s == 0
    assert backoff.allowed_starts(4, _t(0), probing=True) == 4
    assert backoff.allowed_starts(0, _t(0), probing=False) == 0
    assert not backoff.first_wait(_t(0))


def test_after_failures_one_probe_starts_once_the_delay_is_over() -> None:
    backoff = CrashBackoff(base_s=1.0, cap_s=60.0)
    backoff.failed(_t(10), "exited with code 1")
    assert backoff.allowed_starts(5, _t(10.5), probing=False) == 0
    assert backoff.next_start_in_s(_t(10.5)) == 0.5
    assert backoff.allowed_starts(5, _t(11), probing=False) == 1
    assert backoff.allowed_starts(5, _t(11), probing=True) == 0  # the probe still starts
    backoff.failed(_t(12), "exited with code 1")
    assert backoff.delay_s == 2
    assert backoff.allowed_starts(5, _t(13.9), probing=False) == 0
    assert backoff.allowed_starts(5, _t(14), probing=False) == 1


def test_the_wait_is_announced_once_per_failure_count() -> None:
    backoff = CrashBackoff()
    backoff.failed(_t(0), "boom")
    assert backoff.first_wait(_t(0.2))
    assert not backoff.first_wait(_t(0.4))
    assert not backoff.first_wait(_t(5))  # over: nothing to announce
    backoff.failed(_t(5), "boom again")
    assert backoff.first_wait(_t(5.1))


def test_a_worker_that_starts_fine_clears_the_brake() -> None:
    backoff = CrashBackoff()
    assert not backoff.clear()
    backoff.failed(_t(0), "boom")
    backoff.failed(_t(1), "boom")
    assert backoff.as_dict(_t(2)) == {"active": True, "failures_in_a_row": 2, "backoff_s": 2.0,
                                      "next_start_in_s": 1.0, "last_failure": "boom"}
    assert backoff.clear()
    assert not backoff.active and backoff.allowed_starts(3, _t(2), probing=True) == 3
    assert backoff.as_dict(_t(2))["next_start_in_s"] == 0


def test_the_decision_log_keeps_the_last_decision_the_changes_and_the_totals() -> None:
    log = DecisionLog(keep=2)
    assert log.as_dict() == {"last_decision": None, "last_change": None,
                             "scaling": {"up_events": 0, "down_events": 0, "workers_started": 0,
                                         "workers_retired": 0}}
    grow = Decision(3, 2, (), "grow")
    log.record(_t(1), grow, started=2, retired=0)
    steady = Decision(3, 0, (), "steady")
    log.record(_t(2), steady, started=0, retired=0)
    assert log.last == steady and list(log.history) == [(_t(1), grow)]
    log.record(_t(3), Decision(1, 0, ("w1", "w2"), "shrink"), started=0, retired=2)
    log.record(_t(4), Decision(2, 1, (), "probe"), started=0, retired=0)  # a start refused
    assert [d.reason for _, d in log.history] == ["shrink", "probe"]  # the oldest fell out
    document = log.as_dict()
    assert document["last_change"]["at"] == _t(4).isoformat() + "Z"
    assert document["scaling"] == {"up_events": 1, "down_events": 1, "workers_started": 2,
                                   "workers_retired": 2}
