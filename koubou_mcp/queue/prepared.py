"""The hot path's statements compiled once for the store's dialect and run on the driver's cursor.

SQLAlchemy spends tens of microseconds of CPU around every statement it runs (its statement
cache, building the parameters, the execution context, wrapping the cursor and the rows),
several times what SQLite spends running it; a worker's hand-over from one task to the next
runs six to eight statements (docs/benchmarks.md has the profile). So the statements of the
hot path, still written once in ``statements``, are compiled here once per dialect and run
on the DBAPI cursor of the caller's SQLAlchemy connection, inside its transaction, with the
type conversions SQLAlchemy applies (a datetime is stored as SQLite text exactly as
SQLAlchemy stores it, and read back the same way).

A driver error comes out as SQLAlchemy's (``DBAPIError`` and its kinds, as
``Connection.execute`` raises them), so ``is_store_fault`` and the retries built on it see no
difference; a connection the error shows to be lost is invalidated, as SQLAlchemy does.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from sqlalchemy import Select, TextualSelect
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import PoolProxiedConnection
from sqlalchemy.sql.base import Executable

Processor = Callable[[Any], Any] | None

#: libpq's "no transaction open" (``psycopg.pq.TransactionStatus.IDLE``)
_PG_IDLE = 0

_EXPANDING = re.compile(r"__\[POSTCOMPILE_(\w+)\]")


class OnDriver(Protocol):
    """A transaction these statements can run in: a SQLAlchemy ``Connection`` inside its
    ``begin()``, or ``store.DriverTransaction``."""

    @property
    def dialect(self) -> Dialect: ...

    @property
    def connection(self) -> PoolProxiedConnection: ...

    def invalidate(self, exception: BaseException | None = None) -> None: ...


#: libpq's "the statement returned rows (maybe none)" (``psycopg.pq.ExecStatus.TUPLES_OK``)
_PG_TUPLES_OK = 2


def returns_rows(cursor: Any) -> bool:
    """Whether the statement ``cursor`` ran returned rows (maybe none), as ``description is
    not None`` says, without reading ``description`` on PostgreSQL: psycopg builds a column
    object for every column at every read of it, and a task's row has over forty; that was
    a sixth of a worker's CPU in a profile of 8 workers (docs/benchmarks.md)."""
    if not hasattr(cursor, "pgresult"):  # not psycopg (sqlite3 makes its description in C)
        return cursor.description is not None
    result = cursor.pgresult
    return result is not None and (bool(result.nfields) or result.status == _PG_TUPLES_OK)


class Prepared:
    """One statement compiled for one dialect: ``sql``, its parameters' order and defaults,
    and the conversions of the values going in and the columns coming out."""

    def __init__(self, statement: Executable, dialect: Dialect,
                 column_keys: Sequence[str] | None = None) -> None:
        compiled = statement.compile(dialect=dialect,  # type: ignore[attr-defined]
                                     column_keys=list(column_keys) if column_keys else None)
        self.statement = statement  # kept: its identity is the cache's key
        self.dialect = dialect
        defaults: dict[str, Any] = {}
        processors: dict[str, Processor] = {}
        expanded: dict[str, list[str]] = {}
        for bind, name in compiled.bind_names.items():
            processor = bind.type.dialect_impl(dialect).bind_processor(dialect)
            if bind.expanding:
                # a constant list (``status NOT IN (...)``): one parameter per value
                names = [f"{name}_{i}" for i in range(1, len(bind.value) + 1)]
                expanded[name] = names
                for item_name, value in zip(names, bind.value, strict=True):
                    defaults[item_name] = value
                    processors[item_name] = processor
                continue
            processors[name] = processor
            if not bind.required and bind.callable is None:
                defaults[name] = bind.value
        for column in list(compiled.insert_prefetch) + list(compiled.update_prefetch):
            default = column.default
            if default is None or not default.is_scalar:
                raise ValueError(f"column {column.key} needs a Python-side default computed at "
                                 "execution: run this statement through SQLAlchemy")
            defaults[column.key] = default.arg
        self.named = compiled.positiontup is None
        sql = compiled.string
        order: list[str] = []
        for name in compiled.positiontup or ():
            order.extend(expanded.get(name, [name]))

        def placeholders(match: re.Match[str]) -> str:
            names = expanded[match.group(1)]
            if self.named:
                return ", ".join(f"%({n})s" for n in names)
            return ", ".join("?" for _ in names)

        self.sql = _EXPANDING.sub(placeholders, sql)
        self.order = order
        self.defaults = defaults
        self.processors = {k: p for k, p in processors.items() if p is not None}
        self.columns, self.types = _result_columns(statement)
        self._results: list[Processor] | None = None

    def parameters(self, params: Mapping[str, Any]) -> Any:
        values = {**self.defaults, **params}
        for name, process in self.processors.items():
            if name in values:
                values[name] = process(values[name])
        if self.named:
            return values
        return [values[name] for name in self.order]

    def execute(self, conn: OnDriver, params: Mapping[str, Any]) -> list[Any]:
        """Run on ``conn``'s driver connection (inside its transaction); the rows returned."""
        return self._run(conn, params)[0]

    def _run(self, conn: OnDriver,
             params: Mapping[str, Any]) -> tuple[list[Any], list[Processor]]:
        dbapi_conn = conn.connection.dbapi_connection
        if dbapi_conn is None:  # pragma: no cover - an invalidated connection: let SA say so
            raise DBAPIError.instance(self.sql, None, RuntimeError("connection closed"),
                                      Exception, dialect=self.dialect)
        values = self.parameters(params)
        cursor = dbapi_conn.cursor()
        try:
            cursor.execute(self.sql, values)
            rows = list(cursor.fetchall()) if returns_rows(cursor) else []
            results = self.result_processors(cursor)
        except self.dialect.loaded_dbapi.Error as exc:
            lost = self.dialect.is_disconnect(exc, dbapi_conn, cursor)
            if lost:
                conn.invalidate(exc)
            raise DBAPIError.instance(self.sql, values, exc, self.dialect.loaded_dbapi.Error,
                                      connection_invalidated=lost,
                                      dialect=self.dialect) from exc
        finally:
            cursor.close()
        return rows, results

    def result_processors(self, cursor: Any) -> list[Processor]:
        """The conversions of the columns of the result ``cursor`` is on (none for a plain
        write), worked out from the first result that has them."""
        if self._results is None and self.types and returns_rows(cursor):
            # some conversions depend on the type the driver reports (PostgreSQL numerics);
            # a text statement declares no columns: its rows come as the driver gives them
            self._results = [kind.dialect_impl(self.dialect).result_processor(self.dialect, d[1])
                             for kind, d in zip(self.types, cursor.description, strict=True)]
        return self._results or []

    def mappings(self, conn: OnDriver, params: Mapping[str, Any]) -> list[dict[str, Any]]:
        """The rows as column name -> value, converted as SQLAlchemy converts them."""
        return self.convert(*self._run(conn, params))

    def convert(self, rows: Sequence[Any], results: Sequence[Processor]) -> list[dict[str, Any]]:
        """Driver rows as column name -> value (``results``: ``result_processors``')."""
        names = self.columns
        return [{name: (value if process is None else process(value))
                 for name, process, value in zip(names, results, row, strict=True)}
                for row in rows]

    def first(self, conn: OnDriver, params: Mapping[str, Any]) -> dict[str, Any] | None:
        rows = self.mappings(conn, params)
        return rows[0] if rows else None

    def first_on_its_own(self, conn: OnDriver,
                         params: Mapping[str, Any]) -> dict[str, Any] | None:
        """``first`` for a read that needs no transaction around it, as the first statement of
        ``conn``'s: on PostgreSQL it runs in autocommit, so the driver sends no ``BEGIN`` and
        the caller's commit no ``COMMIT``, two round trips of three (an idle worker's look
        before each claim: docs/benchmarks.md). Elsewhere, and inside a transaction that has
        begun, it is ``first``."""
        driver = conn.connection.dbapi_connection
        if (self.dialect.name != "postgresql" or driver is None or driver.autocommit
                or driver.pgconn.transaction_status != _PG_IDLE):
            return self.first(conn, params)
        driver.autocommit = True  # a client-side switch: nothing is sent
        try:
            return self.first(conn, params)
        finally:
            driver.autocommit = False

    def scalar(self, conn: OnDriver, params: Mapping[str, Any]) -> Any:
        rows = self.mappings(conn, params)
        return next(iter(rows[0].values())) if rows else None


def _result_columns(statement: Executable) -> tuple[list[str], list[Any]]:
    """The names and types of the columns ``statement`` returns (none for a plain write)."""
    if isinstance(statement, (Select, TextualSelect)):  # a text with .columns(...)
        described = [(c.name, c.type) for c in statement.selected_columns]
    else:
        described = [(d["name"], d["type"]) for d in
                     getattr(statement, "returning_column_descriptions", None) or ()]
    return [name for name, _ in described], [kind for _, kind in described]


_CACHE: dict[tuple[int, str, str, tuple[str, ...] | None], Prepared] = {}


def prepared(statement: Executable, conn: OnDriver,
             column_keys: Sequence[str] | None = None) -> Prepared:
    """``statement`` compiled for ``conn``'s dialect, once per process (statements are
    module-level constants, so their identity is a key)."""
    dialect = conn.dialect
    key = (id(statement), dialect.name, dialect.driver,
           tuple(column_keys) if column_keys is not None else None)
    found = _CACHE.get(key)
    if found is None:
        found = _CACHE[key] = Prepared(statement, dialect, column_keys)
    return found
