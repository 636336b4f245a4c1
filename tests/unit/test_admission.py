"""The limit-finding rule: measurements and ``now`` in, a model server's slot limit out.

Pure, so each case is a sequence of observations; the properties run on generated sequences.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from koubou_mcp.admission import (
    CEILING_HOLD_S,
    Capacity,
    Observation,
    next_capacity,
    pinned,
)

T0 = datetime(2026, 12, 1, 12, 0, 0)
URL = "http://127.0.0.1:11434"


def run(observations: list[Observation], *, max_limit: int = 5, start: Capacity | None = None,
        step_s: float = 1.0) -> Capacity:
    cap = start or Capacity(URL)
    for i, obs in enumerate(observations):
        cap = next_capacity(cap, obs, T0 + timedelta(seconds=i * step_s), max_limit)
    return cap


def fast(level: int) -> Observation:
    return Observation(level, first_token_s=0.2)


def slow(level: int) -> Observation:
    """A first token that waited behind another generation inside the server."""
    return Observation(level, first_token_s=20.0)


def test_a_new_server_starts_with_one_slot() -> None:
    assert Capacity(URL).limit == 1


def test_a_fast_first_token_with_every_slot_in_use_allows_one_more() -> None:
    assert run([fast(1)]).limit == 2
    assert run([fast(1), fast(2), fast(3)]).limit == 4


def test_a_fast_first_token_below_the_limit_does_not_raise_it() -> None:
    cap = run([fast(1), fast(2)])  # limit 3 now
    assert run([fast(1)], start=cap).limit == 3


def test_never_above_max() -> None:
    assert run([fast(1), fast(2), fast(3), fast(4)], max_limit=2).limit == 2


def test_a_first_token_that_waited_in_the_server_steps_back_below_its_level() -> None:
    cap = run([fast(1), slow(2)])
    assert cap.limit == 1
    assert cap.ceiling == 2


def test_a_failed_level_is_not_tried_again_until_the_hold_is_over() -> None:
    cap = run([fast(1), slow(2)])
    held = next_capacity(cap, fast(1), T0 + timedelta(seconds=10), 5)
    assert held.limit == 1
    later = next_capacity(cap, fast(1), T0 + timedelta(seconds=CEILING_HOLD_S + 10), 5)
    assert later.limit == 2


def test_busy_503_steps_back_and_is_counted() -> None:
    cap = run([fast(1), fast(2), fast(3)])  # limit 4
    cap = next_capacity(cap, Observation(4, busy=True), T0 + timedelta(seconds=5), 5)
    assert (cap.limit, cap.ceiling, cap.busy_events) == (3, 4, 1)


def test_busy_at_one_slot_keeps_one_slot() -> None:
    assert run([Observation(1, busy=True)]).limit == 1


def test_a_slot_that_adds_no_speed_is_given_back() -> None:
    cap = run([fast(1), Observation(1, tokens_per_s=50.0), fast(2), fast(3)])  # limit 4
    # three at once at 20 tok/s each = 60 tok/s: the server only shares one request's speed
    cap = next_capacity(cap, Observation(3, tokens_per_s=20.0), T0 + timedelta(seconds=9), 5)
    assert cap.limit == 2


def test_a_slot_that_adds_speed_is_kept() -> None:
    cap = run([fast(1), Observation(1, tokens_per_s=50.0), fast(2), fast(3)])  # limit 4
    cap = next_capacity(cap, Observation(3, tokens_per_s=30.0), T0 + timedelta(seconds=9), 5)
    assert cap.limit == 4


def test_a_pinned_limit_never_moves_but_measurements_are_kept() -> None:
    cap = run([fast(1), slow(2), Observation(1, busy=True)], start=pinned(URL, 3))
    assert (cap.limit, cap.pinned) == (3, True)
    assert cap.last_ttft_s == 20.0


def test_the_baseline_follows_the_fastest_first_token() -> None:
    cap = run([Observation(1, first_token_s=5.0), Observation(1, first_token_s=0.5)])
    assert cap.baseline_ttft_s == 0.5
    assert cap.expected_ttft_s() == pytest.approx(0.5 * 2 + 0.5)


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="concurrency"):
        next_capacity(Capacity(URL), Observation(0), T0, 5)
    with pytest.raises(ValueError, match="max_limit"):
        next_capacity(Capacity(URL), Observation(1), T0, 0)


observations = st.lists(st.builds(
    Observation,
    concurrency=st.integers(1, 8),
    first_token_s=st.one_of(st.none(), st.floats(0.01, 60)),
    tokens_per_s=st.one_of(st.none(), st.floats(0.1, 500)),
    busy=st.booleans(),
), max_size=40)


@given(observations, st.integers(1, 8))
def test_the_limit_stays_within_one_and_max(obs: list[Observation], max_limit: int) -> None:
    cap = Capacity(URL)
    for i, o in enumerate(obs):
        cap = next_capacity(cap, o, T0 + timedelta(seconds=i), max_limit)
        assert 1 <= cap.limit <= max_limit


@given(observations)
def test_the_limit_grows_by_at_most_one_per_observation(obs: list[Observation]) -> None:
    cap = Capacity(URL)
    for i, o in enumerate(obs):
        new = next_capacity(cap, o, T0 + timedelta(seconds=i), 8)
        assert new.limit <= cap.limit + 1
        cap = new
