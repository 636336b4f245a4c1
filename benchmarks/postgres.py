"""koubou-mcp on PostgreSQL: throughput with 1/2/4/8 workers and dispatch latency with
LISTEN/NOTIFY, beside the same runs on SQLite as the peer.

The server is ``KOUBOU_TEST_DATABASE_URL`` (default ``postgresql+psycopg://postgres@127.0.0.1:5432/
test``); the benchmark works in a schema of its own (``?options=-csearch_path%3D<schema>``),
created at the start and dropped at the end. Without a reachable server it is skipped and says
why. The harnesses are those of ``throughput.py`` and ``dispatch.py``.
"""

from __future__ import annotations

import os
import random
import secrets
from typing import Any

from benchmarks import dispatch, throughput
from benchmarks.common import (
    Children,
    bench_settings,
    make_result,
    median,
    ratio,
    scratch_dir,
    skipped,
    spread,
)
from koubou_mcp.store import open_store

NAME = "postgres"
TITLE = "koubou-mcp on PostgreSQL: throughput and LISTEN/NOTIFY dispatch"
DEFAULT_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"

COLUMNS = ["store", "workers", "tasks_per_s", "vs_1_worker", "vs_sqlite", "cpu_ms_per_task",
           "dispatch_p50_ms", "dispatch_p95_ms", "dispatch_p99_ms"]


def _plain(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def _schema_url(url: str, schema: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}options=-csearch_path%3D{schema}"


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
    reps, batch = (1, 20) if quick else (2, 200)
    dispatch_tasks = 20 if quick else 150
    results: dict[tuple[str, int], list[dict[str, float]]] = {}
    with throughput.fake_process() as fake, scratch_dir(NAME) as tmp, \
            Children(tmp / "logs") as children:
        pg_settings = bench_settings(tmp / "home-pg", fake.url, pg_url)
        pg_store = open_store(pg_url, pg_settings.run_dir)
        try:
            for rep in range(reps):
                plan = [("postgresql", n) for n in pg_counts] + \
                       [("sqlite", n) for n in sqlite_counts]
                if rep % 2:
                    plan.reverse()
                for store_name, n in plan:
                    label = f"{store_name[:2]}-r{rep}-n{n}"
                    if store_name == "postgresql":
                        one = throughput.ours_once(children, pg_store, pg_settings, n, batch,
                                                   label)
                    else:
                        settings = bench_settings(tmp / f"home-{label}", fake.url)
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
                latency = dispatch.measure_setup(
                    children, store, settings, arrivals, "pg-dispatch", 1, dispatch_tasks,
                    dispatch.short_gaps(random.Random(11), 0 if quick else dispatch.LONG_EVERY))
            finally:
                store.close()

    def tps(store_name: str, n: int) -> list[float]:
        return [r["tasks_per_s"] for r in results.get((store_name, n), [])]

    rows: list[dict[str, Any]] = []
    one_pg = median(tps("postgresql", 1))
    for store_name, counts in (("postgresql", pg_counts), ("sqlite", sqlite_counts)):
        single = median(tps(store_name, 1))
        for n in counts:
            values = tps(store_name, n)
            vs_one = ratio(median(values), single)
            vs_sqlite = ratio(median(values), median(tps("sqlite", n))) if tps("sqlite", n) \
                else None
            rows.append({
                "store": store_name, "workers": n, "tasks_per_s": spread(values),
                "vs_1_worker": None if vs_one is None else f"{vs_one:.2f}x",
                "vs_sqlite": None if vs_sqlite is None or store_name == "sqlite"
                else f"{vs_sqlite:.2f}x",
                "cpu_ms_per_task": spread([r["cpu_ms_per_task"]
                                           for r in results[(store_name, n)]]),
            })
    summary = dispatch.summarize("", latency)
    rows.append({"store": "postgresql (LISTEN/NOTIFY)", "workers": "1 idle",
                 "dispatch_p50_ms": summary["backend_p50_ms"],
                 "dispatch_p95_ms": summary["backend_p95_ms"],
                 "dispatch_p99_ms": summary["backend_p99_ms"]})
    def cpu(n: int) -> float:
        return median([r["cpu_ms_per_task"] for r in results[("postgresql", n)]])

    worst_n, one_cpu = pg_counts[-1], cpu(1)
    worst_cpu = cpu(worst_n)
    best = max(pg_counts, key=lambda n: median(tps("postgresql", n)))
    notes = [
        f"PostgreSQL {version} on this machine over TCP (127.0.0.1), the product's engine "
        "(psycopg 3, pool of 5 + 5 overflow per process), claims with FOR UPDATE SKIP LOCKED.",
        f"`tasks_per_s`: batch of {batch} tasks end to end as in the throughput benchmark, "
        f"median (min-max) over {reps} repeat(s); `vs_1_worker` is the scaling, `vs_sqlite` the "
        "ratio to the SQLite run with as many workers in the same repeats.",
        f"The machine has 2 cores, shared by the workers, the PostgreSQL server, the submitter "
        f"and the stand-in Ollama: the best PostgreSQL throughput here came with {best} "
        f"worker(s) ({median(tps('postgresql', best)) / one_pg:.2f}x one worker); beyond the "
        "cores, more workers only add contention.",
        "`cpu_ms_per_task` (CPU of the worker processes / tasks) grows with the number of "
        "workers: every enqueue's NOTIFY wakes every idle worker and each runs a claim "
        f"transaction that most find empty ({worst_cpu:.1f} ms per task with {worst_n} workers "
        f"against {one_cpu:.1f} ms with one).",
        f"Dispatch: {dispatch_tasks} tasks submitted one at a time to one idle worker woken by "
        "LISTEN/NOTIFY; created_at -> the request reaching the stand-in Ollama, as in the "
        "dispatch benchmark (row stamps: p50 "
        f"{summary['row_p50_ms']:.2f} ms, p99 {summary['row_p99_ms']:.2f} ms).",
    ]
    if quick:
        notes.insert(0, "Quick mode: tiny batches; the numbers mean nothing.")
    return make_result(NAME, TITLE, (
        f"The throughput harness with {', '.join(map(str, pg_counts))} worker processes on "
        "PostgreSQL and on SQLite in the same repeats, then the dispatch harness on PostgreSQL "
        "with one idle worker woken by LISTEN/NOTIFY."), COLUMNS, rows, [], notes,
        data={"throughput": {f"{k[0]}-{k[1]}": v for k, v in results.items()},
              "dispatch": latency, "server_version": version})
