"""The hot path's prepared statements read and write exactly what SQLAlchemy does, on both
stores, and fail with SQLAlchemy's errors."""

from __future__ import annotations

import sqlite3
from datetime import timedelta

import psycopg
import pytest
from sqlalchemy import select, update
from sqlalchemy.exc import OperationalError

from koubou_mcp import queue
from koubou_mcp.config import Settings
from koubou_mcp.models import FINAL_STATUSES, TaskStatus, utcnow
from koubou_mcp.queue.prepared import prepared, returns_rows
from koubou_mcp.queue.statements import (
    ANY_READY,
    IN_FLIGHT,
    INSERT_TASK,
    LOOK_BEFORE_CLAIM,
    WORKER_BEAT,
    T,
    claim_statement,
)
from koubou_mcp.store import Store, is_store_fault, open_store


def test_a_claim_returns_the_row_sqlalchemy_reads_back(store: Store, settings: Settings) -> None:
    now = utcnow().replace(microsecond=123456)
    queue.enqueue(store, queue.validate_request(settings, "first", priority=3), settings, now)
    params = {"p_worker": "w1", "p_now": now, "p_url": "http://m",
              "p_lease": now + timedelta(seconds=30)}
    with store.write() as conn:
        claimed = prepared(claim_statement(store.is_postgres), conn).first(conn, params)
    assert claimed is not None
    with store.read() as conn:
        stored = dict(conn.execute(select(T).where(T.c.task_id == claimed["task_id"]))
                      .one()._mapping)
    assert claimed == stored  # every column, with SQLAlchemy's types (datetimes, booleans)
    assert claimed["started_at"] == now and claimed["cancel_requested"] is False
    assert claimed["status"] == TaskStatus.IN_PROGRESS.value and claimed["attempts"] == 1
    with store.read() as conn:
        assert prepared(IN_FLIGHT, conn).scalar(conn, {"p_url": "http://m", "p_now": now}) == 1
        assert prepared(ANY_READY, conn).execute(conn, {"p_now": now}) == []


@pytest.mark.parametrize("sql", [
    "SELECT 1 AS one",  # a row
    "SELECT 1 AS one WHERE 1 = 0",  # no rows, but a result with columns
    "UPDATE workers SET status = status",  # a write: no result
    "UPDATE workers SET status = status RETURNING worker_id",  # no rows, with columns
    "INSERT INTO koubou_meta (key, value) VALUES ('probe', 'x') RETURNING key",  # a row written
    "DELETE FROM koubou_meta WHERE key = 'probe'",
])
def test_returns_rows_says_what_the_drivers_description_says(store: Store, sql: str) -> None:
    # the hot path reads psycopg's result status instead of its costly ``description``
    with store.write() as conn:
        dbapi = conn.connection.dbapi_connection
        assert dbapi is not None
        cursor = dbapi.cursor()
        cursor.execute(sql)
        assert returns_rows(cursor) is (cursor.description is not None)
        cursor.close()


def test_returns_rows_follows_each_result_of_a_message_of_several(pg_url: str) -> None:
    with psycopg.connect(pg_url.replace("+psycopg", ""), autocommit=True) as conn:
        cursor = psycopg.ClientCursor(conn)
        cursor.execute("BEGIN; SELECT 1 AS a; SET LOCAL work_mem = '8MB'; "
                       "SELECT 1 AS b WHERE false; COMMIT")
        seen = []
        while True:
            seen.append((returns_rows(cursor), cursor.description is not None))
            if not cursor.nextset():
                break
        assert seen == [(False, False), (True, True), (False, False), (True, True),
                        (False, False)]


def test_a_constant_list_is_expanded_into_parameters(store: Store, settings: Settings) -> None:
    now = utcnow()
    task = queue.enqueue(store, queue.validate_request(settings, "x"), settings, now).task
    unfinished = (update(T).where(T.c.task_id == queue.statements.TASK,
                                  T.c.status.not_in([s.value for s in FINAL_STATUSES]))
                  .values(priority=9).returning(T.c.priority))
    with store.write() as conn:
        assert prepared(unfinished, conn).first(conn, {"p_task": task.task_id}) == {"priority": 9}
    queue.cancel(store, task.task_id, now)
    with store.write() as conn:
        assert prepared(unfinished, conn).first(conn, {"p_task": task.task_id}) is None


def test_an_insert_leaves_out_no_column_default(store: Store, settings: Settings) -> None:
    now = utcnow()
    values = {"task_id": "task_prepared_1", "type": "general", "prompt": "p",
              "created_at": now, "updated_at": now, "timeout_s": 5.0}
    with store.write() as conn:
        row = prepared(INSERT_TASK, conn, column_keys=tuple(values)).first(conn, values)
    assert row is not None
    assert row["status"] == TaskStatus.PENDING.value  # the column's own default
    assert row["priority"] == 5 and row["attempts"] == 0 and row["timeout_s"] == 5.0
    assert queue.get_task(store, "task_prepared_1").created_at == now


def test_a_locked_database_fails_as_a_store_fault_sqlalchemy_would_raise(
    settings: Settings,
) -> None:
    store = open_store(settings.database_url, settings.run_dir, busy_timeout_s=0.05)
    holder = sqlite3.connect(settings.home / "db" / "koubou.db", isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")  # holds the write lock
        # a write in a deferred transaction needs the lock the holder has
        with pytest.raises(OperationalError) as caught, store.read() as conn:
            prepared(WORKER_BEAT, conn).execute(conn, {"p_worker": "w", "p_now": utcnow()})
        assert is_store_fault(caught.value)
        assert "locked" in str(caught.value)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
        store.close()


def test_a_connection_the_server_killed_is_invalidated_and_the_next_transaction_works(
    pg_url: str, settings: Settings,
) -> None:
    store = open_store(pg_url, settings.run_dir)
    try:
        with pytest.raises(OperationalError) as caught, store.write() as conn:
            backend_pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar()
            with store.write() as other:  # another connection of the pool ends this one
                other.exec_driver_sql(f"SELECT pg_terminate_backend({backend_pid})")
            prepared(ANY_READY, conn).execute(conn, {"p_now": utcnow()})
        assert caught.value.connection_invalidated
        assert is_store_fault(caught.value)
        with store.read() as conn:  # a new connection takes the dead one's place
            assert prepared(ANY_READY, conn).execute(conn, {"p_now": utcnow()}) == []
    finally:
        store.close()


def test_a_pinned_store_keeps_one_connection_and_replaces_a_killed_one(
    pg_url: str, settings: Settings,
) -> None:
    base = open_store(pg_url, settings.run_dir)
    hot = base.pinned()
    try:
        pids = set()
        for _ in range(3):
            with hot.write() as conn:
                pids.add(conn.exec_driver_sql("SELECT pg_backend_pid()").scalar())
            with hot.read() as conn:
                pids.add(conn.exec_driver_sql("SELECT pg_backend_pid()").scalar())
        assert len(pids) == 1, "every transaction ran on the one kept connection"
        with base.write() as other:
            other.exec_driver_sql(f"SELECT pg_terminate_backend({pids.pop()})")
        with pytest.raises(OperationalError) as caught, hot.read() as conn:
            prepared(ANY_READY, conn).execute(conn, {"p_now": utcnow()})
        assert is_store_fault(caught.value)  # the worker waits it out and tries again
        with hot.write() as conn:  # ... and the next transaction has a new connection
            assert prepared(ANY_READY, conn).execute(conn, {"p_now": utcnow()}) == []
    finally:
        hot.close()
        base.close()


def test_a_pinned_store_writes_with_the_write_lock_and_reads_without(settings: Settings) -> None:
    base = open_store(settings.database_url, settings.run_dir)
    hot = base.pinned()
    try:
        with hot.write() as conn:
            assert conn.connection.dbapi_connection.in_transaction
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 5000
        # a read on the same connection does not take the write lock: a writer gets in
        with hot.read() as conn, base.write() as writer:
            writer.exec_driver_sql("UPDATE koubou_meta SET value = value")
            conn.exec_driver_sql("SELECT 1")
    finally:
        hot.close()
        base.close()


def test_a_pooled_connection_lost_while_idle_is_replaced_before_use(
    pg_url: str, settings: Settings, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from koubou_mcp import store as store_module

    store = open_store(pg_url, settings.run_dir)
    try:
        import psycopg

        with store.read() as conn:
            pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar()
        admin = pg_url.split("?")[0].replace("postgresql+psycopg://", "postgresql://")
        with psycopg.connect(admin, autocommit=True) as other:  # outside the pool
            other.execute("SELECT pg_terminate_backend(%s)", (pid,))
        monkeypatch.setattr(store_module, "PING_AFTER_IDLE_S", 0.0)  # "idle long enough"
        for _ in range(2):  # whichever pooled connection comes first, none fails
            with store.read() as conn:
                assert conn.exec_driver_sql("SELECT 1").scalar() == 1
    finally:
        store.close()


def test_a_driver_transaction_commits_or_leaves_nothing(store: Store, settings: Settings) -> None:
    now = utcnow()
    values = {"task_id": "task_driver_1", "type": "general", "prompt": "p",
              "created_at": now, "updated_at": now, "timeout_s": 5.0}
    with pytest.raises(RuntimeError, match="changed my mind"), store.write_on_driver() as tx:
        prepared(INSERT_TASK, tx, column_keys=tuple(values)).first(tx, values)
        raise RuntimeError("changed my mind")
    with pytest.raises(LookupError):
        queue.get_task(store, "task_driver_1")
    with store.write_on_driver() as tx:
        prepared(INSERT_TASK, tx, column_keys=tuple(values)).first(tx, values)
    assert queue.get_task(store, "task_driver_1").created_at == now


def test_a_driver_transaction_waits_for_the_write_lock_then_fails_as_a_store_fault(
    settings: Settings,
) -> None:
    store = open_store(settings.database_url, settings.run_dir, busy_timeout_s=0.05)
    holder = sqlite3.connect(settings.home / "db" / "koubou.db", isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        with pytest.raises(OperationalError) as caught:
            queue.enqueue(store, queue.validate_request(settings, "x"), settings, utcnow())
        assert is_store_fault(caught.value) and "locked" in str(caught.value)
        holder.execute("ROLLBACK")
        assert queue.list_tasks(store) == []  # nothing stored
        queue.enqueue(store, queue.validate_request(settings, "y"), settings, utcnow())
        assert [t.prompt for t in queue.list_tasks(store)] == ["y"]
    finally:
        holder.close()
        store.close()


def test_a_driver_transaction_whose_connection_was_killed_is_invalidated(
    pg_url: str, settings: Settings,
) -> None:
    store = open_store(pg_url, settings.run_dir)
    try:
        with pytest.raises(OperationalError) as caught, store.write_on_driver() as tx:
            with tx.connection.dbapi_connection.cursor() as cursor:
                cursor.execute("SELECT pg_backend_pid()")
                backend_pid = cursor.fetchone()[0]
            with store.write() as other:
                other.exec_driver_sql(f"SELECT pg_terminate_backend({backend_pid})")
            prepared(ANY_READY, tx).execute(tx, {"p_now": utcnow()})
        assert caught.value.connection_invalidated and tx.invalidated
        assert is_store_fault(caught.value)
        for _ in range(6):  # every connection the pool hands out now works
            queue.enqueue(store, queue.validate_request(settings, "after"), settings, utcnow())
        assert len(queue.list_tasks(store)) == 6
    finally:
        store.close()


def test_a_look_on_its_own_opens_no_transaction_on_postgresql_and_joins_a_begun_one(
    pg_url: str, settings: Settings,
) -> None:
    store = open_store(pg_url, settings.run_dir)
    now = utcnow()
    idle = psycopg.pq.TransactionStatus.IDLE
    try:
        with store.read() as conn:
            look = prepared(LOOK_BEFORE_CLAIM, conn)
            assert look.first_on_its_own(conn, {"p_now": now, "p_url": "http://m"}) == {
                "ready": False, "in_flight": 0, "slot_limit": None}
            driver = conn.connection.dbapi_connection
            # ran in autocommit: no transaction is left open for a COMMIT to end, and the
            # connection is back to transactions for the next statement
            assert driver.pgconn.transaction_status == idle and driver.autocommit is False
            prepared(ANY_READY, conn).execute(conn, {"p_now": now})
            assert driver.pgconn.transaction_status != idle
        queue.configure_model_server(store, "http://m", 3, now)
        with store.write() as conn:
            prepared(INSERT_TASK, conn, column_keys=("task_id", "type", "prompt", "status",
                                                      "priority", "attempts", "max_attempts",
                                                      "timeout_s", "cancel_requested",
                                                      "created_at", "updated_at")).execute(
                conn, {"task_id": "t-look", "type": "general", "prompt": "p",
                       "status": TaskStatus.PENDING.value, "priority": 0, "attempts": 0,
                       "max_attempts": 3, "timeout_s": 60.0, "cancel_requested": False,
                       "created_at": now, "updated_at": now})
            # inside a begun transaction it is an ordinary statement of it: it sees the
            # task this transaction inserted and has not committed
            assert look.first_on_its_own(conn, {"p_now": now, "p_url": "http://m"}) == {
                "ready": True, "in_flight": 0, "slot_limit": 3}
    finally:
        store.close()
