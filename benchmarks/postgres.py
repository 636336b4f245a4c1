"""koubou-mcp on PostgreSQL: throughput with 1/2/4/8 workers, dispatch latency with
LISTEN/NOTIFY, and what a new task costs the pool with 1 and with 8 idle workers (each new task
wakes one idle worker), beside the same throughput runs on SQLite as the peer.

The server is ``KOUBOU_TEST_DATABASE_URL`` (default ``postgresql+psycopg://postgres@127.0.0.1:5432/
test``); the benchmark works in a schema of its own (``?options=-csearch_path%3D<schema>``),
created at the start and dropped at the end. Without a reachable server it is skipped and says
why. The harnesses are those of ``throughput.py`` and ``dispatch.py``.
"""

from __future__ import annotations

import os
import random
import secrets
from collections.abc import Callable
from typing import Any

from benchmarks import dispatch, throughput
from benchmarks.common import (
    Children,
    bench_settings,
    cpu_seconds,
    fmt,
    make_result,
    median,
    ratio,
    scratch_dir,
    skipped,
    spread,
    target,
)
from koubou_mcp.store import open_store

NAME = "postgres"
TITLE = "koubou-mcp on PostgreSQL: throughput and LISTEN/NOTIFY dispatch"
DEFAULT_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"

#: issue 17's targets: CPU per task with HERD idle workers within this of one idle worker's,
#: and throughput beyond 2 workers within FLAT of the 2-worker median (not falling; the
#: repeats here spread by about that much)
TARGET_HERD_CPU = 1.5
HERD = 8
FLAT = 0.9
#: the table's rows for a batch enqueued in one call, drained by 2 and by HERD workers
QUEUED = "postgresql (queued batch)"

COLUMNS = ["store", "workers", "tasks_per_s", "vs_1_worker", "vs_sqlite", "cpu_ms_per_task",
           "server_cpu_ms_per_task", "standin_cpu_ms_per_task",
           "dispatch_p50_ms", "dispatch_p95_ms", "dispatch_p99_ms"]


def _server_pids() -> list[int]:
    """The PostgreSQL server's processes on this machine (the benchmark's server is local)."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/comm") as f:
                    if f.read().strip() == "postgres":
                        found.append(int(name))
            except OSError:
                continue
    return found


def _peers(standin_pid: int) -> Callable[[], dict[str, float]]:
    """CPU seconds so far of the PostgreSQL server's processes and of the stand-in Ollama
    (each worker's server process lives as long as its connection: the batch's own)."""
    def seconds() -> dict[str, float]:
        total = 0.0
        for pid in _server_pids():
            try:
                total += cpu_seconds(pid)
            except OSError:
                continue  # a process that ended meanwhile
        return {"server": total, "standin": cpu_seconds(standin_pid)}
    return seconds


def _plain(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def _schema_url(url: str, schema: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}options=-csearch_path%3D{schema}"


def _vacuum(url: str) -> None:
    """Clear the dead rows the runs before left in the schema's tables, as autovacuum does on
    a server where it is on (``autovacuum`` is off on this workplace's server): a hand-over
    on a table that only grows dead rows slowed from 1.1 to 2.3 ms over 1200 tasks, and the
    order of the runs would decide their figures."""
    import psycopg

    with psycopg.connect(_plain(url), autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE task_master, workers, model_servers")


def _autovacuum(url: str) -> str:
    import psycopg

    with psycopg.connect(_plain(url), autocommit=True) as conn:
        return str(conn.execute("SHOW autovacuum").fetchone()[0])  # type: ignore[index]


def run(quick: bool) -> dict[str, Any]:
    base = os.environ.get("KOUBOU_TEST_DATABASE_URL", "").strip() or DEFAULT_URL
    try:
        import psycopg
    except ImportError:
        return skipped(NAME, TITLE, "psycopg is not installed (pip install 'koubou-mcp[postgres]')")
    try:
        with psycopg.connect(_plain(base), connect_timeout=5) as conn:
            version = conn.execute("SHOW server_version").fetchone()[0]  # type: ignore[index]
    except psycopg.Error as exc:
        return skipped(NAME, TITLE, f"PostgreSQL at {_plain(base)} is not reachable: "
                       f"{str(exc).strip()}")
    schema = f"koubou_bench_{secrets.token_hex(4)}"
    with psycopg.connect(_plain(base), autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    try:
        return _run(quick, _schema_url(base, schema), str(version))
    finally:
        with psycopg.connect(_plain(base), autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def _run(quick: bool, pg_url: str, version: str) -> dict[str, Any]:
    from benchmarks._fake_ollama import in_process

    pg_counts = (1,) if quick else (1, 2, 4, 8)
    sqlite_counts = () if quick else (1, 2)
    queued_counts = () if quick else (2, HERD)
    reps, batch = (1, 20) if quick else (3, 200)
    dispatch_tasks = 20 if quick else 150
    herd = 2 if quick else HERD
    results: dict[tuple[str, int], list[dict[str, float]]] = {}
    autovacuum = _autovacuum(pg_url)
    with throughput.fake_process() as fake, scratch_dir(NAME) as tmp, \
            Children(tmp / "logs") as children:
        # the stand-in's slot count pinned, as in the throughput benchmark (its PINNED_NOTE)
        pin = throughput.SLOTS
        pg_settings = bench_settings(tmp / "home-pg", fake.url, pg_url, ollama_parallel=pin)
        pg_store = open_store(pg_url, pg_settings.run_dir)
        assert fake.process is not None
        peers = _peers(fake.process.pid)
        try:
            for rep in range(reps):
                plan = [("postgresql", n) for n in pg_counts] + \
                       [("sqlite", n) for n in sqlite_counts] + \
                       [(QUEUED, n) for n in queued_counts]
                if rep % 2:
                    plan.reverse()
                for store_name, n in plan:
                    label = f"{store_name[:2]}-r{rep}-n{n}"
                    if store_name in ("postgresql", QUEUED):
                        _vacuum(pg_url)
                        one = throughput.ours_once(children, pg_store, pg_settings, n, batch,
                                                   label, peers=peers,
                                                   at_once=store_name == QUEUED)
                    else:
                        settings = bench_settings(tmp / f"home-{label}", fake.url,
                                                  ollama_parallel=pin)
                        store = open_store(settings.database_url, settings.run_dir)
                        try:
                            one = throughput.ours_once(children, store, settings, n, batch, label)
                        finally:
                            store.close()
                    results.setdefault((store_name, n), []).append(one)
                print(f"  repeat {rep + 1}/{reps} done", flush=True)
        finally:
            pg_store.close()
        with in_process(models=["gpt-oss:20b"]) as local:
            arrivals = dispatch.Arrivals(local)
            settings = bench_settings(tmp / "home-pg-dispatch", local.url, pg_url)
            store = open_store(pg_url, settings.run_dir)
            try:
                # the same tasks at the same pauses (same seed), to 1 and to ``herd`` idle
                # workers: the pool's CPU per task says how many of them each task woke
                idle_runs = {n: dispatch.measure_setup(
                    children, store, settings, arrivals, f"pg-idle{n}-", 1, dispatch_tasks,
                    dispatch.short_gaps(random.Random(11), 0 if quick else dispatch.LONG_EVERY),
                    workers=n) for n in (1, herd)}
            finally:
                store.close()

    def tps(store_name: str, n: int) -> list[float]:
        return [r["tasks_per_s"] for r in results.get((store_name, n), [])]

    rows: list[dict[str, Any]] = []
    one_pg = median(tps("postgresql", 1))
    for store_name, counts in (("postgresql", pg_counts), ("sqlite", sqlite_counts),
                               (QUEUED, queued_counts)):
        single = median(tps(store_name, 1)) if tps(store_name, 1) else None
        for n in counts:
            values = tps(store_name, n)
            vs_one = None if single is None else ratio(median(values), single)
            vs_sqlite = ratio(median(values), median(tps("sqlite", n))) \
                if tps("sqlite", n) and store_name == "postgresql" else None
            rows.append({
                "store": store_name, "workers": n, "tasks_per_s": spread(values),
                "vs_1_worker": None if vs_one is None else f"{vs_one:.2f}x",
                "vs_sqlite": None if vs_sqlite is None else f"{vs_sqlite:.2f}x",
                "cpu_ms_per_task": spread([r["cpu_ms_per_task"]
                                           for r in results[(store_name, n)]]),
                **{column: spread([r[column] for r in results[(store_name, n)]])
                   for column in ("server_cpu_ms_per_task", "standin_cpu_ms_per_task")
                   if store_name != "sqlite"},
            })
    idle = {n: dispatch.summarize("", runs) for n, runs in idle_runs.items()}
    for n, summary in idle.items():
        rows.append({"store": "postgresql (LISTEN/NOTIFY)", "workers": f"{n} idle",
                     "cpu_ms_per_task": fmt(summary["pool_cpu_ms_per_task"]),
                     "dispatch_p50_ms": summary["backend_p50_ms"],
                     "dispatch_p95_ms": summary["backend_p95_ms"],
                     "dispatch_p99_ms": summary["backend_p99_ms"]})
    summary = idle[1]

    def cpu(n: int, who: str = "") -> float:
        return median([r[f"{who}cpu_ms_per_task"] for r in results[("postgresql", n)]])


    worst_n = pg_counts[-1]
    best = max(pg_counts, key=lambda n: median(tps("postgresql", n)))
    targets = _targets(pg_counts, lambda n: median(tps("postgresql", n)),
                       {n: s["pool_cpu_ms_per_task"] for n, s in idle.items()})
    herd_ratio = ratio(idle[herd]["pool_cpu_ms_per_task"], idle[1]["pool_cpu_ms_per_task"])
    notes = [
        f"PostgreSQL {version} on this machine over TCP (127.0.0.1), the product's engine "
        "(psycopg 3, pool of 5 + 5 overflow per process), claims with FOR UPDATE SKIP LOCKED. "
        f"Each PostgreSQL run starts with the schema's tables vacuumed (autovacuum is "
        f"{autovacuum} on this server): no run inherits the dead rows of the runs before it.",
        f"`tasks_per_s`: batch of {batch} tasks end to end as in the throughput benchmark, "
        f"median (min-max) over {reps} repeat(s); `vs_1_worker` is the scaling, `vs_sqlite` the "
        "ratio to the SQLite run with as many workers in the same repeats. The model "
        f"server's slot limit is pinned at the stand-in's {throughput.SLOTS} slots, as in the "
        "throughput benchmark (learning at zero latency reads CPU noise and held 2 workers "
        "to about one slot).",
        f"The machine has 2 cores, shared by the workers, the PostgreSQL server, the submitter "
        f"and the stand-in Ollama: the best PostgreSQL throughput here came with {best} "
        f"worker(s) ({median(tps('postgresql', best)) / one_pg:.2f}x one worker); beyond the "
        "cores, more workers only add contention.",
        "`cpu_ms_per_task` (CPU of the worker processes / tasks): each worker listens on a "
        "channel of its own, and an enqueue picks as many idle workers as it adds tasks (from "
        "the `workers` rows, SKIP LOCKED: of those not woken since their last task the one "
        "idle most recently, so a trickle of work stays on warm workers) and notifies only "
        "them, in its own transaction; with every worker busy it wakes none, and the next to "
        "finish claims before it sleeps. `server_cpu_ms_per_task`: the PostgreSQL server's "
        "processes, `standin_cpu_ms_per_task`: the stand-in Ollama's, over the same batch.",
        *_growth_notes(cpu, lambda n: median(tps("postgresql", n)), worst_n),
        *_submitter_notes(results, lambda n: median(tps(QUEUED, n)), queued_counts, batch),
        "Tried and not kept: sending the hand-over's statements after the server row's "
        "lock together with the commit (psycopg's pipeline mode, so that no client round trip "
        "happens under the lock): slower at every worker count in one run (1 worker 292 "
        "against 499 tasks/s, 8 workers 270 against 328), and 0.48 against 0.36 ms of CPU "
        "per hand-over alone, the driver's pipeline bookkeeping (eleven waits per hand-over) "
        "costing more than the round trips it saves. Kept instead: the look before a claim is "
        "one statement outside any transaction (one round trip, not five; 0.20 against "
        "0.32 ms for an empty look), and a hand-over that admits nothing marks its worker "
        "idle in the claim's own statement.",
        f"Dispatch: {dispatch_tasks} tasks submitted one at a time (each after the previous "
        "ended and a pause) to 1, then to "
        f"{herd} idle workers; created_at -> the request reaching the stand-in Ollama, as in the "
        "dispatch benchmark (row stamps with 1 idle worker: p50 "
        f"{summary['row_p50_ms']:.2f} ms, p99 {summary['row_p99_ms']:.2f} ms). Their "
        "`cpu_ms_per_task` is the CPU of all the idle pool's processes per task: with "
        f"{herd} idle workers {fmt(herd_ratio, 2)}x that of one, as each task wakes one "
        "worker (before, every NOTIFY woke every idle worker and each ran a claim).",
    ]
    if quick:
        notes.insert(0, "Quick mode: tiny batches; the numbers mean nothing.")
    return make_result(NAME, TITLE, (
        f"The throughput harness with {', '.join(map(str, pg_counts))} worker processes on "
        "PostgreSQL and on SQLite in the same repeats, then the dispatch harness on PostgreSQL "
        f"with 1 and with {herd} idle workers woken by LISTEN/NOTIFY."), COLUMNS, rows,
        targets, notes,
        data={"throughput": {f"{k[0]}-{k[1]}": v for k, v in results.items()},
              "dispatch": idle_runs[1], "dispatch_herd": idle_runs[herd],
              "server_version": version})


def _growth_notes(cpu: Callable[[int, str], float], tps: Callable[[int], float],
                  worst_n: int) -> list[str]:
    """What the CPU per task of each party says about scaling past 2 workers (none in a run
    without 2 workers)."""
    if worst_n <= 2:
        return []

    def all_cpu(n: int) -> float:
        return cpu(n, "") + cpu(n, "server_") + cpu(n, "standin_")

    standin_growth = ratio(cpu(worst_n, "standin_"), cpu(2, "standin_"))
    worst_cpu = cpu(worst_n, "")
    return [
        "What stands in the way of flat beyond 2 workers is the machine's CPU, and that all "
        "of it grows per task. Workers, PostgreSQL and stand-in together spent "
        f"{all_cpu(2):.2f} ms per task with 2 workers and {all_cpu(worst_n):.2f} ms with "
        f"{worst_n}, {all_cpu(worst_n) * tps(worst_n) / 1000:.2f} of the 2 cores on average "
        "over the batch (the submitter and the kernel's own work not counted) (workers "
        f"{cpu(2, ''):.2f} -> "
        f"{worst_cpu:.2f}, PostgreSQL {cpu(2, 'server_'):.2f} -> "
        f"{cpu(worst_n, 'server_'):.2f}); the stand-in, which does the same work for every "
        f"task whoever asks, went from {cpu(2, 'standin_'):.2f} to "
        f"{cpu(worst_n, 'standin_'):.2f} ms ({fmt(standin_growth, 2)}x: what more runnable "
        "processes than cores cost in themselves, within the 10 ms ticks the kernel counts "
        "CPU in). The workers' and the server's growth: the next note.",
    ]


def _submitter_notes(results: dict[tuple[str, int], list[dict[str, float]]],
                     queued: Callable[[int], float], counts: tuple[int, ...],
                     batch: int) -> list[str]:
    """What the queued-batch rows and the submitter's share of each batch say: beyond the
    cores the one-at-a-time table measures the submitter."""
    if len(counts) < 2:
        return []

    def submitting(n: int) -> float:
        return median([r["submit_s"] / r["elapsed_s"] for r in results[("postgresql", n)]])

    few, many = counts[0], counts[-1]
    shares = ", ".join(f"{n} worker(s) {100 * submitting(n):.0f}%"
                       for n in sorted(n for store, n in results if store == "postgresql"))
    return [
        "Beyond one worker the one-at-a-time table measures the submitter: it was still "
        f"enqueueing for most of each batch ({shares} of the batch's time), one enqueue "
        "(a transaction with its WAL flush, one message) after the other, and every process "
        "more than the 2 cores makes each of its waits longer. The pool itself does not "
        f"fall off: the same {batch} tasks "
        f"enqueued in one call drained at {queued(many) / queued(few):.2f}x with {many} "
        f"workers of {few} workers' rate (`{QUEUED}` rows). With idle workers about, each "
        "new task wakes one (its claim, a transaction of its own, takes a slot under the "
        "server row's lock), where 2 busy workers take the next task in their hand-over "
        "(in a statement log of one run: 0.01 wake-up claims per task with 2 workers, 0.86 "
        "with 8); with a model's seconds per task, waking is what keeps every slot busy.",
        "Tried and not kept: the wake-up claim's commit not waiting for its WAL flush "
        "(synchronous_commit off for that transaction, so that the server row's lock is not "
        "held through the flush): waits on that lock fell from 197 to 25 samples of "
        "pg_stat_activity in an 8-worker batch and the throughput did not change (237 and "
        "238 tasks/s), and a claim lost with a crash of the server would have run its task "
        "twice. Kept: a hand-over that claims on the server whose slot its task held keeps "
        "that slot without the row's lock (2 workers 433 -> 658 tasks/s in one run), reads "
        "the row without the lock and writes what it learned only if the row is unchanged; "
        "an enqueue is one message.",
        "Why 8 workers cost more per task than 2: the pool keeps up with the submitter, so "
        "no backlog forms, a finishing worker's hand-over finds nothing, and the next task "
        "is taken by a woken worker. A statement log of one 8-worker batch of 316 tasks had "
        "244 claims outside a hand-over and 316 looks; counted in the worker loop, a "
        "2-worker batch of 304 tasks had 8 claims and looks in all (almost every task went "
        "by hand-over). Tried and not kept, "
        "each in one `--only postgres` run: (a) a wake-up that says when other workers are "
        "busy, and the woken worker giving their hand-overs 10 ms before it looks: 8 vs 2 "
        "workers 0.64x without, 0.75x and 0.69x with, and the CPU of 8 idle workers rose to "
        "1.40-1.43x one's (0.93x without: a task that comes while the last one's hand-over "
        "runs paid the grace's extra wake-up and look); (b) with it, a new task waking "
        "another worker only while more tasks were ready than workers in their grace: 0.74x, "
        "no better; (c) as a bound, no wake-up at all while any worker is busy: flat at "
        "310-320 tasks/s from 1 to 8 workers, but 2 workers fell from 445 to 312 (the "
        "second worker was never woken). What would take the claim off the woken path is the "
        "enqueue handing the task to the worker it wakes, in its own transaction.",
    ]


def _targets(counts: tuple[int, ...], tps: Callable[[int], float],
             idle_cpu: dict[int, float | None]) -> list[dict[str, Any]]:
    """Issue 17's: the table non-decreasing up to 2 workers and flat after (this machine has
    2 cores), and CPU per task with many idle workers close to one idle worker's."""
    out = []
    if 2 in counts:
        up = ratio(tps(2), tps(1))
        out.append(target("PostgreSQL throughput, 2 workers vs 1", ">= 1.00x",
                          f"{fmt(up, 2)}x", None if up is None else up >= 1.0))
        for n in (n for n in counts if n > 2):
            flat = ratio(tps(n), tps(2))
            out.append(target(f"PostgreSQL throughput, {n} workers vs 2 (flat)",
                              f">= {FLAT:.2f}x", f"{fmt(flat, 2)}x",
                              None if flat is None else flat >= FLAT))
    many = max(idle_cpu)
    herd = ratio(idle_cpu[many] or 0.0, idle_cpu[1] or 0.0)
    out.append(target(f"CPU per task, {many} idle workers vs 1", f"<= {TARGET_HERD_CPU:g}x",
                      f"{fmt(herd, 2)}x ({fmt(idle_cpu[many])} vs {fmt(idle_cpu[1])} ms)",
                      None if herd is None else herd <= TARGET_HERD_CPU))
    return out
