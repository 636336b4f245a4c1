"""Opening the task store: engine, SQLite pragmas, schema, transactions, wake-ups.

SQLite runs in WAL mode with a busy timeout, and every write transaction starts with
``BEGIN IMMEDIATE`` so that two writers never deadlock upgrading a read lock (the classic
"database is locked" trap). PostgreSQL is used through psycopg 3.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import random
import sqlite3
import time
import urllib.parse
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, Integer, Text, column, create_engine, event, inspect, select, text
from sqlalchemy.engine import Dialect, make_url
from sqlalchemy.exc import (
    ArgumentError,
    DataError,
    DBAPIError,
    DisconnectionError,
    IntegrityError,
    NoSuchModuleError,
    NotSupportedError,
    ProgrammingError,
    SQLAlchemyError,
)
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.pool import PoolProxiedConnection
from sqlmodel import SQLModel

from koubou_mcp.config import make_private_dir
from koubou_mcp.models import SCHEMA_VERSION, Meta, TaskStatus, WorkerStatus
from koubou_mcp.wakeup import FifoWakeup, PostgresWakeup, Wakeup

log = logging.getLogger(__name__)

#: how long a SQLite writer waits for the lock before giving up, ms
SQLITE_BUSY_TIMEOUT_MS = 60_000
#: PostgreSQL channel on which all new work is announced (supervisors listen on it: they
#: scale on new work)
NOTIFY_CHANNEL = "koubou_tasks"
#: each worker listens on a channel of its own, ``worker_channel(worker_id)``
WORKER_CHANNEL_PREFIX = "koubou_w_"


def worker_channel(worker_id: str) -> str:
    """The PostgreSQL channel of one worker: a hash of its id, as ``WAKE_IDLE_WORKERS``
    computes it in SQL (a channel name is at most 63 bytes; a worker id may be longer)."""
    return WORKER_CHANNEL_PREFIX + hashlib.sha256(worker_id.encode()).hexdigest()[:32]


#: The wake-up statements (``wakeup`` runs them; the SQL stays here with the store's other
#: statements). New work wakes up to ``:n`` idle workers, one each, and every supervisor;
#: NOTIFY is delivered at commit. It answers how many workers it woke. Which ones: first those
#: not woken since they last took a task (a claim clears ``woken_at``: one woken already is
#: about to claim, a second task needs a second worker), of those the one idle most recently
#: (a trickle of work stays on a few workers, which wake warm, and the others stay idle long
#: enough to be retired: docs/benchmarks.md); then the ones woken longest ago. Never one
#: another enqueue is waking right now (SKIP LOCKED). ``woken_at`` is only compared with
#: itself, so it is the server's clock (in UTC, as the other columns), not the caller's.
WAKE_IDLE_WORKERS = text(f"""
WITH picked AS (
    SELECT worker_id FROM workers WHERE status = :idle
    ORDER BY woken_at IS NOT NULL, idle_since DESC NULLS LAST, woken_at
    LIMIT :n FOR UPDATE SKIP LOCKED
), woken AS (
    UPDATE workers SET woken_at = now() AT TIME ZONE 'UTC' FROM picked
    WHERE workers.worker_id = picked.worker_id RETURNING workers.worker_id
)
SELECT count(pg_notify('{WORKER_CHANNEL_PREFIX}'
                       || left(encode(sha256(convert_to(worker_id, 'UTF8')), 'hex'), 32), ''))
       AS woken,
       pg_notify(:c, '') AS supervisors
FROM woken
""").bindparams(idle=WorkerStatus.IDLE.value, c=NOTIFY_CHANNEL).columns(
    column("woken", Integer()), column("supervisors", Text()))


def listen_statement(worker_id: str | None) -> str:
    """LISTEN on a worker's own channel, or (``None``) on the one every supervisor shares.
    No bound parameter: the channel is our constant or a hex hash, quoted."""
    channel = NOTIFY_CHANNEL if worker_id is None else worker_channel(worker_id)
    return f'LISTEN "{channel}"'

META: Any = Meta.__table__  # type: ignore[attr-defined]

#: What takes a store from the version before to this one, beyond creating what is missing
#: (new tables and indexes are created anyway; these statements change or drop old ones).
MIGRATIONS: dict[int, tuple[str, ...]] = {
    # v2: the claim index follows the claim's order (priority DESC, created_at, task_id)
    2: ("DROP INDEX IF EXISTS ix_task_master_claim",),
    # v3: admission per model server and streaming progress (model_servers is a new table,
    # made by create_all)
    3: tuple(f"ALTER TABLE task_master ADD COLUMN {column}" for column in (
        "model_url VARCHAR(500)", "partial_result TEXT", "tokens INTEGER",
        "first_token_s FLOAT", "progress_at TIMESTAMP",
    )),
    # v4: a task's project directory, files, model, system prompt, options and output schema
    4: tuple(f"ALTER TABLE task_master ADD COLUMN {column}" for column in (
        "workdir TEXT", "files TEXT", "model VARCHAR(200)", "system_prompt TEXT",
        "model_options TEXT", "output_schema TEXT",
    )),
    # v5: when new work last woke a worker (PostgreSQL wakes one idle worker per new task)
    5: ("ALTER TABLE workers ADD COLUMN woken_at TIMESTAMP",),
    # v6: three indexes become partial (``*_set``, made by the index step above): a new
    # task's INSERT no longer writes them
    6: tuple(f"DROP INDEX IF EXISTS ix_task_master_{name}"
             for name in ("worker", "idempotency", "finished")),
}


class StoreError(RuntimeError):
    """The store cannot be used. The message says what is wrong and how to fix it."""


def is_store_fault(exc: BaseException) -> bool:
    """Whether ``exc`` is the store failing (locked past the busy timeout, a lost or refused
    connection, a full disk) rather than a bug in the statement: worth waiting and trying again.
    """
    if isinstance(exc, IntegrityError | ProgrammingError | DataError | NotSupportedError):
        return False
    return isinstance(exc, DBAPIError | DisconnectionError | PoolTimeout)


class Store:
    """A handle on the task store. Cheap to share within a process; make one per process."""

    def __init__(self, engine: Engine, url: str, wakeup: Wakeup, path: Path | None = None,
                 busy_timeout_s: float = SQLITE_BUSY_TIMEOUT_MS / 1000) -> None:
        self.engine = engine
        self.url = url
        self.wakeup = wakeup
        #: SQLite: how long a writer waits for the write lock
        self.busy_timeout_s = busy_timeout_s
        #: SQLite: the database file, and which file it was when opened (device, inode)
        self.path = path
        self.identity = _identity(path) if path is not None else None

    def file_problem(self) -> str | None:
        """SQLite: what is wrong if the path no longer names the file this store opened
        (deleted, or replaced): writes would go to a file nobody else sees. None when fine."""
        if self.path is None:
            return None
        now = _identity(self.path)
        if now is None:
            return f"the database file {self.path} was deleted while in use"
        if now != self.identity:
            return f"the database file {self.path} was replaced by another file while in use"
        return None

    def write_probe(self) -> None:
        """A write transaction that changes nothing: raises when the store cannot take writes
        (locked, read-only, full, a lost connection) even though reads still work."""
        with self.write() as conn:
            conn.execute(text("UPDATE koubou_meta SET value = value WHERE key = 'schema_version'"))

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @property
    def is_postgres(self) -> bool:
        return self.dialect == "postgresql"

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """A write transaction: ``BEGIN IMMEDIATE`` on SQLite. Keep it short; never call a model
        inside it."""
        with self.engine.connect() as conn:
            conn = conn.execution_options(koubou_begin="BEGIN IMMEDIATE")
            with conn.begin():
                yield conn

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """A read-only transaction (deferred on SQLite, so readers never block writers)."""
        with self.engine.connect() as conn, conn.begin():
            yield conn

    @contextmanager
    def write_on_driver(self) -> Iterator[DriverTransaction]:
        """A write transaction like ``write``'s, on a pooled driver connection with no
        SQLAlchemy ``Connection`` around it: for statements that ``queue.prepared`` runs.

        SQLAlchemy's connection, its begin and its commit cost about a third of an enqueue's
        CPU (docs/benchmarks.md), and an enqueue holds SQLite's one write lock meanwhile.
        Errors come out as SQLAlchemy's, as from ``write``: a connection they show to be
        lost is invalidated, and anything else rolls the transaction back.
        """
        dialect = self.engine.dialect
        try:
            proxied = self.engine.raw_connection()
        except dialect.loaded_dbapi.Error as exc:
            raise DBAPIError.instance(None, None, exc, dialect.loaded_dbapi.Error,
                                      connection_invalidated=dialect.is_disconnect(exc, None, None),
                                      dialect=dialect) from exc
        tx = DriverTransaction(proxied, dialect)
        try:
            if not self.is_postgres:  # psycopg begins at the first statement
                tx.on_driver("BEGIN IMMEDIATE",
                             lambda driver: begin_immediate(driver, self.busy_timeout_s))
            yield tx
            tx.on_driver("COMMIT", lambda driver: driver.commit())
        except BaseException:
            driver = proxied.dbapi_connection
            if driver is not None and not tx.invalidated:
                with contextlib.suppress(Exception):
                    driver.rollback()
            raise
        finally:
            proxied.close()  # back to the pool, or discarded when invalidated

    def pinned(self) -> PinnedStore:
        """This store through one connection kept open, for one thread's hot loop."""
        return PinnedStore(self)

    def notify_new_work(self, count: int = 1) -> None:
        """Wake ``count`` idle workers, and the supervisors: something became claimable."""
        try:
            self.wakeup.notify(count)
        except OSError as exc:  # a wake-up is an optimisation; polling is the safety net
            log.debug("wake-up failed: %s", exc)

    def close(self) -> None:
        self.engine.dispose()


class DriverTransaction:
    """What ``queue.prepared`` needs of a connection (its dialect, the pooled connection,
    invalidation), for ``Store.write_on_driver``."""

    def __init__(self, connection: PoolProxiedConnection, dialect: Dialect) -> None:
        self.connection = connection
        self.dialect = dialect
        self.invalidated = False

    def invalidate(self, exception: BaseException | None = None) -> None:
        self.invalidated = True
        self.connection.invalidate(exception)

    def on_driver(self, sql: str, call: Callable[[Any], object]) -> None:
        """``call(driver connection)``, its driver errors raised as SQLAlchemy's."""
        error = self.dialect.loaded_dbapi.Error
        driver = self.connection.dbapi_connection
        try:
            call(driver)
        except error as exc:
            lost = self.dialect.is_disconnect(exc, driver, None)
            if lost:
                self.invalidate(exc)
            raise DBAPIError.instance(sql, None, exc, error, connection_invalidated=lost,
                                      dialect=self.dialect) from exc


class PinnedStore(Store):
    """A store whose transactions all run on one connection, kept open between them.

    A worker's loop runs a transaction or two per task; taking a connection from the pool for
    each costs a checkout, a reset on return and, on PostgreSQL, a pre-ping round trip. This
    one keeps its connection (no transaction stays open between calls). A connection that an
    error invalidated is replaced by SQLAlchemy on the next transaction. One thread only.
    """

    def __init__(self, base: Store) -> None:
        super().__init__(base.engine, base.url, base.wakeup, None, base.busy_timeout_s)
        self.path, self.identity = base.path, base.identity
        self._conn: Connection | None = None

    def _connection(self, begin: str) -> Connection:
        if self._conn is None or self._conn.closed:
            self._conn = self.engine.connect()
        return self._conn.execution_options(koubou_begin=begin)  # in place (SQLAlchemy 2)

    @contextmanager
    def write(self) -> Iterator[Connection]:
        conn = self._connection("BEGIN IMMEDIATE")
        with conn.begin():
            yield conn

    @contextmanager
    def read(self) -> Iterator[Connection]:
        conn = self._connection("BEGIN")
        with conn.begin():
            yield conn

    def close(self) -> None:
        """Close the kept connection (the engine belongs to the store this one came from)."""
        if self._conn is not None:
            with contextlib.suppress(SQLAlchemyError):
                self._conn.close()
            self._conn = None


#: a pooled PostgreSQL connection idle for longer than this is pinged before it is used, s
PING_AFTER_IDLE_S = 5.0


def _ping_when_idle(engine: Engine) -> None:
    """Check a pooled connection before use only when it sat idle ``PING_AFTER_IDLE_S``.

    A connection the server dropped (a restart, a failover, an idle timeout) then fails the
    ping instead of the caller's statement, and the pool opens another, as with SQLAlchemy's
    ``pool_pre_ping``; but that pings on every checkout, a round trip per transaction, which
    cost each enqueue more than its INSERT. A connection in steady use was proven alive by
    the transaction it just ran; one that dies in between fails as a store fault, which the
    callers wait out."""

    @event.listens_for(engine, "checkin")
    def _on_checkin(dbapi_conn: Any, record: Any) -> None:
        record.info["koubou_idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _on_checkout(dbapi_conn: Any, record: Any, proxy: Any) -> None:
        since = record.info.get("koubou_idle_since")
        if since is None or time.monotonic() - since < PING_AFTER_IDLE_S:
            return
        try:
            with dbapi_conn.cursor() as cursor:
                cursor.execute("SELECT 1")
            dbapi_conn.rollback()
        except Exception as exc:
            # the pool discards this connection and checks out another (a new one if needed)
            raise DisconnectionError(f"a pooled connection was lost while idle: {exc}") from exc


def open_store(database_url: str, run_dir: Path, *, create: bool = True,
               busy_timeout_s: float = SQLITE_BUSY_TIMEOUT_MS / 1000) -> Store:
    """Open (and by default create) the store at ``database_url``.

    ``run_dir`` holds the wake-up FIFOs for SQLite. Raises StoreError with a readable message
    when the database cannot be opened: directory missing or read-only, file corrupt, server
    unreachable, schema from a newer release.
    """
    try:
        url = make_url(database_url)
    except ArgumentError as exc:
        raise StoreError(f"KOUBOU_DATABASE_URL {database_url!r} is not a database URL: {exc}") from None
    try:
        if url.get_backend_name() == "sqlite":
            engine = _sqlite_engine(url.database or "", create=create,
                                    busy_timeout_ms=int(busy_timeout_s * 1000))
            wakeup: Wakeup = FifoWakeup(run_dir / "wake")
            path: Path | None = Path(url.database or "").absolute()
        elif url.get_backend_name() == "postgresql":
            if url.drivername == "postgresql":
                url = url.set(drivername="postgresql+psycopg")
            engine = create_engine(url, pool_size=5, max_overflow=5)
            _ping_when_idle(engine)
            wakeup = PostgresWakeup(engine, notify=WAKE_IDLE_WORKERS, listen=listen_statement)
            path = None
        else:
            raise StoreError(
                f"KOUBOU_DATABASE_URL uses {url.get_backend_name()!r}; "
                "use sqlite:///PATH or postgresql+psycopg://USER@HOST/DB"
            )
    except NoSuchModuleError as exc:
        raise StoreError(f"no database driver for {database_url!r}: {exc}") from None
    except ModuleNotFoundError as exc:
        raise StoreError(
            f"the driver for {url.drivername} is not installed ({exc.name}); "
            "install it with: pip install 'koubou-mcp[postgres]'"
        ) from None
    store = Store(engine, database_url, wakeup, path, busy_timeout_s)
    try:
        if create:
            _ensure_schema(store)
        else:
            _check_schema(store)
    except StoreError:
        engine.dispose()
        raise
    except SQLAlchemyError as exc:
        engine.dispose()
        raise StoreError(_explain(exc, database_url)) from None
    return store


# -- SQLite -------------------------------------------------------------------------------

def peek_unfinished(db: Path) -> dict[str, int] | None:
    """How many tasks of the SQLite file ``db`` are pending and in progress, read without
    creating or changing anything; None when there is no such file or it cannot be read.

    For a look at another home (the old per-directory default), not for a store in use: no
    engine, no pragmas, no schema. A read-only WAL connection would create the ``-shm`` and
    ``-wal`` files when they are missing; when they are, nothing is in the WAL and the file
    can be read as immutable instead.
    """
    if not db.is_file():
        return None
    wal_open = all(Path(f"{db}{suffix}").exists() for suffix in ("-wal", "-shm"))
    mode = "mode=ro" if wal_open else "immutable=1"
    uri = f"{db.absolute().as_uri()}?{mode}"
    wanted = (TaskStatus.PENDING.value, TaskStatus.IN_PROGRESS.value)
    try:
        conn = sqlite3.connect(uri, uri=True, timeout=1.0)
        try:
            rows = conn.execute(
                "SELECT status, COUNT(*) FROM task_master WHERE status IN (?, ?) GROUP BY status",
                wanted).fetchall()
        finally:
            conn.close()
    except sqlite3.Error:
        return None
    found = dict.fromkeys(wanted, 0)
    found.update({status: int(count) for status, count in rows})
    return found


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino


def _sqlite_engine(path: str, *, create: bool,
                   busy_timeout_ms: int = SQLITE_BUSY_TIMEOUT_MS) -> Engine:
    if not path or path == ":memory:":
        raise StoreError("an in-memory SQLite database cannot be shared by workers; give a file path")
    db = Path(path)
    if create:
        try:
            make_private_dir(db.parent)
        except OSError as exc:
            raise StoreError(
                f"cannot create the database directory {db.parent}: {exc.strerror}. "
                "Check KOUBOU_HOME / KOUBOU_DATABASE_URL and the directory's permissions."
            ) from None
        if not db.exists():
            try:
                # create the file ourselves so that it is private to the user from the start
                os.close(os.open(db, os.O_CREAT | os.O_WRONLY, 0o600))
            except OSError as exc:
                raise StoreError(
                    f"cannot create the database file {db}: {exc.strerror}. "
                    f"Is {db.parent} writable?"
                ) from None
    elif not db.exists():
        raise StoreError(f"no database at {db}; start koubou-mcp once to create it")

    # ``mode=rw``: a connection never creates the file (it was made above). Without it, a
    # connection opened after the file was deleted made a new, empty database and wrote to it
    # while every other process kept the old one (``Store.file_problem`` says so).
    target = f"file:{urllib.parse.quote(str(db.absolute()))}?mode=rw"

    def connect() -> sqlite3.Connection:
        return sqlite3.connect(target, uri=True, timeout=busy_timeout_ms / 1000,
                               check_same_thread=False)

    engine = create_engine(f"sqlite:///{db}", creator=connect)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Let us emit BEGIN ourselves (pysqlite's own BEGIN is deferred and comes too late).
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout = {busy_timeout_ms}")
        cur.execute("PRAGMA journal_mode = WAL")
        cur.execute("PRAGMA synchronous = NORMAL")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        begin = conn.get_execution_options().get("koubou_begin", "BEGIN")
        if begin != "BEGIN IMMEDIATE":
            conn.exec_driver_sql(begin)
            return
        dbapi_conn = conn.connection.dbapi_connection
        try:
            begin_immediate(dbapi_conn, busy_timeout_ms / 1000)
        except sqlite3.Error as exc:
            raise DBAPIError.instance("BEGIN IMMEDIATE", None, exc, sqlite3.Error,
                                      dialect=engine.dialect) from exc

    return engine


#: how long a writer first waits for SQLite's write lock before trying again, s (doubling)
WRITE_LOCK_RETRY_FIRST_S = 0.00005
WRITE_LOCK_RETRY_MAX_S = 0.002


def begin_immediate(dbapi_conn: Any, busy_timeout_s: float,
                    sleep: Callable[[float], None] = time.sleep) -> None:
    """``BEGIN IMMEDIATE`` on a sqlite3 connection, waiting up to ``busy_timeout_s`` for the
    write lock, in steps of 50 us to 2 ms.

    SQLite's own busy handler (``busy_timeout``) sleeps 1, 2, 5, 10, ... ms between tries, while
    a worker holds the lock for a fraction of a millisecond: with two workers and a submitter
    on one file, writers spent about 40% of their time asleep on a lock long free (measured
    with the throughput benchmark). The connection's busy timeout is off only for this one
    statement; every other statement keeps it.
    """
    dbapi_conn.execute("PRAGMA busy_timeout = 0")
    try:
        deadline = time.monotonic() + busy_timeout_s
        delay = WRITE_LOCK_RETRY_FIRST_S
        while True:
            try:
                dbapi_conn.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                if getattr(exc, "sqlite_errorcode", sqlite3.SQLITE_BUSY) & 0xFF != \
                        sqlite3.SQLITE_BUSY or time.monotonic() >= deadline:
                    raise
            sleep(delay * random.uniform(0.5, 1.5))
            delay = min(delay * 2, WRITE_LOCK_RETRY_MAX_S)
    finally:
        dbapi_conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")


# -- schema -------------------------------------------------------------------------------

def _ensure_schema(store: Store) -> None:
    """Create missing tables and record the schema version, once, even with racing processes."""
    with store.write() as conn:
        if store.is_postgres:
            # serialise concurrent first starts; released at commit
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _lock_key("schema")})
        SQLModel.metadata.create_all(conn)
        # create_all adds indexes only with new tables; an index added by a later release to an
        # existing table is created here
        for table in SQLModel.metadata.sorted_tables:
            for index in table.indexes:
                index.create(conn, checkfirst=True)
        row = conn.execute(select(META.c.value).where(META.c.key == "schema_version")).first()
        if row is None:
            conn.execute(META.insert().values(key="schema_version", value=str(SCHEMA_VERSION)))
            return
        found = int(row[0])
        _refuse_newer(found, store.url)
        for version in range(found + 1, SCHEMA_VERSION + 1):
            for statement in MIGRATIONS.get(version, ()):
                if not _already_applied(conn, statement):
                    conn.execute(text(statement))
            log.info("migrated the store at %s to schema version %d", store.url, version)
        if found < SCHEMA_VERSION:
            conn.execute(META.update().where(META.c.key == "schema_version")
                         .values(value=str(SCHEMA_VERSION)))


def _already_applied(conn: Connection, statement: str) -> bool:
    """Whether an ``ALTER TABLE t ADD COLUMN c ...`` finds ``c`` there already (a table that
    create_all made at the current version, with an older version number written beside it)."""
    words = statement.split()
    if words[:2] != ["ALTER", "TABLE"] or words[3:5] != ["ADD", "COLUMN"]:
        return False
    columns = {c["name"] for c in inspect(conn).get_columns(words[2])}
    return words[5] in columns


def _check_schema(store: Store) -> None:
    with store.read() as conn:
        row = conn.execute(select(META.c.value).where(META.c.key == "schema_version")).first()
    if row is None:
        raise StoreError(f"{store.url} holds no koubou-mcp schema; start koubou-mcp once to create it")
    _refuse_newer(int(row[0]), store.url)


def _refuse_newer(found: int, url: str) -> None:
    if found > SCHEMA_VERSION:
        raise StoreError(
            f"the store at {url} has schema version {found}, newer than this koubou-mcp "
            f"understands ({SCHEMA_VERSION}); upgrade koubou-mcp"
        )


def _lock_key(name: str) -> int:
    return zlib.crc32(f"koubou:{name}".encode())


def _explain(exc: SQLAlchemyError, url: str) -> str:
    """Turn a driver error at open time into a sentence a user can act on."""
    detail = str(exc.orig) if isinstance(exc, DBAPIError) and exc.orig is not None else str(exc)
    lowered = detail.lower()
    if "file is not a database" in lowered or "malformed" in lowered:
        return (f"the database at {url} is corrupt ({detail}). Move the file aside "
                "(and its -wal/-shm files) and start again; tasks in it are lost.")
    if "readonly" in lowered or "read-only" in lowered:
        return (f"the database at {url} is read-only ({detail}). "
                "Make the file and its directory writable, or point KOUBOU_HOME elsewhere.")
    if "unable to open" in lowered:
        return (f"cannot open the database at {url} ({detail}). "
                "Check that its directory exists and is writable.")
    if "connection" in lowered or "could not" in lowered:
        return (f"cannot reach the database at {url} ({detail.strip()}). "
                "Is the server running and the URL right?")
    return f"the database at {url} failed: {detail.strip()}"
