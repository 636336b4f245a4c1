"""Capacity: bursts larger than the model server's slots, with time limits that fit the work.

The model server is the scarce resource. The stand-in Ollama serves ``slots`` generations at
once and queues the rest inside itself, as real Ollama does with ``OLLAMA_NUM_PARALLEL``; every
generation takes ``GENERATION_S``. A burst of tasks arrives at a pool with one warm worker;
each task's time limit (``TIMEOUT_S``) fits one generation with room to spare but not a wait
behind several others. Three pools run the same bursts on the same stand-in:

* **koubou**: the README's default configuration (max 5 workers, nothing said about the model
  server): admission per model server, the slot limit found by measuring.
* **seed rule**: the seed's scaling rule (one more worker per 5 s tick while
  ``pending > active * threshold``) and no admission: every worker sends at once.
* **fixed pool**: 5 workers from the start, no admission (what a plain job queue does).

"No admission" is the same product with the slot limit pinned at the worker count
(``KOUBOU_OLLAMA_PARALLEL=5``), so spawning, claiming and HTTP cost the same everywhere.

Reported per slot count and pool: tasks completed, tasks that timed out, slot utilisation
(model time used over slots × makespan) and makespan over the ideal (tasks × generation time /
slots), measured from the first task's ``created_at`` to the last one's ``finished_at``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks._fake_ollama import in_process
from benchmarks.common import (
    bench_settings,
    make_result,
    print_result,
    scratch_dir,
    target,
)
from benchmarks.scale_up import SEED_TICK_S, seed_policy
from koubou_mcp import queue
from koubou_mcp.models import TaskStatus, utcnow
from koubou_mcp.pool import start_in_thread
from koubou_mcp.store import open_store
from koubou_mcp.supervisor import Tuning
from tests.support.waiting import wait_until

NAME = "capacity"
TITLE = "Capacity: bursts larger than the model server's slots"

TARGET_ONE_SLOT = 1.25
TARGET_FOUR_SLOTS = 1.6
POOLS = ("koubou", "seed_rule", "fixed_pool")
DEFAULT_MAX_WORKERS = 5
TTFT_S = 0.1
TOKENS_PER_S = 50.0


@dataclass(frozen=True)
class Scenario:
    generation_s: float
    timeout_s: float
    #: slots -> tasks in the burst
    bursts: tuple[tuple[int, int], ...]
    seed_tick_s: float


FULL = Scenario(generation_s=2.0, timeout_s=5.0, bursts=((1, 8), (2, 12), (4, 20)),
                seed_tick_s=SEED_TICK_S)
QUICK = Scenario(generation_s=0.3, timeout_s=0.8, bursts=((1, 3), (2, 4)), seed_tick_s=1.0)


def _pool_settings(pool: str, home: Path, url: str) -> Any:
    if pool == "koubou":
        return bench_settings(home, url)
    if pool == "seed_rule":
        return bench_settings(home, url, ollama_parallel=DEFAULT_MAX_WORKERS)
    return bench_settings(home, url, ollama_parallel=DEFAULT_MAX_WORKERS,
                          min_workers=DEFAULT_MAX_WORKERS)


def _tuning(pool: str, s: Scenario) -> Tuning:
    if pool == "seed_rule":
        return Tuning(policy=seed_policy, tick_s=s.seed_tick_s, wake_on_work=False)
    return Tuning()


def one_burst(s: Scenario, pool: str, slots: int, tasks: int) -> dict[str, Any]:
    """Run one burst on a fresh home and stand-in; the outcome of every task."""
    # The stand-in streams as Ollama does: a first token after TTFT_S, then TOKENS_PER_S, so
    # admission sees the first-token times it learns from; one reply takes generation_s.
    reply_tokens = round((s.generation_s - TTFT_S) * TOKENS_PER_S)
    with scratch_dir(NAME) as home, in_process(models=["gpt-oss:20b"], slots=slots,
                                               ttft_s=TTFT_S, tokens_per_s=TOKENS_PER_S,
                                               reply_tokens=reply_tokens) as fake:
        settings = _pool_settings(pool, home, fake.url)
        store = open_store(settings.database_url, settings.run_dir)
        handle = start_in_thread(settings, store=store, role="benchmark", tuning=_tuning(pool, s))
        try:
            wait_until(lambda: handle.health().get("workers", {}).get("idle", 0) >= 1, 60,
                       message="a worker to be idle")
            ids = [queue.enqueue(store, queue.validate_request(
                       settings, f"capacity task {i}", timeout_s=s.timeout_s),
                       settings, utcnow()).task.task_id for i in range(tasks)]
            deadline_s = tasks * s.generation_s * 3 + 60

            def ended() -> list[queue.TaskSnapshot] | None:
                got = [queue.get_task(store, i) for i in ids]
                done = all(t.status in (TaskStatus.COMPLETED, TaskStatus.FAILED) for t in got)
                return got if done else None

            started = time.monotonic()
            got = wait_until(ended, deadline_s, interval=0.05, message="every task to end")
            wall_s = time.monotonic() - started
            use = queue.model_server(store, fake.url, utcnow())
            stats = fake.stats()
        finally:
            handle.stop(drain=False, timeout_s=60)
            store.close()
    completed = [t for t in got if t.status == TaskStatus.COMPLETED]
    first = min(t.created_at for t in got)
    last = max(t.finished_at for t in got if t.finished_at is not None)
    makespan_s = (last - first).total_seconds()
    ideal_s = tasks * s.generation_s / slots
    return {
        "slots": slots, "pool": pool, "tasks": tasks, "completed": len(completed),
        "timeouts": sum(1 for t in got if t.error_kind == "timeout"),
        "makespan_s": round(makespan_s, 3), "ideal_s": round(ideal_s, 3),
        "vs_ideal": round(makespan_s / ideal_s, 3),
        "utilisation": round(len(completed) * s.generation_s / (slots * makespan_s), 3),
        "max_in_flight": stats["max_in_flight"], "wall_s": round(wall_s, 3),
        "learned_limit": use.capacity.limit if use else None,
    }


def run(quick: bool = False) -> dict[str, Any]:
    s = QUICK if quick else FULL
    rows = [one_burst(s, pool, slots, tasks) for slots, tasks in s.bursts for pool in POOLS]
    ours = {r["slots"]: r for r in rows if r["pool"] == "koubou"}
    waits = sum(r["timeouts"] for r in ours.values())
    targets = [target("timeouts caused by waiting (koubou, every burst)", "0", str(waits),
                      None if quick else waits == 0)]
    for slots, limit in ((1, TARGET_ONE_SLOT), (4, TARGET_FOUR_SLOTS)):
        if slots in ours:
            r = ours[slots]
            targets.append(target(f"makespan, {slots} slot{'s' if slots > 1 else ''}, limit found "
                                  "by itself", f"<= {limit:g} x ideal", f"x{r['vs_ideal']:.3f}",
                                  None if quick else r["vs_ideal"] <= limit))
    notes = [
        f"Each generation takes {s.generation_s:g} s on the stand-in; each task may run "
        f"{s.timeout_s:g} s. A request queued inside the stand-in waits for a slot there, and "
        "that wait counts against its time limit, as with real Ollama.",
        "learned_limit is the slot limit the pool ended with (the others are pinned at 5, "
        "which is what 'no admission' means here); max_in_flight the most requests the "
        "stand-in held at once, queued ones included.",
        "The makespan above the ideal for koubou is mostly finding the limit: it starts at one "
        "slot and adds one per fast first token, and each added worker takes a process start.",
    ]
    if quick:
        notes.append("--quick: tiny sizes; the numbers mean nothing.")
    return make_result(
        NAME, TITLE,
        "A supervisor in a thread with real worker processes on SQLite and the stand-in Ollama "
        "with 1, 2 and 4 slots; a burst larger than the slots; koubou's defaults against the "
        "seed's rule and a fixed pool of 5, both without admission, in one run.",
        ["slots", "pool", "tasks", "completed", "timeouts", "utilisation", "makespan_s",
         "ideal_s", "vs_ideal", "max_in_flight", "learned_limit"],
        rows, targets, notes, data={"scenario": s.__dict__},
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.capacity",
                                     description="Capacity benchmark (see the module docstring)")
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
