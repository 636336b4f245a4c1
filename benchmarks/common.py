"""What every benchmark shares: statistics, child processes, /proc readings, the machine, and
printing results as a table and as Markdown."""

from __future__ import annotations

import contextlib
import math
import os
import platform
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from koubou_mcp.config import Settings
from tests.support.env import child_env
from tests.support.paths import REPO_ROOT
from tests.support.waiting import wait_until

# -- statistics ---------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) with linear interpolation between closest ranks."""
    if not values:
        return math.nan
    ordered = sorted(values)
    if len(ordered) == 1:
        return float(ordered[0])
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return float(ordered[low] + (ordered[high] - ordered[low]) * (rank - low))


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else math.nan


def latency_summary(values_s: Sequence[float]) -> dict[str, float]:
    """p50/p95/p99/min/max of latencies given in seconds, returned in milliseconds."""
    ms = [v * 1000.0 for v in values_s]
    return {
        "n": len(ms),
        "p50_ms": percentile(ms, 50),
        "p95_ms": percentile(ms, 95),
        "p99_ms": percentile(ms, 99),
        "min_ms": min(ms) if ms else math.nan,
        "max_ms": max(ms) if ms else math.nan,
    }


def fmt(value: Any, digits: int = 3) -> str:
    """A number with ``digits`` significant digits (no exponent for everyday magnitudes)."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if value == 0:
            return "0"
        magnitude = math.floor(math.log10(abs(value)))
        decimals = max(0, digits - 1 - magnitude)
        return f"{value:.{decimals}f}"
    return str(value)


def spread(values: Sequence[float], digits: int = 3) -> str:
    """``median (min-max)`` of repeated measurements, as a display string."""
    if not values:
        return "-"
    if len(values) == 1:
        return fmt(float(values[0]), digits)
    return f"{fmt(median(values), digits)} ({fmt(float(min(values)), digits)}-" \
           f"{fmt(float(max(values)), digits)})"


def ratio(ours: float, peer: float) -> float | None:
    if not peer or math.isnan(peer) or math.isnan(ours):
        return None
    return ours / peer


# -- results ------------------------------------------------------------------------------


def make_result(name: str, title: str, method: str, columns: Sequence[str],
                rows: Sequence[Mapping[str, Any]], targets: Sequence[Mapping[str, Any]] = (),
                notes: Sequence[str] = (), **extra: Any) -> dict[str, Any]:
    """A result dict in the convention of ``benchmarks/__init__.py``."""
    return {"name": name, "title": title, "method": method, "columns": list(columns),
            "rows": [dict(r) for r in rows], "targets": [dict(t) for t in targets],
            "notes": list(notes), **extra}


def target(what: str, target: str, measured: str, met: bool | None) -> dict[str, Any]:
    return {"what": what, "target": target, "measured": measured, "met": met}


def skipped(name: str, title: str, reason: str) -> dict[str, Any]:
    return make_result(name, title, "", [], [], notes=[reason], skipped=reason)


# -- scratch space and settings -----------------------------------------------------------


@contextlib.contextmanager
def scratch_dir(prefix: str) -> Iterator[Path]:
    """A private temporary directory, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix=f"koubou-bench-{prefix}-") as path:
        yield Path(path)


def bench_settings(home: Path, ollama_url: str, database_url: str = "",
                   **overrides: Any) -> Settings:
    """Product defaults (what a user gets), on a private home and the stand-in Ollama."""
    return Settings.from_env({}, home=str(home), ollama_url=ollama_url,
                             database_url=database_url or None, **overrides)


# -- child processes ----------------------------------------------------------------------

#: every child started by any ``Children``, so an interrupted run can still stop them
_LIVE: set[subprocess.Popen[bytes]] = set()


def _exited(pid: int) -> bool:
    """Whether our child ``pid`` has exited, without reaping it (so its pid, which is also its
    process group's id, cannot be reused while we still signal that group)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT | os.WNOHANG) is not None
    except ChildProcessError:
        return True


def _stop(proc: subprocess.Popen[bytes], grace_s: float, term: bool = True) -> None:
    """SIGTERM to the child's process group, SIGKILL to what is left of the group after
    ``grace_s`` (huey's forked workers live in it too), then reap the child."""
    if proc.returncode is None:  # not reaped: the group id is still ours to signal
        if term:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while not _exited(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)
    _LIVE.discard(proc)


def has_exited(proc: subprocess.Popen[bytes]) -> bool:
    """Whether a child has exited; unlike ``poll`` it does not reap, so ``Children.stop`` can
    still clean up its process group."""
    return proc.returncode is not None or _exited(proc.pid)


def stop_everything() -> None:
    """Stop every child still running (the last line of defence of ``__main__``)."""
    for proc in list(_LIVE):
        _stop(proc, 2.0)


class Children:
    """Processes a benchmark starts, each in its own process group; all stopped on exit."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(self, argv: Sequence[str], env: Mapping[str, str], name: str,
              cwd: Path = REPO_ROOT) -> subprocess.Popen[bytes]:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_dir / f"{name}.out", "ab") as out:
            proc = subprocess.Popen(list(argv), env=dict(env), cwd=cwd, stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=out, start_new_session=True)
        self.procs.append(proc)
        _LIVE.add(proc)
        return proc

    def worker(self, settings: Settings, worker_id: str,
               extra_env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
        """``koubou-mcp worker`` as a user runs it, seeing exactly ``settings``."""
        env = child_env(settings, {"WORKER_ID": worker_id, **(extra_env or {})})
        return self.spawn([sys.executable, "-m", "koubou_mcp", "worker"], env, worker_id)

    def stop(self, procs: Sequence[subprocess.Popen[bytes]] | None = None,
             grace_s: float = 10.0) -> None:
        """Stop ``procs`` (default: all): SIGTERM to all first, then wait, then SIGKILL."""
        chosen = list(self.procs if procs is None else procs)
        for proc in chosen:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for proc in chosen:
            _stop(proc, grace_s, term=False)
            if proc in self.procs:
                self.procs.remove(proc)

    def log_tail(self, name: str, lines: int = 20) -> str:
        try:
            text = (self.log_dir / f"{name}.out").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> Children:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop(grace_s=5.0)


# -- /proc --------------------------------------------------------------------------------

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` so far (from /proc/<pid>/stat), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # after the command: state(0) ... utime is field 14 of the whole line, i.e. index 11 here
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def memory_kib(pid: int) -> dict[str, int]:
    """Resident (RSS), proportional (PSS) and unique (USS) memory of ``pid``, in KiB."""
    out = {"rss": 0, "pss": 0, "uss": 0}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                out["rss"] = int(line.split()[1])
    with contextlib.suppress(OSError):
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key == "Pss":
                    out["pss"] = int(rest.split()[0])
                elif key in ("Private_Clean", "Private_Dirty"):
                    out["uss"] += int(rest.split()[0])
    return out


def children_of(pid: int) -> list[int]:
    """Direct children of ``pid`` (from /proc/<pid>/task/*/children)."""
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{task}/children") as f:
                found.extend(int(p) for p in f.read().split())
    return found


# -- the machine --------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_gib = None
    with contextlib.suppress(OSError, ValueError), open("/proc/meminfo") as f:
        mem_gib = round(int(f.readline().split()[1]) / 1024 / 1024, 1)
    load = None
    with contextlib.suppress(OSError):
        load = [round(x, 2) for x in os.getloadavg()]
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": mem_gib,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "load_average_at_start": load,
    }


# -- output -------------------------------------------------------------------------------


def _cell(value: Any) -> str:
    return fmt(value)


def table_lines(columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """A plain-text table, columns padded to their widest cell."""
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    out = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    out.append("  ".join("-" * w for w in widths))
    out.extend("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells)
    return out


def print_result(result: Mapping[str, Any], file: Any = None) -> None:
    file = file or sys.stdout
    print(f"\n== {result.get('title') or result['name']} ==", file=file)
    if result.get("skipped"):
        print(f"skipped: {result['skipped']}", file=file)
        return
    if result.get("error"):
        print(f"ERROR: {result['error'].strip().splitlines()[-1]}", file=file)
    if result.get("columns") and result.get("rows"):
        for line in table_lines(result["columns"], result["rows"]):
            print(line, file=file)
    for t in result.get("targets", []):
        mark = {True: "met", False: "MISSED", None: "not judged"}[t["met"]]
        print(f"target {t['what']}: {t['target']}; measured {t['measured']} -> {mark}", file=file)
    for note in result.get("notes", []):
        print(f"note: {note}", file=file)
    file.flush()


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> list[str]:
    out = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        out.append("| " + " | ".join(_md_escape(_cell(row.get(c))) for c in columns) + " |")
    return out


def render_markdown(run: Mapping[str, Any]) -> str:
    """The whole run as the Markdown of ``docs/benchmarks.md``."""
    m = run["machine"]
    lines = [
        "# Benchmarks",
        "",
        "Generated by `python -m benchmarks`; do not edit by hand, run it again.",
        "",
        f"**Machine.** {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, Linux "
        f"{m['kernel']}, Python {m['python']}, SQLite {m['sqlite']} (load average at start "
        f"{m['load_average_at_start']}).",
        "",
        f"**Command.** `{run['command']}`" + (" (quick mode: every benchmark runs briefly; "
                                             "these numbers only show that it works)"
                                             if run["quick"] else ""),
        "",
        f"**Date.** {run['started_at']} (took {run['seconds']:.0f} s).",
        "",
        "**Method.** Every benchmark measures koubou-mcp and a peer (huey, plain polling, the raw "
        "SQL ceiling, a bare Python process) in the same run on the same machine, repeats, and "
        "reports medians with their spread written `median (min-max)`; this machine is shared "
        "and noisy, so read the ratios, not the absolute times.",
        "",
    ]
    targets = [(r, t) for r in run["benchmarks"] for t in r.get("targets", [])]
    errors = [r for r in run["benchmarks"] if r.get("error")]
    if targets or errors:
        lines += ["## Targets", "", "| benchmark | what | target | measured | met |",
                  "|---|---|---|---|---|"]
        for r, t in targets:
            met = {True: "yes", False: "**MISSED**", None: "not judged"}[t["met"]]
            lines.append(f"| {r['name']} | {_md_escape(t['what'])} | {_md_escape(t['target'])} "
                         f"| {_md_escape(t['measured'])} | {met} |")
        for r in errors:
            lines.append(f"| {r['name']} | (did not run) | - | error | **ERROR** |")
        lines.append("")
        missed = [f"{r['name']}: {t['what']}" for r, t in targets if t["met"] is False]
        if missed:
            lines += ["Missed: " + "; ".join(missed) + ". See the notes of each benchmark for "
                      "what limits it.", ""]
    for r in run["benchmarks"]:
        lines += [f"## {r.get('title') or r['name']}", "", f"`--only {r['name']}`"
                  + (f", {r['seconds']:.0f} s" if r.get("seconds") is not None else "")
                  + (f", 1-minute load average {r['load_average_at_start']} at its start"
                     if r.get("load_average_at_start") is not None else ""), ""]
        if r.get("skipped"):
            lines += [f"Skipped: {r['skipped']}", ""]
            continue
        if r.get("error"):
            last = r["error"].strip().splitlines()[-1]
            lines += [f"**Error**: `{_md_escape(last)}` (the traceback is in the JSON).", ""]
        if r.get("method"):
            lines += [f"Method: {r['method']}", ""]
        if r.get("columns") and r.get("rows"):
            lines += markdown_table(r["columns"], r["rows"]) + [""]
        for t in r.get("targets", []):
            verdict = {True: "Target met", False: "**Target missed**",
                       None: "Target not judged"}[t["met"]]
            lines.append(f"- {verdict}: {t['what']} {t['target']}; measured: {t['measured']}.")
        if r.get("targets"):
            lines.append("")
        for note in r.get("notes", []):
            lines.append(f"- {note}")
        if r.get("notes"):
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


# -- koubou-mcp workers -------------------------------------------------------------------


def start_workers(children: Children, store: Any, settings: Settings, worker_ids: Sequence[str],
                  timeout_s: float = 60.0) -> list[subprocess.Popen[bytes]]:
    """Start ``koubou-mcp worker`` processes and wait until each reports itself idle."""
    from koubou_mcp import queue

    procs = [children.worker(settings, wid) for wid in worker_ids]

    def ready() -> bool:
        for proc, wid in zip(procs, worker_ids, strict=True):
            if has_exited(proc):
                raise RuntimeError(f"worker {wid} exited:\n"
                                   + children.log_tail(wid))
        idle = {w.worker_id for w in queue.list_workers(store) if w.status == "idle"}
        return set(worker_ids) <= idle

    wait_until(ready, timeout=timeout_s, message=f"{len(worker_ids)} worker(s) to be idle",
               interval=0.05)
    return procs
