"""Cost of an idle pool: memory per worker process and CPU while nothing happens.

N ``koubou-mcp worker`` processes (product defaults) wait idle; beside them, in the same window,
a bare ``python -c "import time; time.sleep(...)"`` (the floor any Python process pays) and an
idle huey consumer with N worker processes at its default polling (0.1 s growing to 10 s).
Memory is read from ``/proc/<pid>/status`` (RSS) and ``/proc/<pid>/smaps_rollup`` (PSS: shared
pages divided among their sharers; USS: pages of this process alone); CPU is utime + stime from
``/proc/<pid>/stat`` read at the start and end of each sub-window (clock ticks of 10 ms).
"""

from __future__ import annotations

import sys
import time
from typing import Any

from benchmarks.common import (
    Children,
    bench_settings,
    children_of,
    cpu_seconds,
    make_result,
    median,
    memory_kib,
    scratch_dir,
    spread,
    start_workers,
    target,
)
from koubou_mcp.store import open_store
from tests.support.env import plain_env
from tests.support.waiting import wait_until

NAME = "cost"
TITLE = "Cost of an idle pool: memory and CPU per worker process"
TARGET_CPU_PCT = 1.0

COLUMNS = ["process", "count", "rss_mib", "pss_mib", "uss_mib", "cpu_pct_of_core",
           "cpu_pct_max", "rss_vs_bare_python"]


def _mib(kib: float) -> float:
    return kib / 1024.0


def run(quick: bool) -> dict[str, Any]:
    from benchmarks._fake_ollama import in_process

    workers = 2 if quick else 4
    window_s, windows = (3.0, 1) if quick else (30.0, 3)
    with in_process(models=["gpt-oss:20b"]) as fake, scratch_dir(NAME) as tmp, \
            Children(tmp / "logs") as children:
        settings = bench_settings(tmp / "home", fake.url)
        store = open_store(settings.database_url, settings.run_dir)
        try:
            ours = [p.pid for p in start_workers(children, store, settings,
                                                 [f"idle{i}" for i in range(workers)])]
        finally:
            store.close()
        bare = children.spawn([sys.executable, "-c", "import time; time.sleep(3600)"],
                              plain_env(), "bare-python").pid
        consumer = children.spawn(
            [sys.executable, "-m", "huey.bin.huey_consumer", "benchmarks._huey_app.huey",
             "-w", str(workers), "-k", "process"],
            plain_env({"KOUBOU_BENCH_HUEY_DB": str(tmp / "huey.db")}), "huey").pid
        huey = wait_until(lambda: (lambda kids: [consumer, *kids]
                                   if len(kids) >= workers else None)(children_of(consumer)),
                          timeout=30, message="the huey consumer's worker processes", interval=0.05)
        time.sleep(0.5 if quick else 3.0)  # past start-up: first heartbeats, imports settled
        groups = {"ours": ours, "bare": [bare], "huey": huey}
        memory = {name: [memory_kib(p) for p in pids] for name, pids in groups.items()}
        cpu: dict[str, list[list[float]]] = {name: [[] for _ in pids]
                                             for name, pids in groups.items()}
        for _ in range(windows):
            before = {name: [cpu_seconds(p) for p in pids] for name, pids in groups.items()}
            started = time.monotonic()
            time.sleep(window_s / windows)
            elapsed = time.monotonic() - started
            for name, pids in groups.items():
                for i, p in enumerate(pids):
                    cpu[name][i].append(100.0 * (cpu_seconds(p) - before[name][i]) / elapsed)

    def row(label: str, mem: list[dict[str, int]], pct: list[list[float]]) -> dict[str, Any]:
        flat = [v for per_process in pct for v in per_process]
        rss = [_mib(m["rss"]) for m in mem]
        bare_rss = _mib(memory["bare"][0]["rss"])
        return {"process": label, "count": len(mem), "rss_mib": spread(rss),
                "pss_mib": spread([_mib(m["pss"]) for m in mem]),
                "uss_mib": spread([_mib(m["uss"]) for m in mem]),
                "cpu_pct_of_core": spread(flat), "cpu_pct_max": max(flat),
                "rss_vs_bare_python": f"{median(rss) / bare_rss:.1f}x"}

    rows = [
        row("koubou-mcp worker, idle", memory["ours"], cpu["ours"]),
        row("bare python (time.sleep)", memory["bare"], cpu["bare"]),
        row(f"huey consumer -k process -w {workers}, idle: main", memory["huey"][:1],
            cpu["huey"][:1]),
        row("  its worker/scheduler processes (forked)", memory["huey"][1:],
            cpu["huey"][1:]),
    ]
    pool_cpu = sum(median(per) for per in cpu["ours"])
    pool_pss = sum(_mib(m["pss"]) for m in memory["ours"])
    worst = max(v for per in cpu["ours"] for v in per)
    targets = [target("CPU of an idle worker", f"< {TARGET_CPU_PCT:g}% of a core each",
                      f"{median([v for per in cpu['ours'] for v in per]):.2f}% median, "
                      f"{worst:.2f}% worst", worst < TARGET_CPU_PCT)]
    notes = [
        f"`cpu_pct_of_core`: CPU time / wall time of each process over {windows} sub-window(s) "
        f"of {window_s / windows:g} s, median (min-max) over processes and sub-windows; the "
        f"clock tick is 10 ms, so the resolution is {100 * 0.01 / (window_s / windows):.2g}%.",
        f"The idle pool of {workers} workers costs {pool_cpu:.2f}% of one core and "
        f"{pool_pss:.0f} MiB PSS in all. An idle worker looks for work it was not woken for "
        f"after {settings.poll_s:g} s, doubling while nothing happens up to "
        f"{min(settings.poll_max_s, settings.lease_s / 3):g} s (KOUBOU_POLL, KOUBOU_POLL_MAX, "
        "and at least every lease/3, when it also looks for expired leases), and its "
        f"heartbeat beats every lease/3 ({settings.lease_s / 3:g} s).",
        "Each koubou-mcp worker is a separately started interpreter (no shared pages but the "
        "executable and libraries); huey's workers are forked from its consumer and share its "
        "pages until written, which is why their PSS and USS are far below their RSS.",
        "huey's idle workers back off to one poll per 10 s, so they are quieter still; the "
        "price is that they react to new work up to 10 s late (koubou-mcp workers are woken).",
    ]
    if quick:
        notes.insert(0, "Quick mode: a 3 s window; CPU percentages are at tick resolution.")
    return make_result(NAME, TITLE, (
        f"{workers} idle `koubou-mcp worker` processes, a bare Python process and an idle huey "
        f"consumer with {workers} worker processes side by side; memory from /proc, CPU from "
        f"/proc/<pid>/stat over {window_s:g} s."), COLUMNS, rows, targets, notes,
        data={"memory_kib": memory, "cpu_pct": cpu})
