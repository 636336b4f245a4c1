"""Prometheus metrics for ``GET /metrics``, read from the task store at scrape time.

Nothing is counted as it happens: a scrape reads the store, so the numbers describe every
process sharing it (servers, pools and workers on any machine), and a restarted server loses
nothing. The exceptions are the pool's scaling counters, which only the supervisor knows:
they come from the supervisor this process runs (zero when it runs none or stands by).

Histograms and error counts are cumulative, as Prometheus wants: a scrape reads only the tasks
that finished since the previous one (plus a margin, so that a task committed late is still
counted once) and adds them to running totals kept here. The first scrape reads every finished
task once.

Metrics (``type`` is general/code; ``status`` a task status):

========================================  =========  ======================================
koubou_tasks{status}                      gauge      tasks in the store, by status
koubou_queue_depth                        gauge      pending tasks
koubou_queue_ready                        gauge      pending tasks claimable now
koubou_workers{status,host}               gauge      workers not offline, by status and host
koubou_task_duration_seconds{type,status} histogram  run time of finished tasks' last attempt
koubou_task_wait_seconds{type}            histogram  submission to start of the last attempt
koubou_task_errors_total{type,kind}       counter    tasks that ended failed, by error kind
koubou_tasks_retrying{kind}               gauge      pending tasks waiting to retry an error
koubou_model_slots_in_use{server}         gauge      requests the pool has on a model server
koubou_model_slot_limit{server}           gauge      its slot limit (learned or pinned)
koubou_model_slot_limit_pinned{server}    gauge      1 when KOUBOU_OLLAMA_PARALLEL pins it
koubou_model_first_token_seconds{server}  gauge      last time to first token measured there
koubou_model_busy_total{server}           counter    HTTP 503 "busy" answers it gave
koubou_pool_scale_events_total{direction} counter    decisions that started/retired workers
koubou_pool_workers_started_total         counter    workers this process's pool started
koubou_pool_workers_retired_total         counter    idle workers it retired
koubou_pool_leader                        gauge      1 when this process supervises the pool
koubou_store_up                           gauge      1 when the store answered this scrape
koubou_build_info{version}                gauge      always 1
========================================  =========  ======================================
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.utils import floatToGoString
from sqlalchemy.exc import SQLAlchemyError

from koubou_mcp import __version__, queue
from koubou_mcp.config import Settings
from koubou_mcp.models import TaskStatus, WorkerStatus, elapsed_s, utcnow
from koubou_mcp.store import Store

log = logging.getLogger("koubou_mcp.metrics")

#: Upper bounds of the run-time buckets, s: local models take seconds to minutes
DURATION_BUCKETS_S = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
                      1800.0, 3600.0)
#: Upper bounds of the queue-wait buckets, s: from an idle worker's milliseconds to a backlog
WAIT_BUCKETS_S = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0,
                  3600.0)
#: Finished tasks are read again for this long behind the newest one seen (or behind the
#: scrape's own clock, when a host's clock runs ahead), so that one whose transaction committed
#: late (or whose worker's clock is behind) is still counted, once, s
LATE_MARGIN_S = 120.0
#: Worker states shown even when no worker is in them (so the series do not come and go)
WORKER_STATES = (WorkerStatus.STARTING.value, WorkerStatus.IDLE.value, WorkerStatus.BUSY.value,
                 WorkerStatus.STOPPING.value)


# -- running totals -------------------------------------------------------------------------

@dataclass
class Histogram:
    """Observations in fixed buckets: per-bucket counts (the last is +Inf) and their sum."""

    bounds: Sequence[float]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        index = next((i for i, bound in enumerate(self.bounds) if value <= bound),
                     len(self.bounds))
        self.counts[index] += 1
        self.total += value

    def buckets(self) -> list[tuple[str, float]]:
        """Cumulative ``(le, count)`` pairs, ending with ``+Inf``, as Prometheus reads them."""
        out, running = [], 0
        labels = [floatToGoString(bound) for bound in self.bounds] + ["+Inf"]
        for label, count in zip(labels, self.counts, strict=True):
            running += count
            out.append((label, float(running)))
        return out


class FinishedTally:
    """Cumulative totals over finished tasks, fed with what each scrape reads.

    Remembers the ids it counted within ``margin_s`` of the newest finish it saw: reading
    from there again counts a late-committed task once and never counts one twice.

    The stamps come from several hosts' clocks. One host whose clock runs ahead must not drag
    the next read's start into the future: every task finished meanwhile by the hosts with
    the right time would be left out (until that future came). So the newest finish counts
    at most as ``now``, the reader's clock when it passes one; a task stamped later than that
    is read again at every scrape until the horizon passes its stamp, and counted once (its id
    is remembered as long). Run and wait times never count below zero (``elapsed_s``).
    """

    def __init__(self, margin_s: float = LATE_MARGIN_S) -> None:
        self.margin = timedelta(seconds=margin_s)
        self.durations: dict[tuple[str, str], Histogram] = {}
        self.waits: dict[str, Histogram] = {}
        self.errors: dict[tuple[str, str], int] = {}
        self._seen: dict[str, datetime] = {}
        self._newest: datetime | None = None

    @property
    def since(self) -> datetime | None:
        """Where the next read starts (None: from the beginning)."""
        return None if self._newest is None else self._newest - self.margin

    def add(self, tasks: Iterable[queue.FinishedTask], now: datetime | None = None) -> int:
        """Count the tasks not counted yet; return how many were new. ``now``: the reader's
        clock, beyond which a stamp does not move where the next read starts."""
        added = 0
        for task in tasks:
            if task.task_id in self._seen:
                continue
            self._seen[task.task_id] = task.finished_at
            self._observe(task)
            added += 1
            finished = task.finished_at if now is None else min(task.finished_at, now)
            if self._newest is None or finished > self._newest:
                self._newest = finished
        horizon = self.since
        if horizon is not None:
            self._seen = {k: at for k, at in self._seen.items() if at >= horizon}
        return added

    def _observe(self, task: queue.FinishedTask) -> None:
        if task.started_at is not None:  # it ran (a task cancelled while pending did not)
            run_s = elapsed_s(task.started_at, task.finished_at)
            self.durations.setdefault((task.type, task.status),
                                      Histogram(DURATION_BUCKETS_S)).observe(run_s)
            wait_s = elapsed_s(task.created_at, task.started_at)
            self.waits.setdefault(task.type, Histogram(WAIT_BUCKETS_S)).observe(wait_s)
        if task.status == TaskStatus.FAILED.value:
            key = (task.type, task.error_kind or "unknown")
            self.errors[key] = self.errors.get(key, 0) + 1


# -- the collector --------------------------------------------------------------------------

class StoreCollector:
    """A prometheus_client collector that reads the store (and the pool's counters) on every
    scrape. ``store`` and ``pool`` are read at scrape time: the server opens the store after
    the collector is made, and may run no pool."""

    def __init__(self, settings: Settings, store: Callable[[], Store | None],
                 pool: Callable[[], Mapping[str, Any] | None],
                 clock: Callable[[], datetime] = utcnow) -> None:
        self.settings = settings
        self._store = store
        self._pool = pool
        self._clock = clock
        self._tally = FinishedTally()
        self._lock = threading.Lock()  # scrapes may overlap; the tally is not thread-safe

    def describe(self) -> list[Metric]:
        return []  # names are fixed and ours alone: skip the registry's duplicate check

    def collect(self) -> list[Metric]:
        with self._lock:
            return [*self._store_metrics(), *self._pool_metrics(), self._info()]

    def _store_metrics(self) -> list[Metric]:
        up = GaugeMetricFamily("koubou_store_up", "1 when the task store answered this scrape")
        store = self._store()
        out: list[Metric] = [up]
        try:
            if store is None:
                raise LookupError("the task store is not open")
            now = self._clock()
            counts = queue.counts_by_status(store)
            ready = queue.ready_pending_count(store, now)
            workers = queue.list_workers(store)
            retrying = queue.retrying_by_kind(store)
            servers = queue.model_servers(store, now)
            self._tally.add(queue.finished_since(store, self._tally.since), now)
        except (SQLAlchemyError, LookupError) as exc:
            log.warning("metrics: cannot read the store: %s", str(exc).splitlines()[0])
            up.add_metric([], 0)
            out.extend(self._tally_metrics())  # cumulative: still valid
            return out
        up.add_metric([], 1)

        tasks = GaugeMetricFamily("koubou_tasks", "Tasks in the store, by status",
                                  labels=["status"])
        for status, n in counts.items():
            tasks.add_metric([status], n)
        depth = GaugeMetricFamily("koubou_queue_depth", "Pending tasks (the queue depth)")
        depth.add_metric([], counts.get(TaskStatus.PENDING.value, 0))
        ready_gauge = GaugeMetricFamily(
            "koubou_queue_ready", "Pending tasks a worker could claim now (not waiting out a "
                                  "retry backoff)")
        ready_gauge.add_metric([], ready)

        by_host: dict[str, dict[str, int]] = {self.settings.hostname: {}}
        for w in workers:
            states = by_host.setdefault(w.host, {})
            states[w.status] = states.get(w.status, 0) + 1
        worker_gauge = GaugeMetricFamily("koubou_workers", "Workers not offline, by status and "
                                         "host (rows in the workers table)",
                                         labels=["status", "host"])
        for host, states in sorted(by_host.items()):
            for status in sorted({*WORKER_STATES, *states}):
                worker_gauge.add_metric([status, host], states.get(status, 0))

        retry_gauge = GaugeMetricFamily(
            "koubou_tasks_retrying", "Pending tasks whose last attempt failed and that wait to "
                                     "be retried, by error kind", labels=["kind"])
        for kind, n in sorted(retrying.items()):
            retry_gauge.add_metric([kind], n)
        out += [tasks, depth, ready_gauge, worker_gauge, retry_gauge, *_server_metrics(servers),
                *self._tally_metrics()]
        return out

    def _tally_metrics(self) -> list[Metric]:
        durations = HistogramMetricFamily(
            "koubou_task_duration_seconds", "Run time of the last attempt of finished tasks, "
                                            "by type and final status", labels=["type", "status"])
        for (task_type, status), h in sorted(self._tally.durations.items()):
            durations.add_metric([task_type, status], h.buckets(), h.total)
        waits = HistogramMetricFamily(
            "koubou_task_wait_seconds", "Time from submission to the start of the last attempt, "
                                        "of finished tasks that ran, by type", labels=["type"])
        for task_type, h in sorted(self._tally.waits.items()):
            waits.add_metric([task_type], h.buckets(), h.total)
        errors = CounterMetricFamily(
            "koubou_task_errors", "Tasks that ended failed, by type and the kind of their last "
                                  "error (timeout, busy, unreachable, worker_lost, ...)",
            labels=["type", "kind"])
        for (task_type, kind), n in sorted(self._tally.errors.items()):
            errors.add_metric([task_type, kind], n)
        return [durations, waits, errors]

    def _pool_metrics(self) -> list[Metric]:
        health = self._pool() or {}
        scaling = health.get("scaling") or {}
        leader = GaugeMetricFamily("koubou_pool_leader", "1 when this process supervises the "
                                                         "worker pool")
        leader.add_metric([], 1 if health.get("leader") else 0)
        events = CounterMetricFamily(
            "koubou_pool_scale_events", "Scaling decisions of this process's supervisor that "
                                        "started (up) or retired (down) workers",
            labels=["direction"])
        events.add_metric(["up"], scaling.get("up_events", 0))
        events.add_metric(["down"], scaling.get("down_events", 0))
        started = CounterMetricFamily("koubou_pool_workers_started",
                                      "Workers this process's supervisor started")
        started.add_metric([], scaling.get("workers_started", 0))
        retired = CounterMetricFamily("koubou_pool_workers_retired",
                                      "Idle workers this process's supervisor retired")
        retired.add_metric([], scaling.get("workers_retired", 0))
        return [leader, events, started, retired]

    def _info(self) -> Metric:
        info = InfoMetricFamily("koubou_build", "The koubou-mcp version")
        info.add_metric([], {"version": __version__})
        return info


def _server_metrics(servers: Sequence[queue.ServerUse]) -> list[Metric]:
    """Each model server's slots: in use, the limit, how it was set, its first-token time."""
    labels = ["server"]
    in_use = GaugeMetricFamily("koubou_model_slots_in_use", "Requests the pool has in flight "
                               "on a model server (slots held)", labels=labels)
    limit = GaugeMetricFamily("koubou_model_slot_limit", "Generations the pool lets a model "
                              "server run at once (learned or pinned)", labels=labels)
    pinned = GaugeMetricFamily("koubou_model_slot_limit_pinned", "1 when the slot limit is "
                               "pinned by KOUBOU_OLLAMA_PARALLEL", labels=labels)
    ttft = GaugeMetricFamily("koubou_model_first_token_seconds", "Last time to first token "
                             "measured on a model server", labels=labels)
    busy = CounterMetricFamily("koubou_model_busy", "HTTP 503 busy answers from a model "
                               "server", labels=labels)
    for use in servers:
        cap, key = use.capacity, [use.capacity.url]
        in_use.add_metric(key, use.in_use)
        limit.add_metric(key, cap.limit)
        pinned.add_metric(key, 1 if cap.pinned else 0)
        if cap.last_ttft_s is not None:
            ttft.add_metric(key, cap.last_ttft_s)
        busy.add_metric(key, cap.busy_events)
    return [in_use, limit, pinned, ttft, busy]


def build_registry(collector: StoreCollector) -> CollectorRegistry:
    """A registry of our own (not the process-wide default): the store collector and the
    standard process metrics (CPU, memory, open files)."""
    registry = CollectorRegistry()
    registry.register(collector)
    ProcessCollector(registry=registry)
    return registry


def render(registry: CollectorRegistry, accept: str | None) -> tuple[bytes, str]:
    """The exposition the client asked for (Prometheus text, or OpenMetrics) and its
    content type."""
    encoder, content_type = choose_encoder(accept or "")
    return encoder(registry), content_type


__all__ = ["StoreCollector", "FinishedTally", "Histogram", "build_registry", "render"]
