"""Health of a koubou-mcp installation: the checks behind ``koubou://health`` and ``doctor``.

Each check is a plain function returning a :class:`Check` (ok or not, what was found, why not,
how to fix it). ``collect_health`` runs them against an open store and a running server and
builds the ``koubou://health`` document; ``doctor`` runs them from the command line, where the
store may not even open. Nothing here raises for an unhealthy system: problems are data.

Overall status of the document:

* ``down``: the database cannot be used, or no task type can run (Ollama unreachable, or every
  configured model missing and Codex absent);
* ``degraded``: something is wrong but some work can proceed (a model missing, no live workers
  to run queued tasks);
* ``ok``: everything needed is fine. Optional pieces that are missing (the Codex CLI, which
  only ``code`` tasks need) are listed under ``warnings`` and do not degrade the status.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
from sqlalchemy.engine import make_url

from koubou_mcp import __version__, queue
from koubou_mcp.attachment import describe_holder
from koubou_mcp.backends.base import PermanentBackendError
from koubou_mcp.backends.codex import CodexBackend
from koubou_mcp.backends.ollama import OllamaBackend, model_present
from koubou_mcp.config import Settings
from koubou_mcp.home import UnsafeHome, left_behind
from koubou_mcp.home import check_home as check_home_is_private
from koubou_mcp.leader import lock_is_held, read_holder
from koubou_mcp.models import TaskStatus, TaskType, WorkerStatus, utcnow
from koubou_mcp.store import Store, StoreError, open_store

#: How long a health read waits for Ollama before calling it unreachable, s
OLLAMA_PROBE_TIMEOUT_S = 2.0
#: How long ``codex --version`` may take, s (Node start-up can be slow on a cold cache)
CODEX_PROBE_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Check:
    """The outcome of one check. ``reason`` and ``fix`` are set when ``ok`` is false.
    ``optional`` marks a piece that only some work needs: when it fails, that is a warning,
    not a problem."""

    name: str
    ok: bool
    summary: str
    reason: str | None = None
    fix: str | None = None
    data: dict[str, Any] = field(default_factory=dict)
    optional: bool = False

    @property
    def problem(self) -> bool:
        return not self.ok and not self.optional

    @property
    def warning(self) -> bool:
        return not self.ok and self.optional

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "optional": self.optional, "summary": self.summary,
                "reason": self.reason, "fix": self.fix, **self.data}


def redact_url(url: str) -> str:
    """A database URL safe to show: the password hidden."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL we can parse: show nothing secret-looking
        return url.split("@")[-1]


# -- database -----------------------------------------------------------------------------

def check_store(settings: Settings, store: Store) -> Check:
    """The open store answers a query, takes a write, and is still the file it opened."""
    shown = redact_url(settings.database_url)
    try:
        counts = queue.counts_by_status(store)
    except Exception as exc:  # any driver error is a finding, not a crash
        return Check("database", False, f"{shown} does not answer", reason=str(exc).strip(),
                     fix="check that the database is reachable and not corrupt (koubou-mcp "
                         "doctor says more)", data={"url": shown})
    problem = store.file_problem()
    if problem is not None:
        return Check("database", False, f"{shown} is gone", reason=problem,
                     fix="restart the server (and the pool) so that they open the database "
                         "anew; tasks written since were lost with the file", data={"url": shown})
    try:
        store.write_probe()  # reads may work while writes fail: locked, read-only, disk full
    except Exception as exc:
        detail = str(getattr(exc, "orig", None) or exc).strip().splitlines()
        return Check("database", False, f"{shown} answers but takes no writes",
                     reason=detail[0] if detail else type(exc).__name__,
                     fix="free disk space, make the database writable, or end whatever holds "
                         "its lock", data={"url": shown})
    return Check("database", True, f"{shown} ({store.dialect}, {sum(counts.values())} tasks)",
                 data={"url": shown, "dialect": store.dialect})


def check_database(settings: Settings) -> Check:
    """Can this installation use its database? Opens it without creating files (SQLite).

    A SQLite database that does not exist yet is fine as long as it can be created; one that
    exists must open, carry our schema, and be writable. PostgreSQL is opened (creating the
    schema if it is missing, as the server's first start would).
    """
    shown = redact_url(settings.database_url)
    path = sqlite_path(settings)
    if path is not None and not path.exists():
        blocker = _uncreatable(path)
        if blocker:
            return Check("database", False, f"{path} cannot be created", reason=blocker,
                         fix="point KOUBOU_HOME (or KOUBOU_DATABASE_URL) at a writable "
                             "directory", data={"url": shown})
        return Check("database", True, f"{path} does not exist yet; it is created when "
                     "koubou-mcp first starts", data={"url": shown, "exists": False})
    try:
        store = open_store(settings.database_url, settings.run_dir, create=path is None)
    except StoreError as exc:  # its message says what to do
        return Check("database", False, f"{shown} cannot be used", reason=str(exc),
                     data={"url": shown})
    try:
        found = check_store(settings, store)
    finally:
        store.close()
    if not found.ok:
        return found
    if path is not None:
        for target in (path, path.parent):
            if not os.access(target, os.W_OK):
                return Check("database", False, f"{path} is read-only",
                             reason=f"{target} is not writable by this user",
                             fix=f"make {target} writable (chmod u+w), or point KOUBOU_HOME "
                                 "elsewhere", data={"url": shown})
    return found


def check_vacuum(settings: Settings) -> Check | None:
    """PostgreSQL: whether the server vacuums the task table (None on SQLite, or when the
    database cannot be opened: ``check_database`` reports that). Every claim and hand-over
    leaves dead rows behind; with autovacuum off they pile up in the claim's index, and each
    claim walks past them (a hand-over took 1.1 ms on a fresh table, 2.3 ms 1200 tasks later:
    docs/benchmarks.md). A warning: the pool works, slower by the day."""
    if sqlite_path(settings) is not None:
        return None
    try:
        store = open_store(settings.database_url, settings.run_dir, create=False)
    except StoreError:
        return None
    try:
        setting = queue.autovacuum_setting(store)
    except Exception:  # a server that does not say: nothing to report
        return None
    finally:
        store.close()
    return None if setting is None else vacuum_finding(setting)


def vacuum_finding(autovacuum: str) -> Check:
    """``check_vacuum``'s finding for the server's ``autovacuum`` setting."""
    if autovacuum.strip().lower() in ("on", "true", "1"):
        return Check("vacuum", True, "autovacuum is on: the task table's dead rows are cleared",
                     data={"autovacuum": autovacuum})
    return Check("vacuum", False, "autovacuum is off on this PostgreSQL server",
                 reason="every task leaves dead rows in task_master; without autovacuum they "
                        "pile up and each claim gets slower",
                 fix="turn it on (ALTER SYSTEM SET autovacuum = on; SELECT pg_reload_conf();) "
                     "or run VACUUM ANALYZE task_master, workers, model_servers regularly "
                     "(from cron, say)", data={"autovacuum": autovacuum}, optional=True)


def sqlite_path(settings: Settings) -> Path | None:
    """The database file of a SQLite URL, or None for PostgreSQL (or an unparsable URL)."""
    try:
        url = make_url(settings.database_url)
    except Exception:
        return None
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        return None
    return Path(url.database)


def _uncreatable(path: Path) -> str | None:
    """Why ``path`` could not be created, or None when it could be. Probes the nearest
    existing directory by creating (and removing) a temporary directory in it."""
    parent = path.parent
    while not parent.exists():
        if parent.parent == parent:
            break
        parent = parent.parent
    if not parent.is_dir():
        return f"{parent} is not a directory"
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".koubou-doctor-", dir=parent))
    except OSError as exc:
        return f"cannot create anything in {parent}: {exc.strerror}"
    return None


def check_home(settings: Settings) -> Check:
    """The home directory (logs, run files) exists, is this user's alone and writable, or can
    be created."""
    home = settings.home
    try:
        check_home_is_private(settings)
    except UnsafeHome as exc:
        reason, _, fix = str(exc).partition(" Fix: ")
        return Check("home", False, f"{home} is not private to this user", reason=reason,
                     fix=fix or None)
    if home.exists():
        if not home.is_dir():
            return Check("home", False, f"{home} is not a directory", reason=f"{home} is a file",
                         fix="set KOUBOU_HOME to a directory")
        if not os.access(home, os.W_OK | os.X_OK):
            return Check("home", False, f"{home} is read-only",
                         reason=f"{home} is not writable by this user",
                         fix=f"make {home} writable, or set KOUBOU_HOME elsewhere")
        return Check("home", True, f"{home}", data={"path": str(home)})
    blocker = _uncreatable(home / "x")
    if blocker:
        return Check("home", False, f"{home} cannot be created", reason=blocker,
                     fix="set KOUBOU_HOME to a writable directory")
    return Check("home", True, f"{home} (created at first start)", data={"path": str(home)})


def check_old_home(settings: Settings, start_dir: Path) -> Check | None:
    """A notice (never a failure: this home is fine) when the old per-directory default home
    in ``start_dir`` still holds unfinished tasks; None when there is nothing to say."""
    found = left_behind(settings, start_dir)
    if found is None:
        return None
    return Check("old home", True, found.message, data={"notice": True, **found.as_dict()})


# -- backends -----------------------------------------------------------------------------

async def check_ollama(settings: Settings, *, timeout_s: float = OLLAMA_PROBE_TIMEOUT_S) -> Check:
    """Ollama answers at the configured URL and has the configured models pulled."""
    backend = OllamaBackend(settings.ollama_url, settings.general_model)
    try:
        probe = await backend.probe(timeout_s=timeout_s)
    finally:
        await backend.aclose()
    wanted = sorted({settings.general_model, settings.code_model})
    data: dict[str, Any] = {"url": settings.ollama_url, "reachable": probe["reachable"],
                            "version": probe["version"], "models_configured": wanted,
                            "models_missing": [], "models_ready": []}
    if not probe["reachable"]:
        return Check("ollama", False, f"unreachable at {settings.ollama_url}",
                     reason=probe["error"] or "no answer", data=data)  # the error says the fix
    if probe["error"]:
        return Check("ollama", False, f"{settings.ollama_url} does not answer like Ollama",
                     reason=probe["error"], data=data,
                     fix="check that KOUBOU_OLLAMA_URL points at Ollama's root URL")
    missing = [m for m in wanted if not model_present(probe["models"], m)]
    data["models_missing"] = missing
    data["models_ready"] = [m for m in wanted if m not in missing]
    if missing:
        return Check("ollama", False,
                     f"Ollama {probe['version'] or '?'} at {settings.ollama_url} lacks "
                     f"{', '.join(missing)}",
                     reason=f"model(s) not pulled: {', '.join(missing)}",
                     fix="; ".join(f"`ollama pull {m}`" for m in missing) + ", or set "
                         "KOUBOU_GENERAL_MODEL / KOUBOU_CODE_MODEL to models it has", data=data)
    return Check("ollama", True, f"Ollama {probe['version'] or '?'} at {settings.ollama_url} "
                 f"with {', '.join(wanted)}", data=data)


#: How long one ``codex --version`` answer is reused: health may be asked often and at once
#: (``/health`` under load), and a child process each time would cost more than the answer.
CODEX_PROBE_CACHE_S = 60.0


class _ProbeCache:
    """``CodexBackend.probe`` answers by executable (its path and modification time, so an
    upgrade is seen), reused for ``CODEX_PROBE_CACHE_S``; callers that ask while a probe runs
    wait for that one instead of starting their own."""

    def __init__(self) -> None:
        self._answers: dict[tuple[str, int], tuple[float, dict[str, Any]]] = {}
        self._running: dict[tuple[object, str, int], anyio.Event] = {}

    async def probe(self, backend: CodexBackend) -> dict[str, Any]:
        try:
            path = backend.resolve_binary()
            key = (path, os.stat(path).st_mtime_ns)
        except (PermanentBackendError, OSError):
            return await backend.probe()  # nothing to run: that answer is quick
        while True:
            cached = self._answers.get(key)
            if cached is not None and time.monotonic() - cached[0] < CODEX_PROBE_CACHE_S:
                return cached[1]
            running = (anyio.lowlevel.current_token(), *key)  # an event serves one event loop
            if running not in self._running:
                break
            await self._running[running].wait()
        done = self._running[running] = anyio.Event()
        try:
            answer = await backend.probe()
            self._answers[key] = (time.monotonic(), answer)
            return answer
        finally:
            del self._running[running]
            done.set()


_CODEX_PROBES = _ProbeCache()


async def check_codex(settings: Settings, *, timeout_s: float = CODEX_PROBE_TIMEOUT_S) -> Check:
    """The Codex CLI is installed and says its version. Optional: only ``code`` tasks need it."""
    backend = CodexBackend(settings.codex_bin, settings.code_model, settings.ollama_url,
                           settings.codex_sandbox, str(settings.workdir),
                           env=settings.codex_env, probe_timeout_s=timeout_s)
    probe = await _CODEX_PROBES.probe(backend)
    data = {"bin": settings.codex_bin, "found": probe["found"], "path": probe["path"],
            "version": probe["version"]}
    if not probe["found"]:  # the error says how to install it
        return Check("codex", False, f"{settings.codex_bin!r} not found (only `code` tasks "
                     "need it)", reason=probe["error"], data=data, optional=True)
    if probe["error"]:
        return Check("codex", False, f"{probe['path']} does not run", reason=probe["error"],
                     fix="reinstall the Codex CLI, or set KOUBOU_CODEX_BIN to a working one",
                     data=data, optional=True)
    return Check("codex", True, f"{probe['version']} at {probe['path']}", data=data)


# -- workers ------------------------------------------------------------------------------

def live_workers(store: Store, settings: Settings, now: datetime) -> list[dict[str, Any]]:
    """Workers that heartbeated within a lease (the others are dead or stopping)."""
    cutoff = now - timedelta(seconds=settings.lease_s)
    return [queue.worker_record(w) for w in queue.list_workers(store)
            if w.last_heartbeat is not None and w.last_heartbeat >= cutoff]


def check_supervisor(settings: Settings, supervisor: Mapping[str, Any] | None,
                     pool_error: str | None = None) -> Check:
    """Who supervises the pool of this home: the pool this server is attached to
    (``supervisor`` is ``attachment.PoolLink.health()``), a supervisor in this process (its
    ``health()``), another process holding the pool lock, or nobody."""
    if pool_error:
        return Check("supervisor", False, "the pool could not start", reason=pool_error,
                     fix=f"see {settings.server_log}")
    if supervisor is not None and supervisor.get("hosting") == "attached":
        return _check_attached(settings, supervisor)
    if supervisor is not None:
        data = dict(supervisor)
        if not supervisor.get("running", True):
            return Check("supervisor", False, "the pool supervisor stopped",
                         reason=supervisor.get("last_error") or "its thread ended",
                         fix=f"see {settings.pool_log}; restart the server",
                         data=data)
        crash = supervisor.get("crash_loop") or {}
        if crash.get("active"):
            return Check("supervisor", False, "workers keep failing at start-up",
                         reason=str(crash.get("last_failure")),
                         fix="read the worker log it names; `koubou-mcp doctor` checks the "
                             "setup", data=data)
        if supervisor.get("leader"):
            return Check("supervisor", True, f"supervising in this process (pid "
                         f"{supervisor.get('pid')})", data=data)
        # Before its first try to lead, a standing-by supervisor has not read the pid file yet.
        leader_pid = supervisor.get("leader_pid")
        if leader_pid is None:
            holder = read_holder(settings.run_dir)
            leader_pid = holder.pid if holder else None
        if leader_pid is None:
            return Check("supervisor", True, "starting: no supervisor holds this home yet",
                         data=data)
        return Check("supervisor", True, f"standing by: pid {leader_pid} supervises this home",
                     data={**data, "leader_pid": leader_pid})
    if lock_is_held(settings.run_dir):
        holder = read_holder(settings.run_dir)
        return Check("supervisor", True, f"run by {describe_holder(*_role_pid(holder))}", data={
            "running": True, "leader": False, "pid": holder.pid if holder else None,
            "role": holder.role if holder else None,
            "detached": holder is not None and holder.role == "detached"})
    # Not a problem by itself (workers may run elsewhere); check_workers decides.
    return Check("supervisor", True, "none for this home in any process",
                 data={"running": False})


def _role_pid(holder: Any) -> tuple[str | None, int | None]:
    return (holder.role, holder.pid) if holder is not None else (None, None)


def _check_attached(settings: Settings, link: Mapping[str, Any]) -> Check:
    data = dict(link)
    servers = len(link.get("attached_servers") or ())
    attached = f"{servers} server{'' if servers == 1 else 's'} attached"
    if link.get("starting"):
        return Check("supervisor", True, f"starting: a background pool, pid {link.get('pid')} "
                     f"({attached})", data=data)
    crash = link.get("crash_loop") or {}
    if link.get("running") and crash.get("active"):
        return Check("supervisor", False, "workers keep failing at start-up",
                     reason=str(crash.get("last_failure")),
                     fix="read the worker log it names; `koubou-mcp doctor` checks the setup",
                     data=data)
    if link.get("running"):
        return Check("supervisor", True, f"run by {describe_holder(link.get('role'), link.get('pid'))}"
                     f"; {attached}", data=data)
    if link.get("stopped_by_user"):
        return Check("supervisor", True, f"stopped with `koubou-mcp stop`; the next task "
                     f"delegated here starts it again ({attached})", data=data)
    return Check("supervisor", False, "no pool runs for this home",
                 reason=link.get("last_failure") or "the background pool is gone",
                 fix=f"this server starts it again within seconds; if not, see "
                     f"{settings.pool_log}", data=data)


def check_workers(settings: Settings, store: Store, supervisor: Check, now: datetime) -> Check:
    """Somebody will run queued tasks: live workers, or a supervisor that can start them."""
    workers = live_workers(store, settings, now)
    busy = sum(1 for w in workers if w["status"] == WorkerStatus.BUSY.value)
    by_host: dict[str, dict[str, int]] = {}
    for w in workers:
        counts = by_host.setdefault(w["host"], {"live": 0, "busy": 0})
        counts["live"] += 1
        counts["busy"] += w["status"] == WorkerStatus.BUSY.value
    data: dict[str, Any] = {"live": len(workers), "busy": busy, "idle": len(workers) - busy,
                            "by_host": by_host, "list": workers}
    summary = f"{len(workers)} live ({busy} busy)"
    if workers or (supervisor.ok and supervisor.data.get("running")):
        return Check("workers", True, summary, data=data)
    return Check("workers", False, summary,
                 reason="no live worker and no pool supervisor: queued tasks will wait",
                 fix="run the server without --no-pool, or start a pool with `koubou-mcp pool`",
                 data=data)


# -- the health document ------------------------------------------------------------------

async def collect_health(
    settings: Settings,
    store: Store | None,
    *,
    supervisor: Mapping[str, Any] | None = None,
    store_error: str | None = None,
    pool_error: str | None = None,
    now: datetime | None = None,
    start_dir: Path | None = None,
) -> dict[str, Any]:
    """The ``koubou://health`` document. ``supervisor`` is the health of the pool supervisor
    this process runs (None when it runs none); ``store_error`` says why ``store`` is None,
    ``pool_error`` why the pool did not start; ``start_dir`` (default: the current directory)
    is where an old per-directory home may have been left behind."""
    now = utcnow() if now is None else now
    old_home = await anyio.to_thread.run_sync(
        left_behind, settings, Path.cwd() if start_dir is None else start_dir)
    results: dict[str, Check] = {}

    async def run_ollama() -> None:
        results["ollama"] = await check_ollama(settings)

    async def run_codex() -> None:
        results["codex"] = await check_codex(settings)

    async with anyio.create_task_group() as tg:
        tg.start_soon(run_ollama)
        tg.start_soon(run_codex)

    shown = redact_url(settings.database_url)
    if store is None:
        database = Check("database", False, f"{shown} is not open",
                         reason=store_error or "the store is not open",
                         fix="fix what the reason says, then restart the server",
                         data={"url": shown})
    else:
        database = await anyio.to_thread.run_sync(check_store, settings, store)
    pool = check_supervisor(settings, supervisor, pool_error)
    queue_info: dict[str, Any] = {}
    model_servers: list[dict[str, Any]] = []
    workers: Check | None = None
    if store is not None and database.ok:
        def read() -> tuple[dict[str, int], int, Check, list[queue.ServerUse]]:
            return (queue.counts_by_status(store), queue.ready_pending_count(store, now),
                    check_workers(settings, store, pool, now), queue.model_servers(store, now))

        counts, ready, workers, servers = await anyio.to_thread.run_sync(read)
        queue_info = {"depth": counts[TaskStatus.PENDING.value], "ready": ready,
                      "in_progress": counts[TaskStatus.IN_PROGRESS.value], "counts": counts}
        model_servers = [use.as_dict() for use in servers]

    ollama, codex = results["ollama"], results["codex"]
    ready = ollama.data["models_ready"]
    general_ok = settings.general_model in ready
    code_ok = codex.ok and settings.code_model in ready
    checked = [c for c in (database, pool, workers, ollama, codex) if c is not None]
    problems = [f"{c.name}: {c.reason}" for c in checked if c.problem]
    warnings = [f"{c.name}: {c.reason}" for c in checked if c.warning]
    if not database.ok or not (general_ok or code_ok):
        status = "down"
    elif problems:
        status = "degraded"
    else:
        status = "ok"
    return {
        "status": status,
        "problems": problems,
        "warnings": warnings,
        "checked_at": now.isoformat(timespec="milliseconds") + "Z",
        "version": __version__,
        "home": str(settings.home),
        "database": database.as_dict(),
        "supervisor": pool.as_dict(),
        "workers": workers.as_dict() if workers is not None else None,
        "queue": queue_info or None,
        # each model server's slots: in use, the limit (learned or pinned), first-token time
        "model_servers": model_servers,
        "backends": {
            "ollama": {**ollama.as_dict(), "serves": TaskType.GENERAL.value if general_ok else None},
            "codex": {**codex.as_dict(), "serves": TaskType.CODE.value if code_ok else None},
        },
        "task_types": {TaskType.GENERAL.value: general_ok, TaskType.CODE.value: code_ok},
        # an old ./.koubou with unfinished tasks: not this home's problem, but worth a word
        "left_behind": old_home.as_dict() if old_home is not None else None,
    }
