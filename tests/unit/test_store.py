"""Opening the store: file permissions, WAL, the seed's SQL, and clear errors on storage faults."""

from __future__ import annotations

import os
import sqlite3
import stat
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import pytest

from koubou_mcp import queue
from koubou_mcp.config import Settings
from koubou_mcp.models import SCHEMA_VERSION, utcnow
from koubou_mcp.store import StoreError, open_store


def test_a_new_store_is_private_to_the_user_and_in_wal_mode(settings: Settings) -> None:
    store = open_store(settings.database_url, settings.run_dir)
    db = settings.home / "db" / "koubou.db"
    try:
        assert stat.S_IMODE(db.stat().st_mode) == 0o600
        assert stat.S_IMODE(db.parent.stat().st_mode) == 0o700
        with store.read() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 5000
    finally:
        store.close()


def test_the_seeds_monitoring_queries_run_verbatim_and_answer_correctly(
    sqlite_store: queue.Store, settings: Settings
) -> None:
    now = utcnow()
    queue.register_worker(sqlite_store, "worker_001", 1, now)
    queue.register_worker(sqlite_store, "worker_old", 2, now - timedelta(minutes=5))
    for i in range(3):
        queue.enqueue(sqlite_store, queue.validate_request(settings, f"p{i}"), settings, now)
    task = queue.claim_next(sqlite_store, "worker_001", now, 30)
    assert task is not None
    queue.complete(sqlite_store, task.task_id, "worker_001", "ok", now + timedelta(minutes=3))

    db = sqlite3.connect(settings.home / "db" / "koubou.db")
    try:
        active = db.execute(
            "SELECT worker_id, status, tasks_completed, tasks_failed FROM workers "
            "WHERE last_heartbeat > datetime('now', '-1 minute');").fetchall()
        assert active == [("worker_001", "idle", 1, 0)]
        by_status = dict(db.execute(
            "SELECT status, COUNT(*) as count FROM task_master GROUP BY status;").fetchall())
        assert by_status == {"pending": 2, "completed": 1}
        (avg_minutes,) = db.execute(
            "SELECT AVG(julianday(updated_at) - julianday(created_at)) * 24 * 60 as avg_minutes "
            "FROM task_master WHERE status = 'completed';").fetchone()
        assert avg_minutes == pytest.approx(3.0, abs=0.01)
        pending = db.execute("SELECT * FROM task_master WHERE status='pending';").fetchall()
        assert len(pending) == 2
    finally:
        db.close()


def test_a_corrupt_database_file_gives_a_clear_error(settings: Settings) -> None:
    db = settings.home / "db" / "koubou.db"
    db.parent.mkdir(parents=True)
    db.write_bytes(b"this is not a database, just some bytes" * 100)
    with pytest.raises(StoreError, match="corrupt.*Move the file aside"):
        open_store(settings.database_url, settings.run_dir)


@contextmanager
def read_only(directory: Path) -> Iterator[None]:
    """Make ``directory`` read-only for us, even as root (a read-only bind mount)."""
    if os.geteuid() != 0:
        directory.chmod(0o500)
        try:
            yield
        finally:
            directory.chmod(0o700)
        return
    mounted = subprocess.run(["mount", "--bind", str(directory), str(directory)],
                             capture_output=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot make a read-only directory as root here: {mounted.stderr!r}")
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(directory)], check=True)
        yield
    finally:
        subprocess.run(["umount", str(directory)], check=False)


def test_a_read_only_database_directory_gives_a_clear_error(settings: Settings) -> None:
    open_store(settings.database_url, settings.run_dir).close()
    with read_only(settings.home / "db"), pytest.raises(StoreError, match="writable"):
        open_store(settings.database_url, settings.run_dir)


def test_a_directory_that_cannot_be_created_gives_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file where a directory should be")
    with pytest.raises(StoreError, match="cannot create the database directory"):
        open_store(f"sqlite:///{blocker}/db/koubou.db", tmp_path / "run")


def test_opening_without_create_refuses_a_missing_database(settings: Settings) -> None:
    with pytest.raises(StoreError, match="start koubou-mcp once"):
        open_store(settings.database_url, settings.run_dir, create=False)


def test_a_schema_from_a_newer_release_is_refused(settings: Settings) -> None:
    open_store(settings.database_url, settings.run_dir).close()
    db = sqlite3.connect(settings.home / "db" / "koubou.db")
    db.execute("UPDATE koubou_meta SET value='99' WHERE key='schema_version'")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="newer than this koubou-mcp"):
        open_store(settings.database_url, settings.run_dir)


def test_an_unreachable_postgres_gives_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="cannot reach the database"):
        open_store("postgresql+psycopg://nobody@127.0.0.1:1/none?connect_timeout=2", tmp_path)


def test_an_unsupported_url_is_refused(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="sqlite:///PATH or postgresql"):
        open_store("mysql://x@y/z", tmp_path)


_PARTIAL = ("ix_task_master_worker_set", "ix_task_master_idempotency_set",
            "ix_task_master_finished_set")


def test_a_version_5_store_is_migrated_to_partial_indexes_a_new_task_does_not_write(
        settings: Settings) -> None:
    open_store(settings.database_url, settings.run_dir).close()
    db = sqlite3.connect(settings.home / "db" / "koubou.db")
    # what version 5 left behind: the three indexes over every row
    for name in _PARTIAL:
        db.execute(f"DROP INDEX {name}")
    db.execute("CREATE INDEX ix_task_master_worker ON task_master (worker_id, status)")
    db.execute("CREATE INDEX ix_task_master_idempotency ON task_master (idempotency_key)")
    db.execute("CREATE INDEX ix_task_master_finished ON task_master (finished_at)")
    db.execute("UPDATE koubou_meta SET value='5' WHERE key='schema_version'")
    db.commit()
    store = open_store(settings.database_url, settings.run_dir)
    indexes = {row[0]: row[1] for row in db.execute(
        "SELECT name, sql FROM sqlite_master WHERE type='index' AND sql IS NOT NULL")}
    assert not {"ix_task_master_worker", "ix_task_master_idempotency",
                "ix_task_master_finished"} & set(indexes)
    for name in _PARTIAL:
        assert "IS NOT NULL" in indexes[name], indexes[name]
    assert db.execute("SELECT value FROM koubou_meta").fetchone() == (str(SCHEMA_VERSION),)
    # the queries these indexes serve still use them
    for query, index in [
        ("SELECT task_id FROM task_master WHERE idempotency_key = 'k' AND status NOT IN "
         "('completed', 'failed', 'cancelled')", "ix_task_master_idempotency_set"),
        ("SELECT task_id FROM task_master WHERE worker_id = 'w' AND status = 'in_progress'",
         "ix_task_master_worker_set"),
        ("SELECT task_id FROM task_master WHERE finished_at >= '2026-01-01'",
         "ix_task_master_finished_set"),
    ]:
        plan = str(db.execute(f"EXPLAIN QUERY PLAN {query}").fetchall())
        assert index in plan, (query, plan)
    # a new task is in none of them; a finished one is in all three
    queue.enqueue(store, queue.validate_request(settings, "new"), settings, utcnow())

    columns = dict(zip(_PARTIAL, ("worker_id", "idempotency_key", "finished_at"), strict=True))

    def entries(index: str) -> int:
        return int(db.execute(f"SELECT count(*) FROM task_master INDEXED BY {index} "
                              f"WHERE {columns[index]} IS NOT NULL").fetchone()[0])

    assert [entries(i) for i in _PARTIAL] == [0, 0, 0]
    claimed = queue.claim_next(store, "w1", utcnow(), 30)
    assert claimed is not None
    queue.complete(store, claimed.task_id, "w1", "done", utcnow())
    assert [entries(i) for i in _PARTIAL] == [1, 0, 1]
    store.close()
    db.close()


def test_postgres_indexes_are_partial_too(pg_url: str, tmp_path: Path) -> None:
    store = open_store(pg_url, tmp_path)
    try:
        with store.read() as conn:
            found = dict(conn.exec_driver_sql(
                "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'task_master'"
            ).all())
    finally:
        store.close()
    for name in _PARTIAL:
        assert "IS NOT NULL" in found[name], found


def test_a_version_1_store_is_migrated_to_the_claim_ordered_index(settings: Settings) -> None:
    open_store(settings.database_url, settings.run_dir).close()
    db = sqlite3.connect(settings.home / "db" / "koubou.db")
    # what version 1 left behind: the old claim index, and its version number
    db.execute("DROP INDEX ix_task_master_ready")
    db.execute("CREATE INDEX ix_task_master_claim ON task_master (status, priority, created_at)")
    db.execute("UPDATE koubou_meta SET value='1' WHERE key='schema_version'")
    db.commit()
    open_store(settings.database_url, settings.run_dir).close()
    indexes = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    assert "ix_task_master_claim" not in indexes and "ix_task_master_ready" in indexes
    assert db.execute("SELECT value FROM koubou_meta").fetchone() == (str(SCHEMA_VERSION),)
    plan = db.execute("EXPLAIN QUERY PLAN SELECT task_id FROM task_master WHERE status = 'pending' "
                      "ORDER BY priority DESC, created_at, task_id LIMIT 1").fetchall()
    assert "ix_task_master_ready" in str(plan) and "TEMP B-TREE" not in str(plan)
    db.close()


def test_a_home_created_by_the_store_is_private_at_every_level(tmp_path: Path) -> None:
    settings = Settings.from_env({}, home=str(tmp_path / "project" / ".koubou"))
    (tmp_path / "project").mkdir()
    open_store(settings.database_url, settings.run_dir).close()
    for directory in (settings.home, settings.home / "db"):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700, directory


def test_a_version_2_store_gains_the_admission_columns_and_keeps_its_tasks(
        settings: Settings) -> None:
    open_store(settings.database_url, settings.run_dir).close()
    db = sqlite3.connect(settings.home / "db" / "koubou.db")
    # what version 2 left behind: task_master without the v3 columns, no model_servers
    db.executescript("""
        DROP TABLE model_servers;
        ALTER TABLE task_master DROP COLUMN model_url;
        ALTER TABLE task_master DROP COLUMN partial_result;
        ALTER TABLE task_master DROP COLUMN tokens;
        ALTER TABLE task_master DROP COLUMN first_token_s;
        ALTER TABLE task_master DROP COLUMN progress_at;
        UPDATE koubou_meta SET value='2' WHERE key='schema_version';
        INSERT INTO task_master (task_id, type, prompt, status, priority, attempts, max_attempts,
            timeout_s, cancel_requested, created_at, updated_at)
        VALUES ('task_old', 'general', 'from v2', 'pending', 5, 0, 3, 60, 0,
            '2026-11-01 00:00:00.000000', '2026-11-01 00:00:00.000000');
    """)
    db.commit()
    store = open_store(settings.database_url, settings.run_dir)
    try:
        task = queue.get_task(store, "task_old")
        assert (task.prompt, task.tokens, task.partial_result, task.model_url) == (
            "from v2", None, None, None)
    finally:
        store.close()
    columns = {row[1] for row in db.execute("PRAGMA table_info(task_master)")}
    assert {"model_url", "partial_result", "tokens", "first_token_s", "progress_at"} <= columns
    tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert "model_servers" in tables
    assert db.execute("SELECT value FROM koubou_meta").fetchone() == (str(SCHEMA_VERSION),)
    db.close()


def test_a_version_3_store_gains_the_delegation_columns_and_keeps_its_tasks(
        settings: Settings) -> None:
    open_store(settings.database_url, settings.run_dir).close()
    db = sqlite3.connect(settings.home / "db" / "koubou.db")
    # what version 3 left behind: task_master without the v4 columns
    db.executescript("""
        ALTER TABLE task_master DROP COLUMN workdir;
        ALTER TABLE task_master DROP COLUMN files;
        ALTER TABLE task_master DROP COLUMN model;
        ALTER TABLE task_master DROP COLUMN system_prompt;
        ALTER TABLE task_master DROP COLUMN model_options;
        ALTER TABLE task_master DROP COLUMN output_schema;
        UPDATE koubou_meta SET value='3' WHERE key='schema_version';
        INSERT INTO task_master (task_id, type, prompt, status, priority, attempts, max_attempts,
            timeout_s, cancel_requested, created_at, updated_at)
        VALUES ('task_v3', 'code', 'from v3', 'pending', 5, 0, 3, 60, 0,
            '2026-11-01 00:00:00.000000', '2026-11-01 00:00:00.000000');
    """)
    db.commit()
    store = open_store(settings.database_url, settings.run_dir)
    try:
        task = queue.get_task(store, "task_v3")
        assert (task.prompt, task.workdir, task.file_list, task.model, task.schema) == (
            "from v3", None, [], None, None)
    finally:
        store.close()
    columns = {row[1] for row in db.execute("PRAGMA table_info(task_master)")}
    assert {"workdir", "files", "model", "system_prompt", "model_options",
            "output_schema"} <= columns
    assert db.execute("SELECT value FROM koubou_meta").fetchone() == (str(SCHEMA_VERSION),)
    db.close()


def test_a_store_made_at_version_4_but_marked_3_migrates_without_adding_columns_twice(
        settings: Settings) -> None:
    open_store(settings.database_url, settings.run_dir).close()
    db = sqlite3.connect(settings.home / "db" / "koubou.db")
    db.execute("UPDATE koubou_meta SET value='3' WHERE key='schema_version'")
    db.commit()
    open_store(settings.database_url, settings.run_dir).close()
    assert db.execute("SELECT value FROM koubou_meta").fetchone() == (str(SCHEMA_VERSION),)
    db.close()


def test_a_writer_waiting_for_the_write_lock_tries_again_within_milliseconds(
    settings: Settings,
) -> None:
    """SQLite's own busy handler sleeps 1, 2, 5, 10 ms... between tries; ours starts at 50 us
    and doubles to 2 ms, then gives up at the busy timeout with the driver's error; the
    connection's busy timeout (the store's) is back for the statements that follow."""
    from koubou_mcp.store import WRITE_LOCK_RETRY_MAX_S, begin_immediate

    db = settings.home / "db"
    db.mkdir(parents=True)
    holder = sqlite3.connect(db / "x.db", isolation_level=None)
    waiter = sqlite3.connect(db / "x.db", isolation_level=None)
    waiter.execute("PRAGMA busy_timeout = 10000")
    holder.execute("BEGIN IMMEDIATE")
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        if len(sleeps) == 12:
            holder.execute("COMMIT")  # the lock comes free while the waiter waits

    try:
        begin_immediate(waiter, 10.0, sleep=sleep)
        assert waiter.in_transaction
        waiter.execute("ROLLBACK")
        assert len(sleeps) == 12
        assert sleeps[0] < 0.0001
        assert max(sleeps) <= WRITE_LOCK_RETRY_MAX_S * 1.5
        assert waiter.execute("PRAGMA busy_timeout").fetchone() == (10000,)

        holder.execute("BEGIN IMMEDIATE")  # now held for good: the waiter gives up
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            begin_immediate(waiter, 0.05)
        assert not waiter.in_transaction
        assert waiter.execute("PRAGMA busy_timeout").fetchone() == (50,)
    finally:
        holder.close()
        waiter.close()


def test_a_connection_opened_after_the_file_was_deleted_makes_no_new_database(
    settings: Settings,
) -> None:
    from sqlalchemy.exc import OperationalError

    store = open_store(settings.database_url, settings.run_dir)
    db = settings.home / "db" / "koubou.db"
    try:
        with store.read() as conn:  # one connection in the pool, on the file that is there
            conn.exec_driver_sql("SELECT 1")
        for suffix in ("", "-wal", "-shm"):
            Path(f"{db}{suffix}").unlink(missing_ok=True)
        with pytest.raises(OperationalError, match="unable to open"), \
                store.engine.connect() as first, store.engine.connect() as second:
            first.exec_driver_sql("SELECT 1")
            second.exec_driver_sql("SELECT 1")  # a new connection: the file is not remade
        assert not db.exists()
        assert store.file_problem() is not None
    finally:
        store.close()
