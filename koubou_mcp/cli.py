"""The ``koubou-mcp`` command: logging set-up and running the subcommands (their arguments are
``arguments``'s).

No business logic lives here. Exit codes: 0 success; 1 a failed task or a runtime problem
(database unreachable, pool not running); 2 bad usage or bad input (nothing was changed).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from datetime import timedelta
from pathlib import Path
from typing import Any, NoReturn, TextIO

import httpx

from koubou_mcp import queue
from koubou_mcp.arguments import build_parser
from koubou_mcp.config import (
    ConfigError,
    Settings,
)
from koubou_mcp.home import check_home, left_behind, private_log_handler
from koubou_mcp.leader import LOCK_FILE, PID_FILE, lock_is_held, read_holder
from koubou_mcp.logformat import LineFormatter, lean_records
from koubou_mcp.models import FINAL_STATUSES, TaskStatus, utcnow
from koubou_mcp.modelset import ModelSet
from koubou_mcp.processes import process_cmdline, wait_gone
from koubou_mcp.store import Store, StoreError, open_store
from koubou_mcp.terminal_text import safe_json, safe_text
from koubou_mcp.throttle import RepeatFilter

log = logging.getLogger("koubou_mcp")

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
#: what a shell reports for a command killed by SIGPIPE (128 + 13)
EXIT_BROKEN_PIPE = 141


class UsageError(Exception):
    """Bad input from the user: exit 2 with the message."""


# -- helpers ------------------------------------------------------------------------------

def _settings(args: argparse.Namespace) -> Settings:
    overrides = {
        name: getattr(args, name)
        for name in ("home", "database_url", "ollama_url", "min_workers", "max_workers",
                     "scale_up_threshold", "idle_timeout_s", "transport", "http_host",
                     "http_port", "no_pool")
        if getattr(args, name, None) is not None
    }
    settings = Settings.from_env(**overrides)
    if args.command != "doctor":  # the doctor reports an unsafe home instead of refusing it
        check_home(settings)
    return settings


def _warn_left_behind(settings: Settings) -> None:
    """Say once, at start, that the old per-directory default home still has work."""
    found = left_behind(settings, Path.cwd())
    if found is not None:
        log.warning("%s", found.message)


def _store(settings: Settings, *, create: bool = True) -> Store:
    return open_store(settings.database_url, settings.run_dir, create=create,
                      busy_timeout_s=settings.sqlite_busy_timeout_s)


@contextmanager
def _opened(settings: Settings, *, create: bool = True) -> Iterator[Store]:
    """The store for a command, closed when the command ends."""
    store = _store(settings, create=create)
    try:
        yield store
    finally:
        store.close()


def setup_logging(settings: Settings, logfile: Path | None, *, stderr_level: int) -> None:
    """Log to ``logfile`` (if any) at the configured level and to stderr at ``stderr_level``.

    Never to stdout: in `serve` it carries the MCP protocol.
    """
    root = logging.getLogger()
    root.handlers.clear()
    level = getattr(logging, settings.log_level)
    root.setLevel(min(level, stderr_level))
    lean_records()
    fmt = LineFormatter()  # shared by both handlers: each record is formatted once
    repeats = RepeatFilter()  # one filter for both handlers: a burst is counted once
    err = logging.StreamHandler(sys.stderr)
    err.addFilter(repeats)
    err.setLevel(stderr_level)
    err.setFormatter(fmt)
    root.addHandler(err)
    if logfile is not None:
        fh = private_log_handler(logfile)  # never through a symbolic link
        fh.setLevel(level)
        fh.setFormatter(fmt)
        fh.addFilter(repeats)
        root.addHandler(fh)
    for noisy in ("httpx", "httpcore", "sqlalchemy"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _print_json(data: Any) -> None:
    print(safe_json(data))


def _describe_task(record: dict[str, Any]) -> str:
    lines = [f"{record['task_id']}  {record['status']}  type={record['type']}  "
             f"priority={record['priority']}  attempts={record['attempts']}/{record['max_attempts']}"]
    if record.get("worker_id"):
        lines.append(f"worker: {record['worker_id']}")
    lines.append(f"created: {record['created_at']}  finished: {record['finished_at'] or '-'}"
                 + (f"  ({record['duration_s']} s)" if record.get("duration_s") is not None else ""))
    if record.get("workdir"):
        lines.append(f"workdir: {record['workdir']}")
    if record.get("files"):
        lines.append(f"files: {', '.join(record['files'])}")
    if record.get("model"):
        lines.append(f"model: {record['model']}")
    if record.get("error"):
        lines.append(f"error: {record['error']}")
    if record.get("result") is not None:
        lines.append("result:")
        lines.append(record["result"])
    return safe_text("\n".join(lines))  # a result may carry escape sequences


def _read_prompt(arg: str) -> str:
    if arg != "-":
        return arg
    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"the prompt on stdin is not valid UTF-8 (byte {exc.start}); "
                         "send UTF-8 text") from None


# -- commands -----------------------------------------------------------------------------

def cmd_submit(args: argparse.Namespace) -> int:
    settings = _settings(args)
    from koubou_mcp import service

    prompt = _read_prompt(args.prompt)
    try:
        request = service.validate(
            settings, prompt, args.type, args.priority, args.timeout, args.idempotency_key,
            workdir=args.workdir and os.path.abspath(args.workdir), files=args.files,
            model=args.model, system=args.system, options=_options(args.options),
            output_schema=_schema(args.output_schema), models=ModelSet(settings).names)
    except service.InvalidRequest as exc:
        raise UsageError(str(exc)) from None
    with _opened(settings) as store:
        enqueued = queue.enqueue(store, request, settings, utcnow())
        task = enqueued.task
        if args.wait and not _something_runs_tasks(settings, store):
            print(f"koubou-mcp: {task.task_id} is queued, but no pool or worker runs for "
                  f"{settings.home} to run it. Start one (`koubou-mcp pool`, or a "
                  f"`koubou-mcp serve`), then `koubou-mcp status {task.task_id}`",
                  file=sys.stderr, flush=True)
            if args.wait_timeout is None:  # it would wait for ever
                record = service.TaskRecord.of(task, include_prompt=False).as_json()
                _print_json(record) if args.json else print(task.task_id)
                return EXIT_FAILED
        if args.wait:
            deadline = None if args.wait_timeout is None else time.monotonic() + args.wait_timeout
            while task.status not in FINAL_STATUSES:
                if deadline is not None and time.monotonic() >= deadline:
                    break
                time.sleep(0.1)  # polling a local file is cheap; this is the CLI's own wait
                task = queue.get_task(store, task.task_id)
        record = service.TaskRecord.of(task, include_prompt=False).as_json()
        if args.json:
            _print_json(record)
        elif args.wait:
            print(_describe_task(record))
        else:
            print(task.task_id)
        if args.wait and task.status != TaskStatus.COMPLETED.value:
            return EXIT_FAILED
        return EXIT_OK


def _something_runs_tasks(settings: Settings, store: Store) -> bool:
    """Whether a pool holds this home's leader lock or a worker heartbeated within a lease."""
    if lock_is_held(settings.run_dir):
        return True
    cutoff = utcnow() - timedelta(seconds=settings.lease_s)
    return any(w.last_heartbeat is not None and w.last_heartbeat >= cutoff
               for w in queue.list_workers(store))


def _options(pairs: list[str] | None) -> dict[str, Any] | None:
    """``--option temperature=0.2``: numbers as numbers (the service checks them)."""
    if not pairs:
        return None
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--option takes KEY=VALUE (such as temperature=0.2), got {pair!r}")
        try:
            out[key.strip()] = json.loads(raw)
        except ValueError:
            out[key.strip()] = raw
    return out


def _schema(text: str | None) -> Any:
    """``--output-schema``: JSON, or @FILE holding it."""
    if text is None:
        return None
    source = "--output-schema"
    if text.startswith("@"):
        source = text[1:]
        try:
            text = Path(source).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read the output schema from {source}: {exc}") from None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise UsageError(f"{source} is not JSON: {exc}") from None


def cmd_submit_batch(args: argparse.Namespace) -> int:
    settings = _settings(args)
    from koubou_mcp import service

    raw = _read_prompt(args.file) if args.file == "-" else _read_file(args.file)
    try:
        tasks = json.loads(raw)
    except ValueError as exc:
        raise UsageError(f"{args.file} is not JSON: {exc}") from None
    try:
        requests = service.batch_from(settings, tasks, ModelSet(settings).names)
    except service.InvalidRequest as exc:
        raise UsageError(str(exc)) from None
    with _opened(settings) as store:
        enqueued = queue.enqueue_many(store, requests, settings, utcnow())
    records = [service.TaskRecord.of(e.task, include_prompt=False).as_json() for e in enqueued]
    if args.json:
        _print_json(records)
    else:
        for record in records:
            print(record["task_id"])
    return EXIT_OK


def _read_file(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read {path}: {exc}") from None


def cmd_wait(args: argparse.Namespace) -> int:
    """Wait on tasks in the store; exit 0 when the wait's tasks completed, 1 otherwise."""
    from koubou_mcp import service

    settings = _settings(args)
    try:
        ids = service.check_task_ids(args.task_ids)
    except service.InvalidRequest as exc:
        raise UsageError(str(exc)) from None
    mode = "any" if args.any else "all"
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    with _opened(settings, create=False) as store:
        while True:
            try:
                ended = [p.status in FINAL_STATUSES for p in queue.tasks_progress(store, ids)]
            except queue.TaskNotFound as exc:
                raise UsageError(str(exc)) from None
            if (all(ended) if mode == "all" else any(ended)) or \
                    (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(0.1)  # polling a local file is cheap; this is the CLI's own wait
        records = [service.TaskRecord.of(t, include_prompt=False)
                   for t in queue.get_tasks(store, ids)]
    waited = service.WaitResult.of(mode, records, 0.0)
    if args.json:
        _print_json(waited.as_json())
    else:
        print("\n\n".join(_describe_task(r.as_json()) for r in records))
    wanted = records if mode == "all" else [r for r in records if r.ended]
    ok = waited.done and all(r.status == TaskStatus.COMPLETED.value for r in wanted)
    return EXIT_OK if ok else EXIT_FAILED


def cmd_status(args: argparse.Namespace) -> int:
    from koubou_mcp import service

    settings = _settings(args)
    with _opened(settings, create=False) as store:
        try:
            record = service.read_task(store, args.task_id).as_json()
        except service.TaskNotFound as exc:
            raise UsageError(str(exc)) from None
        _print_json(record) if args.json else print(_describe_task(record))
        return EXIT_OK


def cmd_tasks(args: argparse.Namespace) -> int:
    from koubou_mcp import service

    settings = _settings(args)
    if not 1 <= args.limit <= 1000:
        raise UsageError(f"--limit must be from 1 to 1000, got {args.limit}")
    with _opened(settings, create=False) as store:
        if args.json:
            records, counts = service.list_task_records(store, args.status, args.limit)
            _print_json({"tasks": [r.as_json() for r in records], "counts": counts})
            return EXIT_OK
        tasks = queue.list_tasks(store, args.status, args.limit)
        counts = queue.counts_by_status(store)
        for t in tasks:
            preview = safe_text(" ".join(t.prompt.split())[:60])
            where = f"  [{safe_text(t.workdir)}]" if t.workdir else ""
            print(f"{t.task_id}  {t.status:<11}  {t.type:<7}  p{t.priority:<2}  {preview}{where}")
        print("  ".join(f"{k}: {v}" for k, v in counts.items()))
        return EXIT_OK


def cmd_cancel(args: argparse.Namespace) -> int:
    from koubou_mcp import service

    settings = _settings(args)
    with _opened(settings, create=False) as store:
        try:
            record = service.cancel_task(store, args.task_id, utcnow())
        except (service.TaskNotFound, service.TaskFinished) as exc:
            raise UsageError(str(exc)) from None
        if args.json:
            _print_json(record.as_json())
        else:
            state = ("cancelled" if record.status == TaskStatus.CANCELLED.value
                     else "cancel requested; its worker stops it within about a second")
            print(f"{record.task_id}: {state}")
        return EXIT_OK


def cmd_stats(args: argparse.Namespace) -> int:
    from koubou_mcp.report import stats_block

    settings = _settings(args)
    with _opened(settings, create=False) as store:
        stats = queue.stats(store)
        _print_json(stats.as_dict()) if args.json else print(stats_block(stats))
        return EXIT_OK


def cmd_worker(args: argparse.Namespace) -> int:
    settings = _settings(args)  # validate before importing anything heavy
    from koubou_mcp.worker import run_worker

    worker_id = os.environ.get("WORKER_ID", "").strip() or queue.new_worker_id(utcnow())
    if len(worker_id) > 128 or not worker_id.replace("-", "_").replace(".", "_").isidentifier():
        raise UsageError(f"WORKER_ID {worker_id!r} must be letters, digits, '_', '-' or '.', "
                         "at most 128 characters")
    supervisor = os.environ.get("KOUBOU_SUPERVISOR_PID", "").strip()
    supervisor_pid = int(supervisor) if supervisor.isdigit() else None
    # Started by a supervisor, stderr already is this worker's log file.
    logfile = None if supervisor_pid else settings.worker_log(worker_id)
    setup_logging(settings, logfile, stderr_level=logging.INFO)
    # A supervised worker's store exists (its supervisor opened it): should the file be gone,
    # it must not quietly start an empty one that nobody else sees.
    with _opened(settings, create=supervisor_pid is None) as store:
        run_worker(settings, store, worker_id, supervisor_pid=supervisor_pid,
                   max_tasks=args.max_tasks)
    return EXIT_OK


def cmd_pool(args: argparse.Namespace) -> int:
    settings = _settings(args)  # validate before importing anything heavy
    from koubou_mcp.pool import run_pool

    if args.detached:
        # stderr is the same file already (processes.launch_pool): log there once
        setup_logging(settings, settings.pool_log, stderr_level=logging.CRITICAL + 1)
        return run_pool(settings, detached=True)
    setup_logging(settings, settings.pool_log, stderr_level=logging.INFO)
    _warn_left_behind(settings)
    return run_pool(settings)


def cmd_stop(args: argparse.Namespace) -> int:
    return stop_pool(_settings(args), args.timeout)


def stop_pool(settings: Settings, timeout_s: float, *, out: TextIO | None = None,
              err: TextIO | None = None) -> int:
    """``koubou-mcp stop``: SIGTERM the pool of this home (``koubou-mcp pool``, in the
    foreground or the background one a server started) and wait for it to drain. After
    ``timeout_s`` it is asked again (which forces). Attached servers then leave it stopped
    until a new task comes through them. Exit code 0 once it is gone; 1 when no pool runs, the
    pid is not a koubou-mcp pool, or it would not stop."""
    from koubou_mcp.attachment import mark_stopped
    from koubou_mcp.supervisor import Tuning

    out = out or sys.stdout
    err = err or sys.stderr
    lock, pid_file = settings.run_dir / LOCK_FILE, settings.run_dir / PID_FILE
    if not lock_is_held(settings.run_dir):
        print(f"koubou-mcp: no pool is running for {settings.home} (nothing holds {lock})",
              file=err)
        return EXIT_FAILED
    holder = read_holder(settings.run_dir)
    if holder is None:
        print(f"koubou-mcp: a supervisor holds {lock} but {pid_file} is missing or unreadable; "
              "cannot tell which process to stop", file=err)
        return EXIT_FAILED
    if holder.role not in ("pool", "detached"):
        print(f"koubou-mcp: the pool for {settings.home} runs inside a koubou-mcp {holder.role} "
              f"(pid {holder.pid}); it stops when that process exits", file=err)
        return EXIT_FAILED
    cmdline = process_cmdline(holder.pid)
    if cmdline is not None and not any("koubou" in arg for arg in cmdline):
        print(f"koubou-mcp: pid {holder.pid} in {pid_file} is not koubou-mcp "
              f"({' '.join(cmdline)[:120]}); not signalling it", file=err)
        return EXIT_FAILED
    mark_stopped(settings.run_dir)  # before the signal: attached servers must not restart it
    try:
        os.kill(holder.pid, signal.SIGTERM)
    except ProcessLookupError:
        print(f"the pool (pid {holder.pid}) had already stopped", file=out)
        return EXIT_OK
    where = "background pool" if holder.role == "detached" else "pool"
    print(f"stopping the {where} (pid {holder.pid}); running tasks get up to "
          f"{settings.drain_grace_s:g}s to finish", file=out, flush=True)
    if wait_gone(holder.pid, timeout_s):
        print("pool stopped", file=out)
        return EXIT_OK
    print(f"koubou-mcp: the pool did not stop within {timeout_s:g}s; forcing it (running tasks "
          "go back to the queue)", file=err, flush=True)
    with suppress(ProcessLookupError):
        os.kill(holder.pid, signal.SIGTERM)  # a second SIGTERM forces
    tuning = Tuning()
    if wait_gone(holder.pid, tuning.force_wait_s + tuning.drain_margin_s + 10.0):
        print("pool stopped (forced)", file=out)
        return EXIT_OK
    print(f"koubou-mcp: the pool (pid {holder.pid}) is still running; see "
          f"{settings.pool_log}", file=err)
    return EXIT_FAILED


def cmd_serve(args: argparse.Namespace) -> int:
    settings = _settings(args)  # validate before importing anything heavy
    from koubou_mcp.serve import run_server

    # Over stdio, stderr ends up in the client's logs: warnings only. Over HTTP it is the
    # terminal of whoever started the server: say where it listens.
    quiet = logging.WARNING if settings.transport == "stdio" else logging.INFO
    try:
        setup_logging(settings, settings.server_log, stderr_level=quiet)
    except OSError as exc:  # serve anyway: health and tool errors say what is wrong
        setup_logging(settings, None, stderr_level=logging.INFO)
        log.warning("cannot write %s (%s); logging to stderr only",
                    settings.server_log, exc.strerror or exc)
    _warn_left_behind(settings)
    if settings.transport == "stdio" and sys.stdin.isatty():
        print(terminal_hint(own_command()), file=sys.stderr, flush=True)
    run_server(settings, pool=not settings.no_pool, transport=settings.transport,
               host=settings.http_host, port=settings.http_port)
    return EXIT_OK


def terminal_hint(command: str) -> str:
    """What someone who started the MCP server in a terminal sees on stderr: the server speaks
    JSON-RPC on stdin/stdout to a client, so without this it looks like a blank screen."""
    return (
        "koubou-mcp: this is an MCP server; it speaks MCP on stdin/stdout and waits for a client "
        "such as Claude Code. Typing here does nothing.\n"
        f"  register it:    claude mcp add koubou -- {command}\n"
        f"  check setup:    {command} doctor\n"
        f"  watch the pool: {command} top\n"
        "  stop:           Ctrl-C"
    )


def cmd_doctor(args: argparse.Namespace) -> int:
    settings = _settings(args)  # validate before importing anything heavy
    from koubou_mcp.doctor import run_doctor

    return run_doctor(settings, as_json=args.json, command=own_command())


def own_command() -> str:
    """How to start this very koubou-mcp, by absolute path, for commands we suggest: a client
    such as Claude Code does not see the PATH of the virtual environment it was installed in."""
    argv0 = sys.argv[0] if sys.argv else ""
    if Path(argv0).name == "__main__.py":  # python -m koubou_mcp
        return f"{shlex.quote(str(Path(sys.executable).absolute()))} -m koubou_mcp"
    if os.sep in argv0 and Path(argv0).is_file():
        return shlex.quote(os.path.abspath(argv0))  # symlinks kept: a venv's own path
    found = shutil.which(argv0 or "koubou-mcp")
    return shlex.quote(os.path.abspath(found)) if found else "koubou-mcp"


def cmd_top(args: argparse.Namespace) -> int:
    settings = _settings(args)
    from koubou_mcp.top import run_top

    if args.interval <= 0:
        raise UsageError(f"--interval must be more than 0 seconds, got {args.interval}")
    with _opened(settings, create=False) as store:
        return run_top(settings, store, interval_s=args.interval, once=args.once)


def cmd_load_test(args: argparse.Namespace) -> int:
    settings = _settings(args)
    from koubou_mcp import loadtest

    if not 1 <= args.count <= 100_000:
        raise UsageError(f"--count must be from 1 to 100000, got {args.count}")
    if not 0.0 <= args.code_share <= 1.0:
        raise UsageError(f"--code-share must be from 0 to 1, got {args.code_share}")
    store: Store | None = None
    target: loadtest.Target
    if args.url:
        token = args.token or settings.http_token or None
        target = loadtest.RestTarget(args.url, token)
    else:
        store = _store(settings)
        target = loadtest.StoreTarget(store, settings)
    try:
        result = loadtest.run_load(target, args.count, code_share=args.code_share,
                                   seed=args.seed, timeout_s=args.timeout)
    except httpx.HTTPError as exc:
        print(f"koubou-mcp: error: the server at {args.url} failed: {exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        target.close()
        if store is not None:
            store.close()
    _print_json(result.as_dict()) if args.json else print(loadtest.summary(result))
    completed = result.statuses.get(TaskStatus.COMPLETED.value)
    return EXIT_OK if result.finished and completed == result.submitted else EXIT_FAILED


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "serve": cmd_serve, "worker": cmd_worker, "pool": cmd_pool, "submit": cmd_submit,
    "submit-batch": cmd_submit_batch, "wait": cmd_wait,
    "status": cmd_status, "tasks": cmd_tasks, "cancel": cmd_cancel, "stats": cmd_stats,
    "stop": cmd_stop, "doctor": cmd_doctor, "load-test": cmd_load_test, "top": cmd_top,
}


def _fail(code: int, message: str) -> NoReturn:
    print(f"koubou-mcp: error: {safe_text(message)}", file=sys.stderr)
    raise SystemExit(code)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0] not in COMMANDS and argv[0] not in ("-h", "--help", "--version")):
        argv = ["serve", *argv]  # `koubou-mcp [serve flags]` runs the server
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except BrokenPipeError:
        # the reader went away (`koubou-mcp tasks | head`): stop quietly, as `yes | head`
        # does; stdout goes to /dev/null so that the interpreter's last flush cannot fail too
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except ConfigError as exc:
        _fail(EXIT_USAGE, f"{exc}")
    except UsageError as exc:
        _fail(EXIT_USAGE, str(exc))
    except StoreError as exc:
        _fail(EXIT_FAILED, str(exc))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
