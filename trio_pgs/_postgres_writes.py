"""The connection of the writes: every batch of the group-commit writer, one at a time.

Rule of this module: a batch's outcome is told exactly as far as it is known. An error
of the server's before the commit was sent means nothing was written; once it may have
reached the server, a lost connection or a cancellation leaves the outcome unknown
(`OutcomeUnknown`), and the connection, in an unknown state, is given up (its query
cancelled on the server, then closed) so that the next batch takes another.

The connection is held from one batch to the next (`_HOLD` seconds at most, so that its
pool may replace it). The writer's usual batch, one statement of `sql.bulk`, is sent
from the trio thread through libpq's non-blocking calls, trio waiting on the socket:
no thread hop, no pool checkout, no cursor (`Writes._bulk`). Any other batch runs as a
transaction on a worker thread (`_transaction`).
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import trio

from . import _postgres_sql as sql
from ._errors import ConflictError, OutcomeUnknown, PersistenceError
from ._postgres_conn import (
    CLOSED,
    Abandoned,
    Held,
    Running,
    Taken,
    first_line,
    give_back,
    import_psycopg,
    sound,
)
from ._store import Operation

if TYPE_CHECKING:
    import psycopg
    import psycopg_pool

T = TypeVar("T")
logger = logging.getLogger("trio_pgs.store")

#: SQLSTATEs after which a transaction is known not to have committed and may simply
#: run again: serialization failure and deadlock (CockroachDB reports the first often).
_RETRIED = {"40001", "40P01"}
_ATTEMPTS = 5
#: How long the writes keep their connection before they give it back to its pool and
#: take one again (the pool replaces a connection past its max_lifetime only then).
_HOLD = 60.0
#: Outcomes of `commit_each`, one per operation: None (applied) or why it was not.
Outcomes = list[ConflictError | None]
#: libpq's result statuses (psycopg.pq.ExecStatus), without importing psycopg here.
_COMMAND_OK = 1
_TUPLES_OK = 2
_FATAL_ERROR = 7
#: SQLSTATE invalid_sql_statement_name: no prepared statement of that name.
_NO_SUCH_STATEMENT = "26000"
#: query_canceled: a statement the server cancelled (statement_timeout, a cancel request).
_QUERY_CANCELED = "57014"
#: The statements prepared on each connection of the writes (`Writes._bulk`).
_PREPARED: weakref.WeakKeyDictionary[Any, set[bytes]] = weakref.WeakKeyDictionary()


class Writes:
    """The writes of one store: its pool of one connection (`pool`, None while the
    store is closed), the connection taken from it and held between batches, and a
    lock that lets one batch at a time use it. *owner* names the store in errors."""

    def __init__(self, queries: sql.Queries, owner: object) -> None:
        self._queries = queries
        self._owner = owner
        self.pool: psycopg_pool.ConnectionPool[Any] | None = None
        #: The connection of the writes, taken from `pool` and held between them.
        self._held: Held | None = None
        #: One write at a time on it.
        self._lock = trio.Lock()

    def let_go(self) -> Held | None:
        """At close: the connection held, for the caller to give back; None if there is
        none, or if a write is using it (that write gives it back when it ends)."""
        if self._lock.locked():
            return None
        held, self._held = self._held, None
        return held

    async def commit(
        self, operations: list[Operation], atomic: bool, bulk: sql.Bulk | None
    ) -> Outcomes:
        """Commit *operations* on the connection of the writes, one batch at a time:
        the writer's usual batch (*bulk*) as one statement from the trio thread
        (`_bulk`), any other in a transaction on a worker thread."""
        queries = self._queries

        def commit(connection: psycopg.Connection[Any]) -> Outcomes:
            return _transaction(connection, queries, operations, atomic)

        async with self._lock:
            try:
                held = await self._connection()
                if bulk is not None:
                    return await self._bulk(held, operations, bulk)
                return await self._on_thread(held, commit)
            finally:
                self._closed_meanwhile()

    @property
    def busy(self) -> bool:
        """Whether a statement is using the connection now."""
        return self._lock.locked()

    async def run(
        self, statement: tuple[bytes, bytes], params: Callable[[str], list[bytes]]
    ) -> tuple[psycopg.Connection[Any], Any]:
        """*statement* with the text parameters ``params(encoding)`` (the connection's
        encoding), prepared on the held connection and sent from the trio thread (as
        the writes' batch is): the connection and the statement's result, in binary (as
        the store's reads take theirs: it does not depend on settings such as
        ``bytea_output`` or ``extra_float_digits``). The claims use it
        (`_postgres_claims`)."""
        async with self._lock:
            try:
                held = await self._connection()
                values = params(held.connection.info.encoding)
                result = await self._prepared(
                    held, statement, values, [0] * len(values), result_format=1
                )
                return held.connection, result
            finally:
                self._closed_meanwhile()

    def _closed_meanwhile(self) -> None:
        """The store closed while the connection was in use: give it back now."""
        left = self._held
        if left is not None and left.pool is not self.pool:
            self._held = None
            give_back(left.pool, left.connection)  # its pool closes it

    async def _bulk(self, held: Held, operations: list[Operation], bulk: sql.Bulk) -> Outcomes:
        """The statement of `sql.bulk`, which commits by itself. Any failure once it
        may have reached the server (a lost connection, a cancellation) leaves its
        outcome unknown; an error of the server means it did not commit."""
        encoding = held.connection.info.encoding
        try:
            values, formats = bulk.params(encoding)
        except UnicodeEncodeError as exc:
            raise PersistenceError(f"PostgreSQL did not commit: {exc}") from None
        result = await self._prepared(held, bulk.statement, values, formats)
        outcomes: Outcomes = [None] * len(operations)
        if result.ntuples == len(operations):  # every record written: the usual case
            return outcomes
        written = set()
        for row in range(result.ntuples):
            kind, key = result.get_value(row, 0), result.get_value(row, 1)
            written.add((bytes(kind or b"").decode(encoding), bytes(key or b"").decode(encoding)))
        unmatched = sql.refused(operations, written)
        queries = self._queries

        def explain(connection: psycopg.Connection[Any]) -> list[tuple[int, ConflictError]]:
            return sql.explained(connection, queries, operations, unmatched)

        try:
            refusals = await self._on_thread(held, explain)
        except Exception:  # the statement stands; only its explanation failed
            refusals = [(index, sql.conflict(None, operations[index])) for index in unmatched]
        for index, refusal in refusals:
            outcomes[index] = refusal
        return outcomes

    async def _prepared(
        self, held: Held, statement: tuple[bytes, bytes], values: list[bytes],
        formats: list[int], result_format: int = 0,
    ) -> Any:
        """The result of *statement* run with *values*, as a statement prepared on the
        connection (as psycopg prepares a query it runs often: the server parses and
        plans it once, not for every batch). Run again when the server says it did
        not commit and may be retried; any other error raised."""
        pg, _ = import_psycopg()
        connection = held.connection
        pgconn = connection.pgconn
        name, query = statement
        prepared = _PREPARED.setdefault(connection, set())
        for attempt in range(1, _ATTEMPTS + 1):
            if name not in prepared:
                result = await self._execute(held, pgconn.send_prepare, name, query)
                if result.status == _COMMAND_OK:
                    prepared.add(name)
            if name in prepared:
                result = await self._execute(
                    held, pgconn.send_query_prepared, name, values, formats, result_format
                )
            if result.status == _TUPLES_OK:
                return result
            error = pg.errors.error_from_result(result, encoding=connection.info.encoding)
            if error.sqlstate == _NO_SUCH_STATEMENT and attempt < _ATTEMPTS:
                prepared.discard(name)  # deallocated behind the store's back: again
                continue
            if error.sqlstate in _RETRIED and attempt < _ATTEMPTS:
                logger.info("a statement was not committed (%s); running it again",
                            error.sqlstate)
                await trio.sleep(0.001 * 2**attempt)
                continue
            raise _failure(error, sql.Phase(committing=True), connection.broken) from error
        raise AssertionError("unreachable")  # pragma: no cover

    async def _execute(self, held: Held, send: Callable[..., None], *args: Any) -> Any:
        """``send(*args)``, one of libpq's calls that send a query, on the connection of
        the writes, from the trio thread without blocking it: libpq's non-blocking
        calls, trio waiting on the socket. Returns its result, an error of the
        server's included. Interrupted (a lost connection, a cancellation), the
        connection is given up: its query cancelled on the server, then closed."""
        pg, _ = import_psycopg()
        pgconn = held.connection.pgconn
        try:
            socket = pgconn.socket
            send(*args)
            while pgconn.flush():
                await trio.lowlevel.wait_writable(socket)
            result = None
            while True:
                pgconn.consume_input()
                if pgconn.is_busy():
                    await trio.lowlevel.wait_readable(socket)
                    continue
                last = pgconn.get_result()
                if last is None:
                    break
                if result is None or result.status != _FATAL_ERROR:
                    result = last  # the first error, else the last result
        except BaseException as exc:
            self._give_up(held)
            if isinstance(exc, pg.Error):
                raise OutcomeUnknown(
                    f"the connection to PostgreSQL failed while committing ({first_line(exc)})"
                ) from exc
            raise
        if result is None:  # pragma: no cover - libpq gives a result for every query
            raise PersistenceError("PostgreSQL returned nothing for a statement")
        return result

    async def _connection(self) -> Held:
        """The connection of the writes: the one held since the last write, unless the
        database dropped it meanwhile (or it was held `_HOLD` seconds: it goes back to
        its pool); else one from the pool, on a worker thread."""
        held = self._held
        pool = self.pool
        if held is not None:
            healthy = sound(held.connection)
            if healthy and held.pool is pool and time.monotonic() < held.until:
                return held
            self._held = None
            if not healthy:  # the pool discards it, without a query on this thread
                CLOSED.add(held.connection)
                held.connection.close()
            give_back(held.pool, held.connection)
        if pool is None:
            raise PersistenceError(f"{self._owner!r} is not open (open a supervisor on it)")
        taken = Taken()
        try:
            await trio.to_thread.run_sync(taken.take, pool, abandon_on_cancel=True)
        finally:
            connection = taken.abandon()  # taken or not, the trio side decides now
            if connection is not None:
                self._held = Held(connection, pool, time.monotonic() + _HOLD)
        assert self._held is not None
        return self._held

    async def _on_thread(self, held: Held, work: Callable[[psycopg.Connection[Any]], T]) -> T:
        """*work* with the connection of the writes, on a worker thread. Cancelled: as
        `_run` (the query is cancelled on the server, and the connection, closed, goes
        back to its pool once *work* returns; the next write takes another)."""
        running = Running()
        connection = held.connection

        def job() -> T:
            pg, _ = import_psycopg()
            with running.lock:
                began = not running.cancelled
                running.connection = connection if began else None
            try:
                if not began:  # abandoned before it began: do nothing
                    raise Abandoned
                return work(connection)
            except pg.Error as exc:
                raise PersistenceError(f"PostgreSQL failed: {first_line(exc)}") from exc
            finally:
                with running.lock:
                    running.connection = None
                    running.finished = True
                    if running.cancelled:
                        CLOSED.add(connection)
                        connection.close()
                        give_back(held.pool, connection)

        try:
            return await trio.to_thread.run_sync(job, abandon_on_cancel=True)
        except trio.Cancelled:
            # Finished before the cancellation: the connection is as sound as it was.
            if not running.cancel() and self._held is held:
                self._held = None
            raise

    def _give_up(self, held: Held) -> None:
        """The connection of the writes is in an unknown state (interrupted in the
        middle of a query): cancel its query on the server, close it and give it back
        to its pool, on a thread of its own; the next write takes another."""
        if self._held is held:
            self._held = None

        def give_up() -> None:
            connection = held.connection
            try:
                connection.cancel_safe(timeout=5.0)
            except Exception as exc:  # it is closed anyway
                logger.debug("cancelling a query failed: %r", exc)
            CLOSED.add(connection)
            connection.close()
            give_back(held.pool, connection)

        threading.Thread(target=give_up, name="trio-pgs cancel", daemon=True).start()


def _transaction(
    connection: psycopg.Connection[Any], queries: sql.Queries, operations: list[Operation],
    atomic: bool,
) -> Outcomes:
    """Commit *operations* on *connection*, running the transaction again when the
    server says it did not commit and may be retried (serialization, deadlock). A
    connection lost before COMMIT was sent means nothing was written; lost while
    committing, the outcome is unknown."""
    psycopg, _ = import_psycopg()
    for attempt in range(1, _ATTEMPTS + 1):
        phase = sql.Phase()
        try:
            return sql.apply(connection, queries, operations, atomic, phase)
        except ConflictError:
            raise
        except psycopg.Error as exc:
            if exc.sqlstate in _RETRIED and attempt < _ATTEMPTS and not connection.broken:
                logger.info("a transaction was not committed (%s); running it again",
                            exc.sqlstate)
                time.sleep(0.001 * 2**attempt)
                continue
            raise _failure(exc, phase, connection.broken) from exc
    raise AssertionError("unreachable")  # pragma: no cover


def _failure(exc: Exception, phase: sql.Phase, broken: bool) -> PersistenceError:
    """What a failed transaction tells its callers. An error the server gave before
    COMMIT was sent means nothing was written. Once COMMIT was sent, a lost connection
    (no SQLSTATE, a connection exception, an operator intervention such as a
    terminated backend) leaves the outcome unknown. A statement the server cancelled
    (57014: ``statement_timeout``, a cancel request) on a sound connection was rolled
    back: PostgreSQL does not cancel a commit once its record is written (a cancelled
    wait for a synchronous standby is a warning, the commit standing)."""
    sqlstate = getattr(exc, "sqlstate", None)
    cancelled = sqlstate == _QUERY_CANCELED and not broken
    if phase.committing and not cancelled and (
        broken or sqlstate is None or sqlstate[:2] in ("08", "57")
    ):
        return OutcomeUnknown(
            f"the connection to PostgreSQL failed while committing ({first_line(exc)})"
        )
    return PersistenceError(f"PostgreSQL did not commit: {first_line(exc)}")
