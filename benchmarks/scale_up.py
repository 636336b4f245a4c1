"""Scale-up: how fast the pool follows a burst, and how well it keeps a parallel backend busy.

Both measurements run the real thing: a supervisor (in a thread of this process, as the MCP
server hosts it) starting real ``koubou-mcp worker`` processes on a private SQLite store with
product defaults, against the stand-in Ollama (``benchmarks._fake_ollama``: the tests' fake with
Nagle's algorithm off, as real Ollama) answering every request after a fixed latency.

(a) **Burst to max.** One worker is alive and idle; 50 tasks arrive at once; we time how long
    until ``max_workers`` requests are in flight at the fake server (holding one of its 4 slots
    or waiting in its queue), i.e. ``max_workers`` workers busy.
(b) **Makespan.** 100 tasks of 1 s on a backend that serves 4 requests at once (a realistic
    ``OLLAMA_NUM_PARALLEL``), with ``max_workers=5`` and one worker alive at the start; the
    ideal is 100 × 1 / 4 = 25 s.
    Measured from the first task's ``created_at`` to the last one's ``finished_at``.

The peer is the seed's rule, simulated through the *same* harness: our ``Supervisor`` run with
``Tuning(policy=seed_policy, tick_s=5, wake_on_work=False)``, where ``seed_policy`` is the seed's
rule (one more worker per tick when ``pending > active * threshold``) and 5 s its loop interval.
Spawning, start-up and claiming cost the same; only the rule and the cadence differ. The burst
lands at an arbitrary point of the seed's 5 s cycle, as it would in reality.

``run(quick)`` returns a result in the convention of ``benchmarks/__init__.py``;
``python -m benchmarks.scale_up [--quick]`` runs it alone.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks._fake_ollama import in_process
from benchmarks.common import (
    bench_settings,
    make_result,
    median,
    print_result,
    scratch_dir,
    spread,
    target,
)
from koubou_mcp import queue
from koubou_mcp.config import Settings
from koubou_mcp.models import utcnow
from koubou_mcp.pool import PoolHandle, start_in_thread
from koubou_mcp.scaling import Decision, Limits, Snapshot
from koubou_mcp.store import Store, open_store
from koubou_mcp.supervisor import Tuning
from tests.support.waiting import wait_until

NAME = "scale_up"
TITLE = "Scale-up: burst to max workers busy, and makespan on a 4-slot backend"

SEED_TICK_S = 5.0
#: The burst's stand-in serves 4 generations at once; a busy worker is one whose request is in
#: flight there, generating or queued.
BURST_SLOTS = 4
TARGET_BURST_S = 2.0
TARGET_MAKESPAN_RATIO = 1.1


def seed_policy(snapshot: Snapshot, limits: Limits) -> Decision:
    """The seed's Worker Pool Manager rule: at most one new worker per tick, when
    ``pending > active * threshold``; shrink idle workers to ``min`` when nothing is pending."""
    active = snapshot.capacity
    if active < limits.min_workers:
        return Decision(limits.min_workers, limits.min_workers - active, (), "seed: min")
    if snapshot.ready_pending > active * limits.scale_up_threshold and \
            active < limits.max_workers:
        return Decision(active + 1, 1, (), "seed: pending > active * threshold")
    if snapshot.ready_pending == 0 and active > limits.min_workers:
        idle = sorted(snapshot.idle, key=lambda w: -w.idle_s)
        expired = [w.worker_id for w in idle if w.idle_s >= limits.idle_timeout_s]
        return Decision(limits.min_workers, 0,
                        tuple(expired[:active - limits.min_workers]), "seed: idle")
    return Decision(active, 0, (), "seed: steady")


@dataclass(frozen=True)
class Scenario:
    burst_tasks: int
    burst_max_workers: int
    burst_latency_s: float
    burst_runs: int
    seed_tick_s: float
    makespan_tasks: int
    makespan_task_s: float
    makespan_slots: int
    makespan_max_workers: int


FULL = Scenario(burst_tasks=50, burst_max_workers=5, burst_latency_s=2.0, burst_runs=3,
                seed_tick_s=SEED_TICK_S, makespan_tasks=100, makespan_task_s=1.0,
                makespan_slots=4, makespan_max_workers=5)
QUICK = Scenario(burst_tasks=10, burst_max_workers=3, burst_latency_s=1.0, burst_runs=1,
                 seed_tick_s=1.0, makespan_tasks=10, makespan_task_s=0.2,
                 makespan_slots=3, makespan_max_workers=3)


def _tuning(policy: str, s: Scenario) -> Tuning:
    if policy == "koubou":
        return Tuning()
    return Tuning(policy=seed_policy, tick_s=s.seed_tick_s, wake_on_work=False)


@dataclass
class _Pool:
    settings: Settings
    store: Store
    fake: Any
    handle: PoolHandle
    #: seconds from the supervisor's start to its first worker being idle
    first_worker_s: float

    def submit(self, n: int) -> None:
        for i in range(n):
            request = queue.validate_request(self.settings, f"scale-up task {i}")
            queue.enqueue(self.store, request, self.settings, utcnow())


@contextmanager
def _pool(*, max_workers: int, latency_s: float, slots: int, tuning: Tuning,
          pinned_limit: int | None = None) -> Iterator[_Pool]:
    """A private home, store and fake; a supervisor in a thread; one idle worker.
    ``pinned_limit``: the model server's slot limit set by hand (KOUBOU_OLLAMA_PARALLEL)
    instead of learned."""
    with scratch_dir(NAME) as home, in_process(models=["gpt-oss:20b"], latency_s=latency_s,
                                               slots=slots) as fake:
        pin: dict[str, Any] = {"ollama_parallel": pinned_limit} if pinned_limit else {}
        settings = bench_settings(home, fake.url, min_workers=1, max_workers=max_workers, **pin)
        store = open_store(settings.database_url, settings.run_dir)
        started = time.monotonic()
        handle = start_in_thread(settings, store=store, role="benchmark", tuning=tuning)
        try:
            wait_until(lambda: handle.health().get("workers", {}).get("idle") == 1, timeout=60,
                       message="the first worker to be idle", interval=0.01)
            yield _Pool(settings, store, fake, handle, time.monotonic() - started)
        finally:
            handle.stop(drain=False, timeout_s=60)
            store.close()


def burst_to_max(s: Scenario, policy: str) -> dict[str, float]:
    """Seconds from a burst of ``s.burst_tasks`` to ``s.burst_max_workers`` workers busy."""
    # the limit is pinned at max_workers: the burst measures how fast the supervisor scales,
    # not how fast the admission learns the server's slots (one step per answer, 2 s here),
    # which the capacity benchmark measures
    with _pool(max_workers=s.burst_max_workers, latency_s=s.burst_latency_s, slots=BURST_SLOTS,
               tuning=_tuning(policy, s), pinned_limit=s.burst_max_workers) as pool:
        start = time.monotonic()
        pool.submit(s.burst_tasks)
        wait_until(lambda: pool.fake.stats()["in_flight"] >= s.burst_max_workers, timeout=120,
                   message=f"{s.burst_max_workers} busy workers", interval=0.005)
        return {"burst_s": time.monotonic() - start, "first_worker_s": pool.first_worker_s}


def makespan(s: Scenario, policy: str) -> dict[str, float]:
    """Seconds from enqueueing ``s.makespan_tasks`` tasks to the last one completed."""
    with _pool(max_workers=s.makespan_max_workers, latency_s=s.makespan_task_s,
               slots=s.makespan_slots, tuning=_tuning(policy, s)) as pool:
        pool.submit(s.makespan_tasks)
        wait_until(lambda: queue.counts_by_status(pool.store)["completed"] == s.makespan_tasks,
                   timeout=600, message="every task to complete", interval=0.05)
        tasks = queue.list_tasks(pool.store, limit=s.makespan_tasks)
        first = min(t.created_at for t in tasks)
        last = max(t.finished_at for t in tasks if t.finished_at is not None)
        return {"makespan_s": (last - first).total_seconds(),
                "max_concurrency": pool.fake.stats()["max_concurrency"]}


def run(quick: bool = False) -> dict[str, Any]:
    """Both measurements, ours and the seed's rule; a result in the shared convention."""
    s = QUICK if quick else FULL
    ours = [burst_to_max(s, "koubou") for _ in range(s.burst_runs)]
    seed = burst_to_max(s, "seed")
    ideal = s.makespan_tasks * s.makespan_task_s / min(s.makespan_slots, s.makespan_max_workers)
    span = makespan(s, "koubou")
    seed_span = makespan(s, "seed")

    burst = [r["burst_s"] for r in ours]
    start_up = [r["first_worker_s"] for r in ours]
    ratio = span["makespan_s"] / ideal
    rows = [
        {"measurement": f"burst of {s.burst_tasks} to {s.burst_max_workers} workers busy (s)",
         "koubou": spread(burst), "seed_rule": round(seed["burst_s"], 3), "ideal": None,
         "koubou_vs_ideal": None},
        {"measurement": f"makespan of {s.makespan_tasks} x {s.makespan_task_s:g} s, "
                        f"{s.makespan_slots} slots, max {s.makespan_max_workers} (s)",
         "koubou": round(span["makespan_s"], 3), "seed_rule": round(seed_span["makespan_s"], 3),
         "ideal": round(ideal, 3), "koubou_vs_ideal": f"x{ratio:.3f}"},
    ]
    # a quick run's sizes are too small for the targets to mean anything: not judged
    targets = [
        target(f"burst of {s.burst_tasks} to max workers busy",
               f"<= {TARGET_BURST_S:g} s", f"{median(burst):.2f} s",
               None if quick else median(burst) <= TARGET_BURST_S),
        target(f"makespan of {s.makespan_tasks} x {s.makespan_task_s:g} s tasks",
               f"<= {TARGET_MAKESPAN_RATIO:g} x ideal ({ideal:g} s)", f"x{ratio:.3f}",
               None if quick else ratio <= TARGET_MAKESPAN_RATIO),
    ]
    notes = [
        "The burst runs with the model server's slot limit pinned at max workers "
        "(KOUBOU_OLLAMA_PARALLEL), for both rules: it measures how fast the supervisor "
        "scales. Left to learn the limit, the admission lets one more request in per answer "
        f"at full speed (about {s.burst_latency_s:g} s each here), so reaching "
        f"{s.burst_max_workers} in flight takes about {(s.burst_max_workers - 1) * s.burst_latency_s:g} s "
        "by design; the capacity benchmark measures that learning. The makespan runs with "
        "the learned limit.",
        f"A worker process takes about {median(start_up):.2f} s from spawn to idle here "
        "(interpreter start and imports); the burst time is essentially one start-up, because "
        "all missing workers are started in one decision.",
        "The seed rule is simulated through the same supervisor with its policy swapped for the "
        f"seed's (one worker per tick) and a {s.seed_tick_s:g} s tick without wake-ups.",
        "The makespan above the ideal is mostly that start-up: for its first ~second only the "
        "one warm worker serves.",
    ]
    if quick:
        notes.append("--quick: tiny sizes and a 1 s seed tick; the numbers mean nothing.")
    return make_result(
        NAME, TITLE,
        "A supervisor in a thread with real worker processes on SQLite and the stand-in Ollama; "
        "one warm worker, then a burst. Burst: time until max requests are in flight at the "
        "backend. Makespan: first created_at to last finished_at. The seed's rule runs through "
        "the same supervisor (policy swapped, 5 s tick).",
        ["measurement", "koubou", "seed_rule", "ideal", "koubou_vs_ideal"], rows, targets, notes,
        data={"scenario": s.__dict__, "burst": ours, "seed_burst": seed, "makespan": span,
              "seed_makespan": seed_span, "ideal_makespan_s": ideal},
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scale_up",
                                     description="Scale-up benchmark (see the module docstring)")
    parser.add_argument("--quick", action="store_true", help="a tiny run, to check the harness")
    parser.add_argument("--json", type=Path, help="also write the result to this file")
    args = parser.parse_args(argv)
    result = run(quick=args.quick)
    print_result(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
