"""PostgreSQL transactions sent as a few messages (``queue.message``): what they write and
read is what the statements one at a time write and read, an error or a forgotten commit
changes nothing, and a connection whose prepared statements the driver dropped recovers."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import psycopg
import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import DataError, OperationalError

from koubou_mcp import queue
from koubou_mcp.admission import Observation
from koubou_mcp.config import Settings
from koubou_mcp.models import TaskStatus, utcnow
from koubou_mcp.queue import message
from koubou_mcp.queue.lifecycle import complete_call
from koubou_mcp.queue.prepared import prepared
from koubou_mcp.queue.statements import (
    SERVER_ROW_LOCKED,
    WORKER_BEAT,
    M,
    T,
    W,
    claim_statement,
)
from koubou_mcp.store import Store, is_store_fault, open_store
from tests.support.waiting import wait_until

URL = "http://model"

#: a result a model could write: quotes, backslashes, placeholders, a statement separator
HOSTILE = "it's \\'; DROP TABLE task_master; -- %s %(p_now)s $1 E'\\x41' ; 日本語\n\ttab"


@pytest.fixture
def pg(pg_url: str, settings: Settings) -> Iterator[Store]:
    store = open_store(pg_url, settings.run_dir)
    try:
        yield store
    finally:
        store.close()


def _claimed(store: Store, settings: Settings, worker: str = "w1") -> str:
    queue.register_worker(store, worker, 1, utcnow())
    queue.configure_model_server(store, URL, 2, utcnow())
    queue.enqueue(store, queue.validate_request(settings, "job"), settings, utcnow())
    admitted = queue.admit_next(store, worker, utcnow(), 30, URL)
    assert admitted is not None
    return admitted.task.task_id


def _status(store: Store, task_id: str) -> tuple[str, str | None]:
    with store.read() as conn:
        row = conn.execute(select(T.c.status, T.c.result).where(T.c.task_id == task_id)).one()
    return row.status, row.result


def test_two_messages_make_one_transaction_that_stores_a_hostile_result_verbatim(
        pg: Store, settings: Settings) -> None:
    task_id = _claimed(pg, settings)
    now = utcnow()
    statement, params = complete_call(task_id, "w1", HOSTILE, now, None)
    with pg.write() as conn, message.transaction(conn) as tx:
        done, server = tx.send([(prepared(statement, conn), params),
                                (prepared(SERVER_ROW_LOCKED, conn), {"p_url": URL})])
        assert done == [{"task_id": task_id}]
        assert server[0]["url"] == URL and server[0]["slot_limit"] == 2  # converted rows
        # not committed yet: another connection still sees the task running
        assert _status(pg, task_id) == (TaskStatus.IN_PROGRESS.value, None)
        (beat,) = tx.send([(prepared(WORKER_BEAT, conn), {"p_worker": "w1", "p_now": now})],
                          commit=True)
        assert beat == []  # a plain write has no rows
    assert _status(pg, task_id) == (TaskStatus.COMPLETED.value, HOSTILE)
    with pg.read() as conn:
        assert conn.execute(select(W.c.last_heartbeat).where(W.c.worker_id == "w1")
                            ).scalar_one() == now
        driver = conn.connection.dbapi_connection
        assert driver is not None and driver.autocommit is False  # given back as it was


def test_an_error_in_the_second_message_undoes_the_first(pg: Store, settings: Settings) -> None:
    task_id = _claimed(pg, settings)
    statement, params = complete_call(task_id, "w1", "done", utcnow(), None)
    broken = text("SELECT 1 / 0")
    with pytest.raises(Exception) as caught, pg.write() as conn, \
            message.transaction(conn) as tx:
        tx.send([(prepared(statement, conn), params)])
        tx.send([(prepared(broken, conn), {})], commit=True)
    assert "division by zero" in str(caught.value)
    assert not is_store_fault(caught.value)  # a bug in the statement, not the store failing
    assert _status(pg, task_id) == (TaskStatus.IN_PROGRESS.value, None)
    assert queue.complete(pg, task_id, "w1", "later", utcnow())  # the connection works on


def test_leaving_without_a_commit_raises_and_changes_nothing(
        pg: Store, settings: Settings) -> None:
    task_id = _claimed(pg, settings)
    statement, params = complete_call(task_id, "w1", "done", utcnow(), None)
    with pytest.raises(RuntimeError, match="without its commit"), pg.write() as conn, \
            message.transaction(conn) as tx:
        tx.send([(prepared(statement, conn), params)])
    assert _status(pg, task_id) == (TaskStatus.IN_PROGRESS.value, None)
    with pytest.raises(RuntimeError, match="no transaction open"), pg.write() as conn:
        conn.execute(text("SELECT 1"))  # the driver has begun a transaction of its own
        with message.transaction(conn):
            pass


def _forget_prepared_statements(store: Store) -> None:
    """What psycopg does when a transaction rolls back on a connection with statements it
    prepared itself: DEALLOCATE ALL, ours with its own."""
    with store.write() as conn:
        driver = conn.connection.dbapi_connection
        assert driver is not None
        driver.execute("DEALLOCATE ALL")


def test_a_connection_that_forgot_its_prepared_statements_prepares_them_again(
        pg: Store, settings: Settings) -> None:
    hot = pg.pinned()  # one connection, as a worker's
    try:
        first = _claimed(hot, settings)
        assert queue.complete_and_admit(hot, first, "w1", "one", utcnow(), None,
                                        model_url=URL).accepted
        _forget_prepared_statements(hot)
        second = _claimed(hot, settings)  # the claim's message fails, is prepared and re-sent
        assert queue.complete_and_admit(hot, second, "w1", "two", utcnow(), None,
                                        model_url=URL).accepted
        assert _status(hot, second) == (TaskStatus.COMPLETED.value, "two")
    finally:
        hot.close()


def test_statements_forgotten_mid_transaction_are_a_store_fault_and_change_nothing(
        pg: Store, settings: Settings) -> None:
    hot = pg.pinned()  # one connection, so that both statements are prepared on it
    try:
        task_id = _claimed(hot, settings)
        statement, params = complete_call(task_id, "w1", "done", utcnow(), None)
        with hot.write() as conn, message.transaction(conn) as tx:
            tx.send([(prepared(statement, conn), {**params, "p_task": "none"}),
                     (prepared(SERVER_ROW_LOCKED, conn), {"p_url": URL})], commit=True)
        with pytest.raises(OperationalError) as caught, hot.write() as conn, \
                message.transaction(conn) as tx:
            tx.send([(prepared(statement, conn), params)])
            driver = conn.connection.dbapi_connection
            assert driver is not None
            driver.execute("DEALLOCATE ALL")  # inside the transaction, after its first message
            tx.send([(prepared(SERVER_ROW_LOCKED, conn), {"p_url": URL})], commit=True)
        assert is_store_fault(caught.value)  # the worker waits and runs the hand-over again
        assert "try again" in str(caught.value)
        assert _status(hot, task_id) == (TaskStatus.IN_PROGRESS.value, None)
        assert queue.complete(hot, task_id, "w1", "again", utcnow())  # prepared once more
        assert _status(hot, task_id) == (TaskStatus.COMPLETED.value, "again")
    finally:
        hot.close()


def test_only_postgresql_and_good_values_get_through(pg: Store, settings: Settings) -> None:
    sqlite = open_store(settings.database_url, settings.run_dir)
    try:
        with sqlite.write() as conn, pytest.raises(RuntimeError, match="PostgreSQL"), \
                message.transaction(conn):
            pass
    finally:
        sqlite.close()
    queue.enqueue(pg, queue.validate_request(settings, "job"), settings, utcnow())
    with pytest.raises(DataError) as caught, pg.write() as conn, \
            message.transaction(conn) as tx:
        tx.send([(prepared(claim_statement(True), conn),
                  {"p_worker": "w", "p_now": "not a time", "p_url": URL,
                   "p_lease": utcnow()})], commit=True)
    assert "timestamp" in str(caught.value) and not is_store_fault(caught.value)
    assert queue.counts_by_status(pg)[TaskStatus.PENDING] == 1  # not claimed


def test_a_heartbeat_takes_the_task_row_before_the_worker_row(
        pg: Store, settings: Settings) -> None:
    """The hand-over locks its task's row, then its worker's; a heartbeat that took them the
    other way round deadlocked with it (PostgreSQL broke the tie after a second)."""
    task_id = _claimed(pg, settings)
    plain = pg.url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(plain) as holder, psycopg.connect(plain, autocommit=True) as probe:
        holder.execute("SELECT 1 FROM task_master WHERE task_id = %s FOR UPDATE", (task_id,))
        beat = threading.Thread(target=queue.heartbeat,
                                args=(pg, "w1", task_id, utcnow(), 300.0), daemon=True)
        beat.start()
        wait_until(lambda: probe.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
            "AND query LIKE %s", ("%task_master%",)).fetchone()[0] == 1,  # type: ignore[index]
            timeout=10, message="the heartbeat waiting for the task's row")
        # waiting for the task's row, the heartbeat holds no lock on the worker's row
        probe.execute("BEGIN")
        probe.execute("SELECT 1 FROM workers WHERE worker_id = 'w1' FOR UPDATE NOWAIT")
        probe.execute("ROLLBACK")
        holder.rollback()
        beat.join(timeout=10)
        assert not beat.is_alive()
    with pg.read() as conn:
        lease = conn.execute(select(T.c.lease_expires_at).where(T.c.task_id == task_id)
                             ).scalar_one()
    assert lease > utcnow() + timedelta(seconds=200)  # the claim's lease was 30 s


def _between_the_hand_over_messages(monkeypatch: pytest.MonkeyPatch, then: Any) -> list[bool]:
    """Run ``then()`` after a transaction's first message, before its second; the list
    records that it ran."""
    ran: list[bool] = []
    send = message.Messages.send

    def first_then_hook(self: message.Messages, calls: Any, **kwargs: Any) -> Any:
        rows = send(self, calls, **kwargs)
        if not kwargs.get("commit") and not ran:
            then()
            ran.append(True)
        return rows

    monkeypatch.setattr(message.Messages, "send", first_then_hook)
    return ran


def _server_row(store: Store) -> Any:
    with store.read() as conn:
        return conn.execute(select(M).where(M.c.url == URL)).one()


@pytest.mark.parametrize("claims", [False, True], ids=["idle-after", "claiming-next"])
def test_a_hand_over_leaves_the_server_row_unlocked_between_its_messages(
        pg: Store, settings: Settings, monkeypatch: pytest.MonkeyPatch, claims: bool) -> None:
    """Locked in the first message, the row stayed locked while the worker was away between
    them (descheduled, with more workers than cores), and every admission to that server
    queued behind it."""
    task_id = _claimed(pg, settings)
    queue.enqueue(pg, queue.validate_request(settings, "next"), settings, utcnow())
    plain = pg.url.replace("postgresql+psycopg://", "postgresql://")

    def lock_it_elsewhere() -> None:
        with psycopg.connect(plain) as other:
            other.execute("SELECT 1 FROM model_servers WHERE url = %s FOR UPDATE NOWAIT",
                          (URL,))  # raises LockNotAvailable while the hand-over holds it
    ran = _between_the_hand_over_messages(monkeypatch, lock_it_elsewhere)
    handed = queue.complete_and_admit(
        pg, task_id, "w1", "done", utcnow(), None, model_url=URL,
        observations=[Observation(concurrency=1, first_token_s=0.5, busy=True)],
        claim=queue.NextClaim(30.0, URL) if claims else None)
    assert ran == [True] and handed.accepted
    assert (handed.next is not None) == claims
    assert _server_row(pg).busy_events == 1  # the observation was written


def test_a_hand_over_racing_another_write_to_the_server_row_keeps_both(
        pg: Store, settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    task_id = _claimed(pg, settings)
    queue.enqueue(pg, queue.validate_request(settings, "next"), settings, utcnow())
    plain = pg.url.replace("postgresql+psycopg://", "postgresql://")

    def write_it_elsewhere() -> None:  # as another worker's hand-over would, committed
        with psycopg.connect(plain) as other:
            other.execute("SET lock_timeout = '5s'")
            other.execute("UPDATE model_servers SET busy_events = busy_events + 10, "
                          "baseline_ttft_s = 9.0, updated_at = now() WHERE url = %s", (URL,))
    ran = _between_the_hand_over_messages(monkeypatch, write_it_elsewhere)
    handed = queue.complete_and_admit(
        pg, task_id, "w1", "done", utcnow(), None, model_url=URL,
        observations=[Observation(concurrency=1, first_token_s=0.5, busy=True)],
        claim=queue.NextClaim(30.0, URL))
    assert ran == [True] and handed.accepted and handed.next is not None
    row = _server_row(pg)
    assert row.busy_events == 11  # the other write and this observation, neither lost
    assert row.baseline_ttft_s == 9.0 and row.last_ttft_s == 0.5
    # the claimed task knows the server as it is now, with both
    assert handed.next.capacity is not None and handed.next.capacity.busy_events == 11
    assert _status(pg, task_id) == (TaskStatus.COMPLETED.value, "done")


def _hand_over_while_the_server_row_is_locked(pg: Store, task_id: str) -> tuple[
        threading.Thread, dict[str, Any], psycopg.Connection[Any]]:
    """Start a claiming hand-over of ``task_id`` in a thread while another connection holds
    the server's row lock (the caller releases it with ``holder.rollback()``)."""
    plain = pg.url.replace("postgresql+psycopg://", "postgresql://")
    holder = psycopg.connect(plain)
    holder.execute("SELECT 1 FROM model_servers WHERE url = %s FOR UPDATE", (URL,))
    out: dict[str, Any] = {}

    def hand_over() -> None:
        out["handed"] = queue.complete_and_admit(pg, task_id, "w1", "done", utcnow(), None,
                                                 model_url=URL, claim=queue.NextClaim(30, URL))
    thread = threading.Thread(target=hand_over, daemon=True)
    thread.start()
    return thread, out, holder


def test_a_hand_over_keeping_its_slot_does_not_wait_for_the_server_row(
        pg: Store, settings: Settings) -> None:
    task_id = _claimed(pg, settings)
    queue.enqueue(pg, queue.validate_request(settings, "next"), settings, utcnow())
    thread, out, holder = _hand_over_while_the_server_row_is_locked(pg, task_id)
    try:
        thread.join(timeout=10)  # done while the row is still locked elsewhere
        assert not thread.is_alive()
    finally:
        holder.rollback()
        holder.close()
        thread.join(timeout=10)
    assert out["handed"].accepted and out["handed"].next is not None


def test_a_hand_over_whose_lease_is_running_out_takes_a_slot_as_a_new_claim_does(
        pg: Store, settings: Settings) -> None:
    """By other workers' clocks, a lease about to run out stops holding its slot: a claim
    after it is a new admission, in turn on the server's row lock."""
    task_id = _claimed(pg, settings)
    queue.enqueue(pg, queue.validate_request(settings, "next"), settings, utcnow())
    with pg.write() as conn:
        conn.execute(T.update().where(T.c.task_id == task_id).values(
            lease_expires_at=utcnow() + timedelta(seconds=5)))  # of a 30 s lease
    thread, out, holder = _hand_over_while_the_server_row_is_locked(pg, task_id)
    plain = pg.url.replace("postgresql+psycopg://", "postgresql://")
    try:
        with psycopg.connect(plain, autocommit=True) as probe:
            wait_until(lambda: probe.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                "AND query LIKE %s", ("%EXECUTE%",)).fetchone()[0] == 1,  # type: ignore[index]
                timeout=10, message="the hand-over waiting for the server's row")
        assert thread.is_alive() and "handed" not in out
    finally:
        holder.rollback()
        holder.close()
        thread.join(timeout=10)
    assert out["handed"].accepted and out["handed"].next is not None
