"""How many generations a model server can run at once: the limit-finding rule. Pure.

Ollama serves ``OLLAMA_NUM_PARALLEL`` generations at once and queues the rest inside itself,
where a request's time limit runs out while it waits. So a worker only sends a request while it
holds one of the server's *slots* (see ``queue.claim_next``), and this module decides how many
slots there are. Measurements and ``now`` come in, a new ``Capacity`` goes out; the store keeps
it (``model_servers``) so every worker of every process and host shares one view.

The rule, for a limit nobody pinned (``KOUBOU_OLLAMA_PARALLEL`` pins it):

* Start at one slot.
* When a request gets its first token about as fast as the server's baseline while every slot
  is in use, the server really ran that many at once: allow one more (never above ``--max``,
  never back to a level that failed recently).
* When the first token comes much later than the baseline, the request waited inside the
  server: the level it ran at is too high. Go back to one below it and remember that level as
  the ceiling for ``CEILING_HOLD_S``; after that a probe may try it again (the server may have
  been busy with someone else).
* When the slots no longer add speed (per-request tokens/s fell so far that the requests
  together generate less than a quarter of one request's speed more per extra slot: the
  server only time-slices), step back the same way.
* HTTP 503 "server busy" means its own queue is full: step back below the level it happened at.

The first-token baseline is the fastest first token seen at a level known to be good, allowed
to drift up slowly so that a server that became slower for good (a bigger model) is relearned.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timedelta

#: a first token slower than ``baseline * TTFT_FACTOR + TTFT_MARGIN_S`` means it waited
TTFT_FACTOR = 2.0
TTFT_MARGIN_S = 0.5
#: a level that failed is not tried again for this long
CEILING_HOLD_S = 300.0
#: each good observation lets the baseline drift up by this fraction (relearning a slower server)
BASELINE_DRIFT = 0.02
#: each slot beyond the first must add at least this share of one request's speed alone
MIN_GAIN = 0.25


@dataclass(frozen=True)
class Capacity:
    """What the pool believes about one model server (one row of ``model_servers``)."""

    url: str
    limit: int = 1
    pinned: bool = False
    #: the highest level at which the server was seen to run everything at once
    good: int = 0
    #: the lowest level seen to fail (queueing, 503, no gain), and when
    ceiling: int | None = None
    ceiling_at: datetime | None = None
    baseline_ttft_s: float | None = None
    baseline_tps: float | None = None
    last_ttft_s: float | None = None
    last_tps: float | None = None
    busy_events: int = 0

    def expected_ttft_s(self) -> float | None:
        """Up to this long, a first token did not wait inside the server (None: no baseline)."""
        if self.baseline_ttft_s is None:
            return None
        return self.baseline_ttft_s * TTFT_FACTOR + TTFT_MARGIN_S


@dataclass(frozen=True)
class Observation:
    """One request's measurements. ``concurrency``: requests in flight on the server when it
    was admitted, itself included."""

    concurrency: int
    first_token_s: float | None = None
    tokens_per_s: float | None = None
    busy: bool = False


def pinned(url: str, limit: int) -> Capacity:
    """The capacity of a server whose limit is set by hand."""
    return Capacity(url=url, limit=limit, pinned=True)


def next_capacity(cap: Capacity, obs: Observation, now: datetime, max_limit: int) -> Capacity:
    """The capacity after ``obs``. Same inputs, same answer; no I/O, no clock."""
    if obs.concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, got {obs.concurrency}")
    if max_limit < 1:
        raise ValueError(f"max_limit must be at least 1, got {max_limit}")
    cap = _recorded(cap, obs)
    if obs.busy:
        cap = replace(cap, busy_events=cap.busy_events + 1)
    if cap.pinned:
        return cap
    level = obs.concurrency
    if obs.busy:
        return _step_back(cap, level, now)
    if obs.first_token_s is not None:
        expected = cap.expected_ttft_s()
        if expected is not None and obs.first_token_s > expected and level > 1:
            return _step_back(cap, level, now)
        cap = _good_at(cap, level, first_token_s=obs.first_token_s)
        if level >= cap.limit:
            cap = _raise(cap, now, max_limit)
        return cap
    if obs.tokens_per_s is not None and obs.tokens_per_s > 0:
        if level == 1 or cap.baseline_tps is None:
            base = cap.baseline_tps
            return replace(cap, baseline_tps=obs.tokens_per_s if base is None
                           else max(obs.tokens_per_s, base * (1 - BASELINE_DRIFT)))
        # ``level`` requests together must generate clearly faster than one alone
        if obs.tokens_per_s * level < cap.baseline_tps * (1 + (level - 1) * MIN_GAIN):
            return _step_back(cap, level, now)
    return replace(cap, limit=min(cap.limit, max_limit))


def _recorded(cap: Capacity, obs: Observation) -> Capacity:
    return replace(
        cap,
        last_ttft_s=obs.first_token_s if obs.first_token_s is not None else cap.last_ttft_s,
        last_tps=obs.tokens_per_s if obs.tokens_per_s is not None else cap.last_tps,
    )


def _good_at(cap: Capacity, level: int, *, first_token_s: float) -> Capacity:
    base = cap.baseline_ttft_s
    baseline = first_token_s if base is None else min(base * (1 + BASELINE_DRIFT), first_token_s)
    ceiling, ceiling_at = cap.ceiling, cap.ceiling_at
    if ceiling is not None and level >= ceiling:
        ceiling, ceiling_at = None, None  # the level that failed works now
    return replace(cap, good=max(cap.good, level), baseline_ttft_s=baseline,
                   ceiling=ceiling, ceiling_at=ceiling_at)


def _raise(cap: Capacity, now: datetime, max_limit: int) -> Capacity:
    wanted = min(cap.limit + 1, max_limit)
    held = (cap.ceiling is not None and cap.ceiling_at is not None and
            now - cap.ceiling_at < timedelta(seconds=CEILING_HOLD_S))
    if held and cap.ceiling is not None and wanted >= cap.ceiling:
        return cap
    return replace(cap, limit=wanted)


def _step_back(cap: Capacity, level: int, now: datetime) -> Capacity:
    limit = max(1, min(cap.limit, level - 1))
    return replace(cap, limit=limit, good=min(cap.good, limit), ceiling=max(level, limit + 1),
                   ceiling_at=now)
