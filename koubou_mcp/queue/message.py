"""PostgreSQL: a transaction of hot-path statements sent in as few messages as the logic allows.

psycopg sends every statement, and a transaction's ``BEGIN`` and ``COMMIT``, as a round trip
of its own: a worker's hand-over from one task to the next was five round trips, the claim of
a woken worker four, and the model server's row stays locked across the ones after its lock
while every other admission to that server waits (docs/benchmarks.md). PostgreSQL's simple
query protocol takes several statements in one message, separated by semicolons, runs them
in order, each with a snapshot of its own (READ COMMITTED), and answers with all their
results at once. So a transaction here is ``BEGIN`` and its statements up to the first whose
result the caller needs before it can go on, in one message; then the rest and ``COMMIT``.

The statements are those of ``queue.prepared``, made server-side prepared statements once per
connection (``PREPARE``, which outlives a rolled-back transaction), so a message carries
``EXECUTE``s whose values the driver writes as literals with its own quoting, and the server
plans each statement once per connection, as psycopg's own prepared statements did. A
transaction that fails is rolled back here, and driver errors come out as SQLAlchemy's,
as from ``Prepared.execute``.
"""

from __future__ import annotations

import contextlib
import itertools
import re
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy.exc import DBAPIError, OperationalError

from koubou_mcp.queue.prepared import OnDriver, Prepared, returns_rows

#: libpq's "no transaction open" (``psycopg.pq.TransactionStatus.IDLE``)
_PG_IDLE = 0

_PLACEHOLDER = re.compile(r"%%|%\((\w+)\)s")
_NAMES = itertools.count(1)


@dataclass(frozen=True)
class _ServerSide:
    """A ``Prepared`` as a server-side prepared statement: its name, its ``PREPARE`` and the
    order of its parameters (``$1``, ``$2``, …)."""

    name: str
    prepare: str
    order: tuple[str, ...]


_SERVER_SIDE: dict[int, _ServerSide] = {}
#: the statements prepared on each driver connection (a new connection starts with none)
_PREPARED_ON: weakref.WeakKeyDictionary[Any, set[str]] = weakref.WeakKeyDictionary()


def _server_side(statement: Prepared) -> _ServerSide:
    found = _SERVER_SIDE.get(id(statement))
    if found is None:
        if not statement.named:
            raise ValueError("only statements compiled for psycopg (named parameters) can be "
                             "sent in one message")
        order: list[str] = []

        def number(match: re.Match[str]) -> str:
            name = match.group(1)
            if name is None:
                return "%"
            if name not in order:
                order.append(name)
            return f"${order.index(name) + 1}"

        body = _PLACEHOLDER.sub(number, statement.sql)
        name = f"koubou_{next(_NAMES)}"
        found = _SERVER_SIDE[id(statement)] = _ServerSide(
            name, f"PREPARE {name} AS {body}", tuple(order))
    return found


Call = tuple[Prepared, Mapping[str, Any]]


class Messages:
    """One transaction on a PostgreSQL driver connection (``transaction``)."""

    def __init__(self, conn: OnDriver, driver: Any) -> None:
        self._conn = conn
        self._driver = driver
        self._begun = False
        self._done = False

    def send(self, calls: Sequence[Call], *, commit: bool = False,
             then: Sequence[Call] = ()) -> list[list[dict[str, Any]]]:
        """Run ``calls`` in order, as one message (after ``BEGIN`` when they are the
        transaction's first, followed by ``COMMIT`` with ``commit``, and by ``then``, each
        on its own after the commit); each call's rows, converted as SQLAlchemy converts
        them."""
        if self._done:
            raise RuntimeError("this transaction has ended")
        if then and not commit:
            raise ValueError("statements after the commit need commit=True")
        opening = not self._begun
        sql = ""
        try:
            try:
                return self._send(calls, commit, then)
            except self._forgotten as exc:
                # psycopg deallocates every prepared statement of the connection, its own and
                # ours, when a transaction rolls back: prepare ours again. The first message
                # of a transaction is sent again at once; a later one cannot be without the
                # caller, whose whole transaction is then a store fault worth trying again.
                _PREPARED_ON.pop(self._driver, None)
                if not opening:
                    raise OperationalError(
                        "the server forgot this connection's prepared statements in the "
                        "middle of a transaction; it is rolled back: try again",
                        None, exc) from exc
                sql = "ROLLBACK"
                self._driver.rollback()  # the transaction the failed message began
                self._begun = False
                return self._send(calls, commit, then)
        except self._error as exc:
            lost = self._conn.dialect.is_disconnect(exc, self._driver, None)
            if lost:
                self._conn.invalidate(exc)
            raise DBAPIError.instance(getattr(exc, "koubou_sql", sql), None, exc, self._error,
                                      connection_invalidated=lost,
                                      dialect=self._conn.dialect) from exc

    def _send(self, calls: Sequence[Call], commit: bool,
              then: Sequence[Call]) -> list[list[dict[str, Any]]]:
        """``send``, its driver errors raised as they are (with the SQL as ``koubou_sql``)."""
        driver = self._driver
        sides = [_server_side(statement) for statement, _ in [*calls, *then]]
        known = _PREPARED_ON.setdefault(driver, set())
        missing = [side for side in dict.fromkeys(sides) if side.name not in known]
        cursor = _client_cursor(driver)
        parts = [] if self._begun else ["BEGIN"]
        first = len(parts)
        sql = ""
        try:
            if missing:
                # a message of its own, so that a failed PREPARE leaves no half-sent
                # transaction behind (a PREPARE outlives the transaction it ran in)
                sql = ";".join(side.prepare for side in missing)
                cursor.execute(sql)
                known.update(side.name for side in missing)
            executes = [_execute(cursor, statement, params, side)
                        for (statement, params), side in zip([*calls, *then], sides, strict=True)]
            parts.extend(executes[:len(calls)])
            if commit:
                parts.append("COMMIT")
            parts.extend(executes[len(calls):])
            sql = ";".join(parts)
            self._begun = True
            cursor.execute(sql)
            out: list[list[dict[str, Any]]] = []
            for index, (statement, _) in enumerate([*calls, *then]):
                if index == len(calls):
                    cursor.nextset()  # past the COMMIT
                if index or first:
                    cursor.nextset()
                rows = cursor.fetchall() if returns_rows(cursor) else []
                out.append(statement.convert(rows, statement.result_processors(cursor)))
        except self._error as exc:
            exc.koubou_sql = sql
            raise
        finally:
            cursor.close()
        self._done = commit
        return out

    def rollback(self) -> None:
        """End the transaction without its changes (nothing is sent before it has begun)."""
        if self._begun and not self._done:
            _rollback(self._driver)
        self._done = True

    @property
    def _error(self) -> Any:
        return self._conn.dialect.loaded_dbapi.Error

    @property
    def _forgotten(self) -> Any:
        import psycopg

        return psycopg.errors.InvalidSqlStatementName


def _execute(cursor: Any, statement: Prepared, params: Mapping[str, Any],
             side: _ServerSide) -> str:
    """``EXECUTE`` of ``statement``'s prepared twin, its values written as literals."""
    if not side.order:
        return f"EXECUTE {side.name}"
    values = statement.parameters(params)
    arguments = ",".join(["%s"] * len(side.order))
    return str(cursor.mogrify(f"EXECUTE {side.name}({arguments})",
                              [values[name] for name in side.order]))


def _rollback(driver: Any) -> None:
    """Roll back the open transaction; psycopg may deallocate the connection's prepared
    statements with it (when it has some of its own), so ours count as gone."""
    _PREPARED_ON.pop(driver, None)
    driver.rollback()  # in autocommit, psycopg sends ROLLBACK when one is open


def _client_cursor(driver: Any) -> Any:
    """A cursor that writes values into the SQL (with the driver's quoting) and sends a
    statement without values as a simple query, which may hold several."""
    import psycopg  # only on PostgreSQL: the driver is an optional dependency

    return psycopg.ClientCursor(driver)


@contextlib.contextmanager
def transaction(conn: OnDriver) -> Iterator[Messages]:
    """A transaction of ``Messages`` on ``conn``'s driver connection, which must have none
    open (the start of a ``Store.write()``): the driver runs in autocommit meanwhile, so that
    it sends no ``BEGIN`` of its own, and the messages carry the transaction's. An error
    rolls it back; so does leaving it without ``send(..., commit=True)`` or ``rollback()``,
    which raises (a write the caller forgot to commit must not pass unnoticed)."""
    driver = conn.connection.dbapi_connection
    if (conn.dialect.name != "postgresql" or driver is None or driver.autocommit
            or driver.pgconn.transaction_status != _PG_IDLE):
        raise RuntimeError("queue.message.transaction needs a PostgreSQL connection with no "
                           "transaction open")
    driver.autocommit = True  # a client-side switch: nothing is sent
    messages = Messages(conn, driver)
    try:
        yield messages
        if driver.pgconn.transaction_status != _PG_IDLE:
            raise RuntimeError("a queue.message transaction was left without its commit; "
                               "it is rolled back")
    finally:
        if driver.pgconn.transaction_status != _PG_IDLE:
            with contextlib.suppress(Exception):  # a lost connection is invalidated already
                _rollback(driver)
        with contextlib.suppress(Exception):
            driver.autocommit = False
