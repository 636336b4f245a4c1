"""Dispatch latency: how long a task submitted to an idle worker waits before it runs.

One real ``koubou-mcp worker`` process waits idle; the benchmark submits one task, waits until
the worker has started it and finished it, pauses a few random milliseconds (so the worker is
back asleep and the submissions do not lock into step with its heartbeat), and submits the
next. Two clocks are read for every task:

* ``created_at -> started_at`` from the task's own row: the submitter stamps ``created_at`` just
  before its enqueue transaction, the worker stamps ``started_at`` just before its claim
  transaction (same machine, same wall clock). This is what ``status``/``stats`` report as the
  wait, and a lower bound of "submit -> in_progress visible".
* ``created_at -> the request reaches the backend``: the stand-in Ollama, in this process, stamps
  the moment the worker's HTTP request arrives. That comes after the claim has committed (and
  after the worker logged it and opened the request), so it is an upper bound of
  "submit -> in_progress visible". The targets are judged on this one.

The peer is the same worker with its wake-up cut off, so that only its poll interval brings it
to new work: the submitter opens the same database with a run directory of its own
(``open_store(url, other_run_dir)``), so its wake-up writes into pipes nobody listens on, while the
worker listens in its own ``$KOUBOU_HOME/run/wake``. No product code is changed for this.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from datetime import UTC
from typing import Any

from benchmarks.common import (
    Children,
    bench_settings,
    cpu_seconds,
    latency_summary,
    make_result,
    percentile,
    ratio,
    scratch_dir,
    spread,
    start_workers,
    target,
)
from koubou_mcp import queue
from koubou_mcp.config import Settings
from koubou_mcp.models import utcnow
from koubou_mcp.store import Store, open_store
from tests.support.tasks import ended
from tests.support.waiting import wait_until

NAME = "dispatch"
TITLE = "Dispatch latency: submit to in_progress with an idle worker (SQLite)"

TARGET_P50_MS = 5.0
TARGET_P99_MS = 20.0


class Arrivals:
    """Stamps (wall clock) the moment each prompt reaches an in-process ``FakeOllama``.

    It wraps the fake's request recorder, which runs as soon as the request body is read.
    """

    def __init__(self, fake: Any) -> None:
        self.times: dict[str, float] = {}
        self._cond = threading.Condition()
        state = fake._state
        original = state.record

        def record(path: str, model: str, prompt: str, body: dict[str, Any]) -> dict[str, Any]:
            stamp = time.time()
            with self._cond:
                self.times[prompt] = stamp
                self._cond.notify_all()
            # the stand-in keeps updating the entry it returns (queue wait, outcome, tokens)
            return original(path, model, prompt, body)

        state.record = record

    def wait(self, prompt: str, timeout_s: float) -> float:
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while prompt not in self.times:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"the worker never called the backend for {prompt!r}")
                self._cond.wait(left)
            return self.times[prompt]


Gaps = Callable[[int], float]


def short_gaps(rng: random.Random, long_every: int = 0) -> Gaps:
    """A few milliseconds between tasks; with ``long_every``, every that many-th task instead
    comes after 0.3-1.3 s of idleness (past the worker's idle heartbeat)."""
    def gap(i: int) -> float:
        if long_every and i % long_every == long_every - 1:
            return rng.uniform(0.3, 1.3)
        return rng.uniform(0.002, 0.010)
    return gap


def random_phase_gaps(rng: random.Random, poll_s: float) -> Gaps:
    """A pause anywhere within the poll interval, so that polling is met at a random phase."""
    return lambda i: rng.uniform(0.002, poll_s)


def measure(store: Store, settings: Settings, arrivals: Arrivals, label: str, count: int,
            gap: Gaps, wait_s: float = 30.0) -> dict[str, list[float]]:
    """Submit ``count`` tasks one after the other, pausing ``gap(i)`` before task ``i``;
    return both latencies of each (seconds) and the pause before it."""
    claim: list[float] = []
    backend: list[float] = []
    idle: list[float] = []
    for i in range(count):
        pause = gap(i)
        time.sleep(pause)
        prompt = f"{label} {i}"
        request = queue.validate_request(settings, prompt)
        now = utcnow()
        submitted = now.replace(tzinfo=UTC).timestamp()
        task_id = queue.enqueue(store, request, settings, now).task.task_id
        arrived = arrivals.wait(prompt, wait_s)
        done = wait_until(lambda tid=task_id: ended(store, tid), timeout=wait_s,  # type: ignore[misc]
                          message=f"{task_id} to end", interval=0.001)
        if done.status != "completed" or done.started_at is None:
            raise RuntimeError(f"{task_id} ended {done.status}: {done.error}")
        claim.append((done.started_at - done.created_at).total_seconds())
        backend.append(arrived - submitted)
        idle.append(pause)
    return {"claim": claim, "backend": backend, "idle": idle}


def measure_setup(children: Children, store: Store, settings: Settings, arrivals: Arrivals,
                  worker_id: str, rounds: int, per_round: int, gap: Gaps, warmup: int = 5,
                  workers: int = 1) -> list[dict[str, list[float]]]:
    """Start ``workers`` idle workers, warm up, measure ``rounds`` rounds, stop them. Each round
    also records the CPU seconds the whole pool spent on it (``pool_cpu_s``)."""
    ids = [worker_id] if workers == 1 else [f"{worker_id}{i}" for i in range(workers)]
    procs = start_workers(children, store, settings, ids)
    try:
        wait_s = settings.poll_s + 30.0
        measure(store, settings, arrivals, f"{worker_id}-warmup", warmup, lambda i: 0.005, wait_s)
        out = []
        for r in range(rounds):
            before = sum(cpu_seconds(p.pid) for p in procs)
            one = measure(store, settings, arrivals, f"{worker_id}-r{r}", per_round, gap, wait_s)
            one["pool_cpu_s"] = [sum(cpu_seconds(p.pid) for p in procs) - before]
            out.append(one)
        return out
    finally:
        children.stop(procs)


def summarize(setup: str, rounds: list[dict[str, list[float]]],
              min_idle_s: float = 0.0) -> dict[str, Any]:
    """One table row: percentiles over every task of every round (or only those submitted after
    at least ``min_idle_s`` of idleness), and the spread of the per-round percentiles."""
    def pick(r: dict[str, list[float]], key: str) -> list[float]:
        return [v for v, idle in zip(r[key], r["idle"], strict=True) if idle >= min_idle_s]

    claim = [v for r in rounds for v in pick(r, "claim")]
    backend = [v for r in rounds for v in pick(r, "backend")]
    c, b = latency_summary(claim), latency_summary(backend)
    by_round = [pick(r, "backend") for r in rounds]
    return {
        "setup": setup,
        "tasks": len(claim),
        "row_p50_ms": c["p50_ms"], "row_p95_ms": c["p95_ms"], "row_p99_ms": c["p99_ms"],
        "row_max_ms": c["max_ms"],
        "backend_p50_ms": b["p50_ms"], "backend_p95_ms": b["p95_ms"],
        "backend_p99_ms": b["p99_ms"], "backend_max_ms": b["max_ms"],
        "backend_p50_by_round_ms": spread([percentile(v, 50) * 1000 for v in by_round if v]),
        "backend_p99_by_round_ms": spread([percentile(v, 99) * 1000 for v in by_round if v]),
        "pool_cpu_ms_per_task": None if min_idle_s or not claim else
        1000 * sum(r["pool_cpu_s"][0] for r in rounds) / len(claim),
    }


COLUMNS = ["setup", "tasks", "row_p50_ms", "row_p99_ms", "backend_p50_ms", "backend_p95_ms",
           "backend_p99_ms", "backend_max_ms", "backend_p50_by_round_ms", "vs_wakeup",
           "pool_cpu_ms_per_task"]


def judge(row: dict[str, Any], store_name: str) -> list[dict[str, Any]]:
    p50, p99 = row["backend_p50_ms"], row["backend_p99_ms"]
    return [
        target(f"dispatch p50 on {store_name}", f"<= {TARGET_P50_MS:g} ms", f"{p50:.2f} ms "
               f"(row stamps: {row['row_p50_ms']:.2f} ms)", p50 <= TARGET_P50_MS),
        target(f"dispatch p99 on {store_name}", f"<= {TARGET_P99_MS:g} ms", f"{p99:.2f} ms "
               f"(row stamps: {row['row_p99_ms']:.2f} ms)", p99 <= TARGET_P99_MS),
    ]


def add_ratios(rows: list[dict[str, Any]]) -> None:
    base = rows[0]["backend_p50_ms"]
    for row in rows:
        r = ratio(row["backend_p50_ms"], base)
        row["vs_wakeup"] = "-" if r is None else (f"{r:.0f}x" if r >= 10 else f"{r:.1f}x")


LONG_EVERY = 24
HERD = 4


def run(quick: bool) -> dict[str, Any]:
    from benchmarks._fake_ollama import in_process as FakeOllama

    rounds, per_round = (1, 20) if quick else (5, 120)
    polls = [(0.2, 3)] if quick else [(1.0, 20), (0.1, 40)]
    herd_workers, herd_tasks = (2, 10) if quick else (HERD, 150)
    rng = random.Random(7)
    rows: list[dict[str, Any]] = []
    data: dict[str, Any] = {}
    with FakeOllama(models=["gpt-oss:20b"]) as fake, scratch_dir(NAME) as tmp, \
            Children(tmp / "logs") as children:
        arrivals = Arrivals(fake)
        db_url = f"sqlite:///{tmp / 'koubou.db'}"
        settings = bench_settings(tmp / "home", fake.url, db_url)
        store = open_store(settings.database_url, settings.run_dir)
        try:
            woken = measure_setup(children, store, settings, arrivals, "wake", rounds,
                                  per_round, short_gaps(rng, 0 if quick else LONG_EVERY))
            rows.append(summarize("wake-up (FIFO), 1 idle worker", woken))
            if not quick:
                rows.append(summarize("  of which after 0.3-1.3 s idle", woken, min_idle_s=0.3))
            data["wakeup"] = woken
            herd = measure_setup(children, store, settings, arrivals, "herd", 1, herd_tasks,
                                 short_gaps(rng), workers=herd_workers)
            rows.append(summarize(f"wake-up (FIFO), {herd_workers} idle workers", herd))
            data["herd"] = herd
        finally:
            store.close()
        # The peer: the submitter's wake-ups go to a directory no worker listens in.
        silent = open_store(db_url, tmp / "silent-run")
        try:
            for poll_s, count in polls:
                peer_settings = bench_settings(tmp / f"home-poll-{poll_s:g}", fake.url, db_url,
                                               poll_s=poll_s, poll_max_s=poll_s)
                polled = measure_setup(children, silent, peer_settings, arrivals,
                                       f"poll{poll_s:g}".replace(".", "_"), 1, count,
                                       random_phase_gaps(rng, poll_s), warmup=1)
                row = summarize(f"no wake-up, polling every {poll_s:g} s", polled)
                row["pool_cpu_ms_per_task"] = None  # dominated by idle CPU over the long pauses
                rows.append(row)
                data[f"poll_{poll_s:g}"] = polled
        finally:
            silent.close()
    add_ratios(rows)
    notes = [
        "`row_*`: created_at -> started_at from the task row (a lower bound); "
        "`backend_*`: created_at -> the worker's request reaching the stand-in Ollama (an upper "
        "bound: it includes the claim commit, the worker's log line and the HTTP request). "
        "The targets are judged on the upper bound.",
        "`vs_wakeup`: backend p50 of the row over that of the first row. The polling rows run the "
        "same product code with the wake-up cut off, and submit at a random phase of the poll "
        "interval: a polled task waits on average half the interval.",
        f"The worker runs the product defaults (poll {settings.poll_s:g} s, heartbeat "
        f"{settings.heartbeat_s:g} s, lease {settings.lease_s:g} s). Every {LONG_EVERY}th "
        "task follows 0.3-1.3 s of idleness, so idle heartbeats (write transactions a submission "
        "can queue behind) and a worker that has been asleep for a while are in the sample. "
        "Those are about twice as slow; timestamps inside the worker showed every step (wake-up, "
        "claim, request) slower alike after such a pause, which points at the sleeping "
        "(virtual) CPU rather than at one piece of code.",
        f"With {herd_workers} idle workers each submission wakes one of them (one byte in the "
        "pipe they share, which one idle worker reads): `pool_cpu_ms_per_task` (CPU of all "
        "worker processes / tasks, short pauses only) is close to one idle worker's, the rest "
        "being the other workers' idle wake-ups over the run.",
        "The machine has 2 cores, shared by the submitter (this process, which also serves the "
        "stand-in Ollama) and the worker(s).",
    ]
    if quick:
        notes.insert(0, "Quick mode: too few tasks for the percentiles to mean anything.")
    return make_result(NAME, TITLE, (
        f"One idle `koubou-mcp worker` process; {rounds * per_round} tasks submitted one at a "
        "time (each after the previous ended and a pause), each timed from just before its "
        f"enqueue to its start; then the same with {herd_workers} idle workers; the peer is the "
        "same worker with the wake-up cut off, so only its polling brings it to new work."),
        COLUMNS, rows, judge(rows[0], "SQLite"), notes, data=data)
