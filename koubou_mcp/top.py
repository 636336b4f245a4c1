"""``koubou-mcp top``: the pool at a glance, live in the terminal.

Reads the store through ``queue`` about once a second and draws, with ``rich``: the workers
(busy or idle, the task each runs, host), the queue by priority, model-server slots, and the
latest results and failures. ``q`` or Ctrl-C leaves it. Nothing here writes to the store.

Rendering is a pure function of a :class:`View` (what was read, and when), so the layout can
be tested without a terminal; only :func:`run_top` reads the clock and the keyboard.
"""

from __future__ import annotations

import contextlib
import os
import select
import sys
import termios
import time
import tty
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text
from sqlalchemy.exc import SQLAlchemyError

from koubou_mcp import __version__, queue
from koubou_mcp.attachment import pool_summary
from koubou_mcp.config import Settings
from koubou_mcp.models import TaskSnapshot, TaskStatus, WorkerSnapshot, elapsed_s, utcnow
from koubou_mcp.store import Store

#: how many finished tasks of each kind (results, failures) the view lists
RECENT_ROWS = 5
#: longest text shown of a result or an error, in characters
PREVIEW_CHARS = 70
#: columns of the view when stdout is not a terminal (``--once`` into a pipe or a file)
PIPED_WIDTH = 160
#: shown where there is no data (yet)
NO_DATA = "—"


@dataclass(frozen=True)
class View:
    """Everything one frame shows, read at ``read_at``."""

    read_at: datetime
    counts: dict[str, int]
    waiting: dict[int, int]
    workers: list[WorkerSnapshot]
    completed: list[TaskSnapshot]
    failed: list[TaskSnapshot]
    servers: list[queue.ServerUse] = field(default_factory=list)
    #: where the pool runs and the servers attached (``attachment.pool_summary``)
    pool: str = ""


def read_view(store: Store, now: datetime, run_dir: Path | None = None) -> View:
    """One frame's worth of reads (each a small query); with ``run_dir``, where the pool
    runs."""
    pool = "" if run_dir is None else pool_summary(
        run_dir, now.replace(tzinfo=UTC).timestamp())
    return View(
        pool=pool,
        read_at=now,
        counts=queue.counts_by_status(store),
        waiting=queue.pending_by_priority(store),
        workers=queue.list_workers(store),
        completed=queue.recently_finished(store, [TaskStatus.COMPLETED.value], RECENT_ROWS),
        failed=queue.recently_finished(store, [TaskStatus.FAILED.value], RECENT_ROWS),
        servers=queue.model_servers(store, now),
    )


# -- sections -----------------------------------------------------------------------------

def _age(then: datetime | None, now: datetime) -> str:
    if then is None:
        return NO_DATA
    seconds = max(0.0, (now - then).total_seconds())
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.0f}h"


def _preview(text: str | None) -> str:
    flat = " ".join((text or "").split())
    return flat if len(flat) <= PREVIEW_CHARS else flat[:PREVIEW_CHARS - 1] + "…"


def workers_section(view: View, lease_s: float) -> RenderableType:
    """One row per worker that has not gone offline. A worker silent for longer than a lease
    is shown as such: its tasks go back to the queue when the lease runs out."""
    busy = sum(1 for w in view.workers if w.status == "busy")
    table = Table(title=f"Workers: {len(view.workers)} ({busy} busy)", title_justify="left",
                  expand=True, box=box.SIMPLE_HEAD)
    for column in ("worker", "state", "task", "host", "pid", "done", "failed", "heartbeat"):
        table.add_column(column, no_wrap=column != "task")
    for w in view.workers:
        silent = (view.read_at - w.last_heartbeat).total_seconds() > lease_s
        state = Text("silent", style="red") if silent else Text(
            w.status, style="bold green" if w.status == "busy" else "dim")
        table.add_row(w.worker_id, state, w.current_task or NO_DATA, w.host or NO_DATA,
                      str(w.pid or NO_DATA), str(w.tasks_completed), str(w.tasks_failed),
                      _age(w.last_heartbeat, view.read_at))
    if not view.workers:
        table.add_row("no workers", "", "", "", "", "", "", "")
    return table


def queue_section(view: View) -> RenderableType:
    """Pending tasks by priority, highest first, and the totals of every status."""
    table = Table(title="Queue by priority", title_justify="left", box=box.SIMPLE_HEAD)
    table.add_column("priority", justify="right")
    table.add_column("waiting", justify="right")
    for priority, count in view.waiting.items():
        table.add_row(str(priority), str(count))
    if not view.waiting:
        table.add_row(NO_DATA, "0")
    totals = Text("  ".join(f"{status}: {count}" for status, count in view.counts.items()))
    return Group(table, totals)


def slots_section(servers: list[queue.ServerUse] | None = None) -> RenderableType:
    """Model-server slots per Ollama URL: in use, the limit (learned or pinned), the last time
    to first token. A dash until a worker has used a server."""
    table = Table(title="Model-server slots", title_justify="left", box=box.SIMPLE_HEAD)
    table.add_column("server")
    table.add_column("in use", justify="right")
    table.add_column("limit", justify="right")
    table.add_column("1st token", justify="right")
    for use in servers or []:
        cap = use.capacity
        limit = f"{cap.limit} {'pinned' if cap.pinned else 'learned'}"
        ttft = f"{cap.last_ttft_s:.2f}s" if cap.last_ttft_s is not None else NO_DATA
        table.add_row(cap.url, str(use.in_use), limit, ttft)
    if not servers:
        table.add_row(NO_DATA, NO_DATA, NO_DATA, NO_DATA)
    return table


def finished_section(title: str, tasks: list[TaskSnapshot], now: datetime, *,
                     failures: bool) -> RenderableType:
    table = Table(title=title, title_justify="left", expand=True, box=box.SIMPLE_HEAD)
    for column in ("task", "type", "finished", "took", "error" if failures else "result"):
        table.add_column(column, no_wrap=column != "result" and column != "error",
                         overflow="ellipsis")
    for t in tasks:
        took = (f"{elapsed_s(t.started_at, t.finished_at):.1f}s"
                if t.finished_at and t.started_at else NO_DATA)
        text = f"{t.error_kind or 'error'}: {t.error}" if failures else t.result
        table.add_row(t.task_id, t.type, _age(t.finished_at, now) + " ago", took,
                      Text(_preview(text), style="red" if failures else ""))
    if not tasks:
        table.add_row(NO_DATA, "", "", "", "")
    return table


def render(view: View | None, settings: Settings, error: str | None = None, *,
           hint: str = "(q or Ctrl-C to quit)") -> RenderableType:
    """The whole frame. ``error`` (the store could not be read) shows above the last view;
    ``hint`` says how to leave (or, on the status page, how often it refreshes)."""
    when = view.read_at.strftime("%H:%M:%S UTC") if view else NO_DATA
    header = Text.assemble((f"koubou-mcp {__version__} top", "bold"),
                           f"  {settings.home}  {when}  {hint}")
    parts: list[RenderableType] = [header]
    if view is not None and view.pool:
        parts.append(Text(view.pool))
    if error:
        parts.append(Text(f"cannot read the store: {error}", style="bold red"))
    if view is not None:
        side_by_side = Table.grid(padding=(0, 4))
        side_by_side.add_row(queue_section(view), slots_section(view.servers))
        parts += [workers_section(view, settings.lease_s), side_by_side,
                  finished_section("Recent results", view.completed, view.read_at,
                                   failures=False),
                  finished_section("Recent failures", view.failed, view.read_at, failures=True)]
    return Group(*parts)


# -- the live loop ------------------------------------------------------------------------

@contextlib.contextmanager
def _keys(stream: TextIO) -> Iterator[Callable[[float], str]]:
    """A function that waits up to its argument in seconds for a key and returns it ('' for
    none). The terminal is in cbreak mode meanwhile (keys arrive unbuffered, Ctrl-C still
    interrupts) and restored afterwards. Without a terminal it only waits."""
    if not stream.isatty():
        def wait(timeout_s: float) -> str:
            time.sleep(timeout_s)
            return ""

        yield wait
        return
    fd = stream.fileno()
    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd)

    def read_key(timeout_s: float) -> str:
        ready, _, _ = select.select([fd], [], [], timeout_s)
        return os.read(fd, 32).decode(errors="replace") if ready else ""

    try:
        yield read_key
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def run_top(settings: Settings, store: Store, *, interval_s: float = 1.0, once: bool = False,
            console: Console | None = None) -> int:
    """Draw the view until ``q`` or Ctrl-C (or once, with ``once``). Returns the exit code."""
    # Piped (not a terminal), nothing is cropped to a screen: wide enough for whole task ids.
    console = console or (Console() if sys.stdout.isatty() else Console(width=PIPED_WIDTH))

    def frame(last: View | None) -> tuple[View | None, RenderableType]:
        try:
            view = read_view(store, utcnow(), settings.run_dir)
        except SQLAlchemyError as exc:  # a locked or vanished database: say so, keep going
            return last, render(last, settings, str(exc).splitlines()[0])
        return view, render(view, settings)

    if once:
        console.print(frame(None)[1])
        return 0
    view: View | None = None
    try:
        with _keys(sys.stdin) as read_key, Live(console=console, screen=True,
                                                auto_refresh=False) as live:
            while True:
                view, shown = frame(view)
                live.update(shown, refresh=True)
                deadline = time.monotonic() + interval_s
                while (left := deadline - time.monotonic()) > 0:
                    if "q" in read_key(left).lower():
                        return 0
    except KeyboardInterrupt:
        return 0
