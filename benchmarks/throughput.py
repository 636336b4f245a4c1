"""Queue throughput end to end: koubou-mcp workers against huey, and the raw SQLite ceiling.

One run = N idle worker processes, then (clock starts) a batch of tasks submitted one
transaction each from this process, each task claimed by a worker, sent to the stand-in Ollama
(zero latency, over HTTP, in a process of its own) and recorded complete; the clock stops when
the last result is stored. Throughput = batch / elapsed.

Peers, in the same run, repeated and alternated (who goes first swaps every repeat):

* huey 3 with SqliteHuey, ``huey_consumer -k process -w N`` (N worker processes), the task
  doing the same HTTP request (``benchmarks/_huey_app.py``), same SQLite pragmas; its idle
  polling tightened to 10-50 ms (``-d 0.01 -m 0.05``) so that it is not its 0.1-10 s default
  poll interval that is measured.
* the raw SQLite ceiling: one ``sqlite3`` connection doing insert, claim (the same
  ``UPDATE ... RETURNING`` and worker-row update) and complete as bare SQL transactions in a
  loop, with the same pragmas, with and without the same HTTP call.
"""

from __future__ import annotations

import sqlite3
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import (
    Children,
    bench_settings,
    children_of,
    cpu_seconds,
    has_exited,
    make_result,
    median,
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
from tests.support.env import plain_env
from tests.support.waiting import wait_until

NAME = "throughput"
TITLE = "Queue throughput end to end: koubou-mcp against huey (SQLite)"
#: drain throughput against huey's, with 1 and 2 workers (issue 17's floor; 1.5x is the goal
#: beyond it, reported in the notes)
TARGET_VS_HUEY = 1.0
GOAL_VS_HUEY = 1.5
TARGET_WORKERS = (1, 2)
MODEL = "gpt-oss:20b"


# -- koubou-mcp ---------------------------------------------------------------------------


def submit(store: Store, settings: Settings, count: int, label: str) -> None:
    for i in range(count):
        request = queue.validate_request(settings, f"{label} {i}")
        queue.enqueue(store, request, settings, utcnow())


def submit_at_once(store: Store, settings: Settings, count: int, label: str) -> None:
    """``count`` tasks in one ``enqueue_many`` (a batch delegated in one call)."""
    requests = [queue.validate_request(settings, f"{label} {i}") for i in range(count)]
    queue.enqueue_many(store, requests, settings, utcnow())


def ended_count(store: Store) -> int:
    counts = queue.counts_by_status(store)
    if counts["failed"] or counts["cancelled"]:
        raise RuntimeError(f"tasks did not complete: {counts}")
    return counts["completed"]


def ours_once(children: Children, store: Store, settings: Settings, workers: int, batch: int,
              label: str, timeout_s: float = 300.0,
              peers: Callable[[], dict[str, float]] | None = None,
              at_once: bool = False) -> dict[str, float]:
    """Start ``workers`` workers on ``store``, warm them up, time one batch, stop them.
    ``peers``: CPU seconds so far of other parties (name -> seconds), reported for the batch
    as ``<name>_cpu_ms_per_task``. ``at_once``: the batch is enqueued in one call
    (``submit_at_once``), not one task at a time."""
    ids = [f"{label}-w{i}" for i in range(workers)]
    procs = start_workers(children, store, settings, ids)
    try:
        before = ended_count(store)
        warm = 2 * workers
        submit(store, settings, warm, f"{label}-warm")
        wait_until(lambda: ended_count(store) >= before + warm, timeout=60, message="warm-up tasks",
                   interval=0.01)
        peers_before = peers() if peers is not None else {}
        cpu_before = sum(cpu_seconds(p.pid) for p in procs)
        started = time.perf_counter()
        (submit_at_once if at_once else submit)(store, settings, batch, label)
        submitted = time.perf_counter()
        wait_until(lambda: ended_count(store) >= before + warm + batch, timeout=timeout_s,
                   message=f"{batch} tasks on {workers} worker(s)", interval=0.01)
        elapsed = time.perf_counter() - started
        cpu = sum(cpu_seconds(p.pid) for p in procs) - cpu_before
        peers_after = peers() if peers is not None else {}
    finally:
        children.stop(procs)
    return {"tasks_per_s": batch / elapsed, "elapsed_s": elapsed,
            "submit_s": submitted - started, "cpu_ms_per_task": 1000 * cpu / batch,
            **{f"{name}_cpu_ms_per_task": 1000 * (peers_after[name] - seconds) / batch
               for name, seconds in peers_before.items() if name in peers_after}}


# -- huey ---------------------------------------------------------------------------------


def huey_once(children: Children, tmp: Path, fake_url: str, workers: int, batch: int,
              label: str, timeout_s: float = 300.0) -> dict[str, float]:
    from benchmarks import _huey_app

    db = tmp / f"{label}.huey.db"
    app, chat = _huey_app.create(str(db))
    proc = children.spawn(
        [sys.executable, "-m", "huey.bin.huey_consumer", "benchmarks._huey_app.huey",
         "-w", str(workers), "-k", "process", "-d", "0.01", "-m", "0.05", "-n"],
        plain_env({"KOUBOU_BENCH_HUEY_DB": str(db)}), label)

    def pids() -> list[int]:
        return [proc.pid, *children_of(proc.pid)]

    def results() -> int:
        if has_exited(proc):
            raise RuntimeError("huey consumer exited:\n"
                               + children.log_tail(label))
        return int(app.storage.result_store_size())

    try:
        warm = 2 * workers
        for i in range(warm):
            chat(fake_url, MODEL, f"{label}-warm {i}")
        wait_until(lambda: results() >= warm, timeout=60, message="huey warm-up tasks", interval=0.01)
        consumer = pids()
        if len(consumer) < workers + 1:  # N workers and, in process mode, the scheduler
            raise RuntimeError(f"huey consumer has {len(consumer) - 1} child processes, "
                               f"expected at least {workers}")
        cpu_before = sum(cpu_seconds(p) for p in consumer)
        started = time.perf_counter()
        for i in range(batch):
            chat(fake_url, MODEL, f"{label} {i}")
        submitted = time.perf_counter()
        wait_until(lambda: results() >= warm + batch, timeout=timeout_s,
                   message=f"{batch} huey tasks on {workers} worker(s)", interval=0.01)
        elapsed = time.perf_counter() - started
        cpu = sum(cpu_seconds(p) for p in consumer) - cpu_before
        values = [app.serializer.deserialize(v) for v in app.storage.result_items().values()]
        bad = [v for v in values if not (isinstance(v, str) and v.startswith("echo: "))]
        if bad:
            raise RuntimeError(f"{len(bad)} huey tasks did not return a reply, e.g. {bad[0]!r}")
    finally:
        children.stop([proc])
        app.storage.close()
    return {"tasks_per_s": batch / elapsed, "elapsed_s": elapsed,
            "submit_s": submitted - started, "cpu_ms_per_task": 1000 * cpu / batch}


# -- the raw SQLite ceiling ---------------------------------------------------------------

_INSERT = (
    "INSERT INTO task_master (task_id, type, prompt, status, priority, attempts, max_attempts, "
    "timeout_s, cancel_requested, created_at, updated_at) "
    "VALUES (?, 'general', ?, 'pending', 5, 0, 3, 60.0, 0, ?, ?)"
)
_CLAIM = (
    "UPDATE task_master SET status = 'in_progress', worker_id = ?, attempts = attempts + 1, "
    "lease_expires_at = ?, started_at = ?, finished_at = NULL, updated_at = ? "
    "WHERE task_id = (SELECT task_id FROM task_master WHERE status = 'pending' "
    "AND (not_before IS NULL OR not_before <= ?) "
    "ORDER BY priority DESC, created_at, task_id LIMIT 1) AND status = 'pending' RETURNING *"
)
_BUSY = ("UPDATE workers SET status = 'busy', current_task = ?, last_heartbeat = ?, "
         "idle_since = NULL WHERE worker_id = ?")
_COMPLETE = (
    "UPDATE task_master SET status = 'completed', result = ?, error = NULL, error_kind = NULL, "
    "worker_id = ?, lease_expires_at = NULL, finished_at = ?, updated_at = ? "
    "WHERE task_id = ? AND status NOT IN ('completed', 'failed', 'cancelled') RETURNING task_id"
)
_IDLE = ("UPDATE workers SET status = 'idle', current_task = NULL, idle_since = ?, "
         "last_heartbeat = ?, tasks_completed = tasks_completed + 1 WHERE worker_id = ?")


def raw_once(tmp: Path, batch: int, label: str, fake_url: str | None) -> dict[str, float]:
    """Insert, claim and complete ``batch`` tasks as bare SQL on one connection (optionally
    with the HTTP call between claim and complete)."""
    db = tmp / f"{label}.raw.db"
    open_store(f"sqlite:///{db}", tmp / f"{label}-run").close()  # the same schema and indexes
    conn = sqlite3.connect(db, timeout=60, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout = 60000")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    now = str(utcnow())
    conn.execute("INSERT INTO workers (worker_id, status, tasks_completed, tasks_failed, host, "
                 "last_heartbeat, created_at) VALUES ('raw', 'idle', 0, 0, '', ?, ?)", (now, now))
    client = httpx.Client() if fake_url else None
    body: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": ""}],
                            "stream": False}
    try:
        started = time.perf_counter()
        for i in range(batch):
            stamp = utcnow()
            now = str(stamp)
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(_INSERT, (f"raw_{i}", f"{label} {i}", now, now))
            conn.execute("COMMIT")
            conn.execute("BEGIN IMMEDIATE")
            row = conn.execute(_CLAIM, ("raw", str(stamp + timedelta(seconds=30)), now, now,
                                        now)).fetchone()
            conn.execute(_BUSY, (row[0], now, "raw"))
            conn.execute("COMMIT")
            result = "echo"
            if client is not None:
                body["messages"][0]["content"] = row[2]
                response = client.post(f"{fake_url}/api/chat", json=body)
                result = response.json()["message"]["content"]
            done = str(utcnow())
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(_COMPLETE, (result, "raw", done, done, row[0])).fetchone()
            conn.execute(_IDLE, (done, done, "raw"))
            conn.execute("COMMIT")
        elapsed = time.perf_counter() - started
        (left,) = conn.execute("SELECT count(*) FROM task_master WHERE status != 'completed'"
                               ).fetchone()
        if left:
            raise RuntimeError(f"{left} raw tasks not completed")
    finally:
        conn.close()
        if client is not None:
            client.close()
    return {"tasks_per_s": batch / elapsed, "elapsed_s": elapsed}


# -- the benchmark ------------------------------------------------------------------------

COLUMNS = ["setup", "workers", "tasks_per_s", "vs_huey", "of_raw_ceiling", "cpu_ms_per_task",
           "submit_s"]


#: The stand-in serves this many generations at once, as many as the most workers any run
#: here starts (the PostgreSQL benchmark goes to 8): with zero latency and the limit pinned
#: there, the slots are never the bottleneck, so the numbers stay about the queue.
SLOTS = 8
PINNED_NOTE = (
    f"The workers run with the model server's slot limit pinned at the stand-in's {SLOTS} slots "
    "(KOUBOU_OLLAMA_PARALLEL), so every claim still goes through the admission but the limit "
    "is not learned: at zero latency the stand-in's per-token speed is CPU noise on two shared "
    "cores, which the learning reads as slots that add no speed, and it then keeps the limit "
    "at 1-3 (measured with two workers when this was written: 535 tasks/s learning, 633 pinned). Learning is "
    "what the capacity benchmark measures, on a stand-in with real latencies.")


def fake_process() -> Any:
    from benchmarks._fake_ollama import as_process

    return as_process(models=[MODEL], slots=SLOTS)


def run(quick: bool) -> dict[str, Any]:
    counts = (1, 2) if quick else (1, 2, 4)
    reps, batch = (1, 20) if quick else (3, 300)
    ours: dict[int, list[dict[str, float]]] = {n: [] for n in counts}
    huey: dict[int, list[dict[str, float]]] = {n: [] for n in counts}
    raw: list[float] = []
    raw_http: list[float] = []
    with fake_process() as fake, scratch_dir(NAME) as tmp, Children(tmp / "logs") as children:
        for rep in range(reps):
            for n in counts:
                label = f"r{rep}-n{n}"
                # the stand-in's slot count, pinned (KOUBOU_OLLAMA_PARALLEL): see PINNED_NOTE
                settings = bench_settings(tmp / f"home-{label}", fake.url, ollama_parallel=SLOTS)
                store = open_store(settings.database_url, settings.run_dir)
                try:
                    order = ("ours", "huey") if (rep + n) % 2 == 0 else ("huey", "ours")
                    for who in order:
                        fake.reset_stats()
                        if who == "ours":
                            ours[n].append(ours_once(children, store, settings, n, batch,
                                                     f"ours-{label}"))
                        else:
                            huey[n].append(huey_once(children, tmp, fake.url, n, batch,
                                                     f"huey-{label}"))
                finally:
                    store.close()
            raw.append(raw_once(tmp, batch * 2, f"raw-r{rep}", None)["tasks_per_s"])
            raw_http.append(raw_once(tmp, batch, f"rawhttp-r{rep}", fake.url)["tasks_per_s"])
            print(f"  repeat {rep + 1}/{reps} done", flush=True)

    ceiling = median(raw)
    rows: list[dict[str, Any]] = []
    targets = []
    for n in counts:
        ours_tps = [r["tasks_per_s"] for r in ours[n]]
        huey_tps = [r["tasks_per_s"] for r in huey[n]]
        paired = [o / h for o, h in zip(ours_tps, huey_tps, strict=True)]
        rows.append({"setup": "koubou-mcp workers", "workers": n, "tasks_per_s": spread(ours_tps),
                     "vs_huey": spread(paired) + "x",
                     "of_raw_ceiling": f"{100 * median(ours_tps) / ceiling:.0f}%",
                     "cpu_ms_per_task": spread([r["cpu_ms_per_task"] for r in ours[n]]),
                     "submit_s": spread([r["submit_s"] for r in ours[n]])})
        rows.append({"setup": "huey SqliteHuey, process workers", "workers": n,
                     "tasks_per_s": spread(huey_tps), "vs_huey": "1x",
                     "of_raw_ceiling": f"{100 * median(huey_tps) / ceiling:.0f}%",
                     "cpu_ms_per_task": spread([r["cpu_ms_per_task"] for r in huey[n]]),
                     "submit_s": spread([r["submit_s"] for r in huey[n]])})
        got = median(paired)
        if n not in TARGET_WORKERS:
            continue
        targets.append(target(f"throughput vs huey, {n} worker(s)", f">= {TARGET_VS_HUEY:g}x",
                              f"{got:.2f}x ({median(ours_tps):.0f} vs {median(huey_tps):.0f} "
                              "tasks/s)", got >= TARGET_VS_HUEY))
    rows.append({"setup": "raw SQL insert+claim+complete, 1 connection", "workers": 1,
                 "tasks_per_s": spread(raw), "vs_huey": "-", "of_raw_ceiling": "100%",
                 "submit_s": None})
    rows.append({"setup": "raw SQL + the HTTP call, 1 connection", "workers": 1,
                 "tasks_per_s": spread(raw_http), "vs_huey": "-",
                 "of_raw_ceiling": f"{100 * median(raw_http) / ceiling:.0f}%", "submit_s": None})
    ours_cpu = median([r["cpu_ms_per_task"] for n in counts for r in ours[n]])
    huey_cpu = median([r["cpu_ms_per_task"] for n in counts for r in huey[n]])
    scale = ratio(median([r["tasks_per_s"] for r in ours[counts[-1]]]),
                  median([r["tasks_per_s"] for r in ours[1]]))
    notes = [
        f"`tasks_per_s`: batch of {batch} tasks / time from the first submit to the last "
        f"stored result, median (min-max) over {reps} repeat(s); `vs_huey`: the paired ratio "
        "ours/huey within each repeat; `of_raw_ceiling`: median over the raw SQL ceiling (one "
        "connection, no HTTP, no processes); `submit_s`: how long this process took to submit "
        "the batch (it runs concurrently with the workers).",
        f"The machine has 2 cores: beyond 2 workers, processes share cores with each other, the "
        f"submitter and the stand-in Ollama, so scaling flattens (koubou-mcp {counts[-1]} "
        f"workers / 1 worker = {scale:.2f}x)." if scale else "The machine has 2 cores.",
        "SQLite takes one writer at a time. huey spends three write transactions per task "
        "(enqueue, dequeue, store the result); koubou-mcp two while the queue is not empty "
        "(enqueue; then the result, the model server's measurements and the claim of the "
        "next task in one), and a worker that finds the queue empty only reads (no write "
        "lock).",
        "huey is tuned in its favour: its idle poll interval is 10-50 ms instead of 0.1-10 s, "
        "its storage runs synchronous=NORMAL like ours instead of FULL.",
        f"CPU per task decides it on these 2 cores: koubou-mcp's workers spent {ours_cpu:.1f} "
        f"ms of CPU per task against huey's {huey_cpu:.1f} ms (`cpu_ms_per_task`, worker "
        "processes only). A koubou-mcp task does more than huey's: it streams the reply "
        "(NDJSON chunks, where huey's task takes one JSON body), takes a slot of the model "
        "server and records what it measured of it, and renews a lease. Profiled with py-spy, "
        "the worker went from an async loop (async httpx, every store call hopping to a thread, "
        "a new TCP connection per request: about 7 ms per task) to a synchronous loop with a "
        "watchdog thread for heartbeats, cancels and time limits (it aborts the call by "
        "shutting the socket down), one write transaction per task for the result, the "
        "measurements and the next claim (about 1.9 ms), and then: the hot statements compiled "
        "once and run on the driver's cursor (SQLAlchemy's per-statement machinery cost more "
        "than SQLite's work), a small HTTP/1.1 reader instead of http.client (whose e-mail "
        "header parser was a third of the backend's CPU), one kept connection for the loop, "
        "the log handler formatting each record once, and our own short retries for SQLite's "
        "write lock (SQLite's busy handler sleeps 1-5 ms on a lock held for a fraction of "
        "one; with two workers and the submitter they slept about 40% of the time). The third "
        "round: the watchdog is poked at a task's start only when the task's deadline comes "
        "before its next look (a poke per task, two thread switches, was a sixth of a worker's "
        "CPU); the enqueue runs on the driver's connection (SQLAlchemy's connection, begin "
        "and commit were a third of it, held under the write lock) and a new task's INSERT "
        "writes three fewer index pages (those indexes are partial now): about 320 -> 155 us "
        "per enqueue, measured alone.",
        f"The goal beyond the target is {GOAL_VS_HUEY:g}x huey. What stands in the way, "
        "measured with two workers and 600 tasks (CPU per process from /proc): our workers "
        "spent 1.4-1.6 ms per task, the stand-in 0.45-0.6 ms and the submitter 0.44-0.51 ms "
        "per enqueue; huey's consumer 1.4-1.6 ms, the stand-in 0.40-0.48 ms and its "
        "submitter 0.16-0.19 ms. The HTTP call is not it: against the same stand-in, alone, "
        "our backend's call costs 0.30-0.36 ms of CPU and huey's httpx call 1.0 ms. It is "
        "SQLite's one write lock: a worker's hand-over (5 statements, 5.5 pages to the WAL, "
        "0.43 ms of CPU alone) held it 0.6 ms at the median with two workers, so the "
        "submitter's BEGIN waited 1 ms at p90, and both spent CPU waiting (a failed try and a "
        "wake-up from a 50 us sleep cost 25-40 us of CPU on this virtual machine): an "
        "enqueue's CPU grew from 0.29 ms alone to 0.45 ms. Tried this round and not kept, "
        "with the numbers: a blocking file lock in front of SQLite's (waiters woken at its "
        "release instead of polling): 645 against 626 tasks/s over 6 paired repeats, noise, "
        "and the machine idled 20% instead of 13% (a waiter runs only once the holder is "
        "scheduled again); the ready index only over pending tasks: the claim stopped using "
        "it (hand-over 0.43 -> 1.1 ms); remembering datetime conversions: no measurable "
        "change. Kept: log lines at 21-24 us of CPU instead of 30 (37-41 instead of 54 with "
        "a hand-started worker's two handlers), two per task.",
        PINNED_NOTE,
        "With real models a task lasts seconds, so a few milliseconds of queue overhead per task "
        "is well under 1% of the work; this benchmark isolates that overhead.",
    ]
    if quick:
        notes.insert(0, "Quick mode: tiny batches; the numbers mean nothing.")
    data = {"ours": ours, "huey": huey, "raw": raw, "raw_http": raw_http, "batch": batch}
    return make_result(NAME, TITLE, (
        f"N idle worker processes (N = {', '.join(map(str, counts))}), then a batch of {batch} "
        "tasks submitted one transaction each; every task is claimed, sent over HTTP to the "
        "stand-in Ollama (zero latency) and completed; throughput = batch / (last result - "
        "first submit). huey (SqliteHuey, N worker processes, the same HTTP call) runs in "
        "the same repeats, alternating who goes first."), COLUMNS, rows, targets, notes,
        data=data)
