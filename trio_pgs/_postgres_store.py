"""`PostgresStore`: records in a PostgreSQL database, for processes that share them.

psycopg's sync API runs on worker threads, one pooled connection per running
operation (its async API is asyncio-only). The writes have a connection of their own,
held from one batch to the next; the group-commit writer's usual batch, one prepared
statement, goes from the trio thread through libpq's non-blocking calls, trio waiting
on the socket: no thread hop, no pool checkout, no cursor (`PostgresStore._bulk`).

Correctness rests on plain SQL: every write is a conditional UPDATE (or an INSERT that
fails on an existing row), claims are an UPDATE of the stored epoch; nothing depends on
advisory locks or LISTEN/NOTIFY, so the same SQL runs on PostgreSQL-compatible
distributed databases. The SQL and the schema are in `_postgres_sql`.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import re
import select
import threading
import time
import urllib.parse
import weakref
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import trio

from . import _postgres_members as members
from . import _postgres_sql as sql
from ._errors import ConflictError, OutcomeUnknown, PersistenceError
from ._schedule import Due, unpack_reminders
from ._store import Claim, Member, OnSkip, Operation, Record

if TYPE_CHECKING:
    import psycopg
    import psycopg_pool

T = TypeVar("T")
logger = logging.getLogger("trio_pgs.store")

_SCAN_CHUNK = 1000
#: The most bytes a kind and a key may take together: a btree index entry holds at
#: most 2,704 bytes (PostgreSQL's page size / 3), with room to spare for its header.
_MAX_IDENT_BYTES = 2_600
#: The setting of the connections that load and claim. A claim is an UPDATE whose
#: commit need not wait for the WAL flush: it is durable with the next durable commit
#: of anyone (the WAL is one sequence), at the latest the activation's first write,
#: and no acknowledged update rests on it alone (every write is also checked on its
#: version). Decision 39 in docs/decisions.md.
_ASYNC_COMMIT = "-c synchronous_commit=off"
_SCHEMA_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
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
#: The statements prepared on each connection of the writes (`PostgresStore._bulk`).
_PREPARED: weakref.WeakKeyDictionary[Any, set[bytes]] = weakref.WeakKeyDictionary()


def _psycopg() -> Any:
    try:
        import psycopg
        import psycopg_pool
    except ImportError as exc:
        raise ImportError(
            f"PostgresStore needs psycopg 3 and psycopg_pool ({exc}); install the "
            "extra: pip install 'trio-pgs[postgres]'"
        ) from exc
    return psycopg, psycopg_pool


class _Abandoned(Exception):
    """Raised in a worker thread whose caller stopped waiting before it began."""


class _Running:
    """One operation on a pooled connection, which trio may cancel: the cancel is sent
    to the server (`cancel_safe`) if a query is running, and the connection, which a
    late cancel could still reach, is closed instead of going back to the pool."""

    __slots__ = ("cancelled", "connection", "finished", "lock")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.connection: psycopg.Connection[Any] | None = None
        self.cancelled = False
        #: Set by an operation that keeps its connection (`PostgresStore._on_thread`)
        #: once it is done with it.
        self.finished = False

    def cancel(self) -> bool:  # on the trio thread
        """Cancel the operation; return whether it had finished already."""
        with self.lock:
            self.cancelled = True
            running = self.connection is not None
            finished = self.finished
        if running:
            threading.Thread(target=self._send_cancel, name="trio-pgs cancel", daemon=True).start()
        return finished

    def _send_cancel(self) -> None:
        with self.lock:  # held: the operation cannot hand the connection on meanwhile
            if self.connection is None:
                return
            try:
                self.connection.cancel_safe(timeout=5.0)
            except Exception as exc:  # the connection is closed after anyway
                logger.debug("cancelling a query failed: %r", exc)


class PostgresStore:
    """Keeps records in the tables of one PostgreSQL schema (``trio_pgs`` by default),
    which it creates, and upgrades, when it opens.

    *dsn* is a libpq connection string or URL (``postgresql://user@host/db``).
    *pool_size* bounds the connections (and threads) the store uses at once: one
    commits the writer's batches, the others load and claim. *read_only*: the store
    never writes and never creates or upgrades its tables (the CLI's read commands).
    *create*: False refuses to open a schema that holds no store yet, instead of
    creating its tables (the CLI's commands but import).
    *connect_timeout* bounds, in seconds, each wait for a connection.

    It offers every capability: kinds, reporting scans, claims, and batches whose
    operations commit or conflict each on its own (`commit_each`).
    """

    def __init__(
        self,
        dsn: str,
        *,
        schema: str = "trio_pgs",
        pool_size: int = 8,
        read_only: bool = False,
        create: bool = True,
        connect_timeout: float = 10.0,
    ) -> None:
        _psycopg()
        if not isinstance(dsn, str) or not dsn:
            raise ValueError("PostgresStore needs a connection string (dsn), such as "
                             "'postgresql://user@localhost/db'")
        if not isinstance(schema, str) or not _SCHEMA_NAME.fullmatch(schema):
            raise ValueError(
                f"schema must be a plain SQL name (letters, digits and _, not starting "
                f"with a digit, at most 63 characters), not {schema!r}"
            )
        if type(pool_size) is not int or pool_size < 1:
            raise ValueError(f"pool_size must be an int, 1 or more, not {pool_size!r}")
        if (
            not isinstance(connect_timeout, (int, float)) or isinstance(connect_timeout, bool)
            or not 0 < connect_timeout < 86_400
        ):
            raise ValueError(
                f"connect_timeout must be a number of seconds above 0 and below a day, not "
                f"{connect_timeout!r}"
            )
        self.dsn = dsn
        self.schema = schema
        self.pool_size = pool_size
        self.read_only = read_only
        self.create = create
        self.connect_timeout = connect_timeout
        self._queries = sql.Queries(schema)
        self._secret = _Secret(dsn)
        #: Loads, scans and claims, on connections whose commits do not wait for the
        #: WAL flush (`_ASYNC_COMMIT`); and the writes, on one connection that does.
        self._pool: psycopg_pool.ConnectionPool[Any] | None = None
        self._writes: psycopg_pool.ConnectionPool[Any] | None = None
        self._opening = False
        self._limiter = trio.CapacityLimiter(pool_size)
        #: The connection of the writes, taken from `_writes` and held between them.
        self._held: _Held | None = None
        #: One write at a time on it.
        self._writing = trio.Lock()

    def __repr__(self) -> str:
        mode = ", read_only=True" if self.read_only else ""
        return f"PostgresStore({self._secret.masked!r}, schema={self.schema!r}{mode})"

    # -- opening and closing ---------------------------------------------------------

    async def open(self) -> None:
        if self._pool is not None or self._opening:
            raise ValueError(f"{self!r} is already open in another supervisor")
        self._opening = True
        abandoned = threading.Event()

        def open_pools() -> tuple[Any, Any]:
            pools = self._open()
            if abandoned.is_set():  # nobody waits for them any more
                for pool in pools:
                    if pool is not None:
                        pool.close()
            return pools

        try:
            pools = await trio.to_thread.run_sync(open_pools, abandon_on_cancel=True)
        except BaseException:
            abandoned.set()
            raise
        finally:
            self._opening = False
        self._pool, self._writes = pools

    def _open(
        self,
    ) -> tuple[psycopg_pool.ConnectionPool[Any], psycopg_pool.ConnectionPool[Any] | None]:
        pg, pg_pool = _psycopg()
        kwargs: dict[str, Any] = {
            "autocommit": True, "connect_timeout": max(1, round(self.connect_timeout)),
        }
        given = _given_options(pg, self.dsn)
        if self.read_only:
            given = f"{given} -c default_transaction_read_only=on".strip()
        if given:
            kwargs["options"] = given
        try:
            # One connection first, outside the pool: its error says what is wrong
            # (the pool would only time out), and it prepares the schema.
            with pg.connect(self.dsn, **kwargs) as connection:
                sql.prepare(
                    connection, self._queries, read_only=self.read_only, create=self.create
                )
        except pg.Error as exc:
            raise PersistenceError(
                f"{self!r} could not be opened: {self._secret.scrub(_first_line(exc))}"
            ) from None
        reads = {**kwargs, "options": f"{kwargs.get('options', '')} {_ASYNC_COMMIT}".strip()}
        pools = []
        wanted = [("reads", self.pool_size, reads)]
        if not self.read_only:
            wanted.append(("writes", 1, kwargs))
        for name, size, options in wanted:
            pool: psycopg_pool.ConnectionPool[Any] = pg_pool.ConnectionPool(
                self.dsn, min_size=1, max_size=size, kwargs=options, open=False,
                timeout=self.connect_timeout, name=f"trio-pgs {name}", check=_check_idle,
            )
            pools.append(pool)
            try:
                pool.open(wait=True, timeout=self.connect_timeout)
            except pg_pool.PoolTimeout:
                for opened in pools:
                    opened.close()
                raise PersistenceError(
                    f"{self!r} could not be opened: no connection within "
                    f"{self.connect_timeout} s"
                ) from None
        return pools[0], (pools[1] if len(pools) > 1 else None)

    async def close(self) -> None:
        pools = [pool for pool in (self._pool, self._writes) if pool is not None]
        self._pool = self._writes = None
        held = None
        if not self._writing.locked():  # else the write gives it back when it ends
            held, self._held = self._held, None

        def close() -> None:
            if held is not None:
                _give_back(held.pool, held.connection)
            for pool in pools:
                pool.close()

        # Operations abandoned by a cancellation give their connections back (or close
        # them) when they finish; the pools close what they hold. On a thread started
        # here, so that the pools close even when the caller is already cancelled.
        closing = threading.Thread(target=close, name="trio-pgs close", daemon=True)
        closing.start()
        await trio.to_thread.run_sync(closing.join, abandon_on_cancel=True)

    # -- running on a connection -----------------------------------------------------

    async def _run(self, work: Callable[[psycopg.Connection[Any]], T]) -> T:
        """Run *work* with a pooled connection on a worker thread (the pool of loads,
        claims and membership). Cancelled, the caller stops waiting at once, the
        query is cancelled on the server, and the connection is closed once *work*
        returns (its outcome is unknown to the caller, as with any cancelled store
        operation)."""
        pool = self._pool
        if pool is None:
            raise PersistenceError(f"{self!r} is not open (open a supervisor on it)")
        running = _Running()

        def job() -> T:
            return _attempt(pool, running, work)

        try:
            return await trio.to_thread.run_sync(job, abandon_on_cancel=True, limiter=self._limiter)
        except trio.Cancelled:
            running.cancel()
            raise
        except PersistenceError as exc:
            raise type(exc)(self._secret.scrub(str(exc))) from exc.__cause__

    # -- reading ---------------------------------------------------------------------

    async def load(self, kind: str, key: str) -> Record | None:
        _check_ident(kind, key)
        query = self._queries.load

        def load(connection: psycopg.Connection[Any]) -> Record | None:
            row = _read(connection, query, (kind, key), f"{kind}/{key}").fetchone()
            return None if row is None else decode(row)

        return await self._run(load)

    async def due(
        self, kinds: Sequence[str], *, after: Due | None = None, limit: int = 1000
    ) -> list[Due]:
        """The due index (`SupportsReminders`): a page of the partial index on
        ``(due, kind, key)``, in its order."""
        kinds = list(kinds)
        for kind in kinds:
            _check_ident(kind, "-")
        queries = self._queries
        params: tuple[Any, ...]
        if after is None:
            query, params = queries.due_first, (kinds, limit)
        else:
            query, params = queries.due_after, (kinds, after.due, after.kind, after.key, limit)

        def due(connection: psycopg.Connection[Any]) -> list[Due]:
            rows = _read(connection, query, params, "the due index").fetchall()
            return [Due(float(d), k, n) for d, k, n in rows]

        return await self._run(due)

    async def kinds(self) -> set[str]:
        query = self._queries.kinds

        def kinds(connection: psycopg.Connection[Any]) -> set[str]:
            return {row[0] for row in _read(connection, query, (), "kinds").fetchall()}

        return await self._run(kinds)

    async def scan(self, kind: str, *, on_skip: OnSkip | None = None) -> AsyncIterator[Record]:
        """The records of *kind*, in key order, read a page at a time through the
        primary key's index. A row that is not a valid record is skipped: ``on_skip(key,
        error)`` is told of it if given, else a warning is logged."""
        _check_ident(kind, "-")  # the kind alone
        after: str | None = None  # the first page: from the start, an empty key included
        while True:
            rows = await self._run(functools.partial(_page, self._queries, kind, after))
            for row in rows:
                try:
                    record = decode(row)
                except PersistenceError as exc:
                    if on_skip is not None:
                        on_skip(str(row[1]), exc)
                    else:
                        logger.warning("scan skipped %s/%s: %s", kind, row[1], exc,
                                       extra={"kind": kind, "key": row[1]})
                    continue
                yield record
            if len(rows) < _SCAN_CHUNK:
                return
            after = rows[-1][1]

    # -- membership ------------------------------------------------------------------

    async def join(
        self, supervisor: str, node: str, *, address: str, clustered: bool, lease: float,
        host: str, pid: int, proof: str = "",
    ) -> int:
        self._writable()
        schema = self._queries.schema

        def join(connection: psycopg.Connection[Any]) -> int:
            return members.join(
                connection, schema, supervisor, node, address=address, clustered=clustered,
                lease=lease, host=host, pid=pid, proof=proof,
            )

        return await self._run(join)

    async def renew(
        self, supervisor: str, node: str, incarnation: int, *, lease: float, active: int,
        leaving: bool,
    ) -> tuple[Member, ...] | None:
        self._writable()
        schema = self._queries.schema

        def renew(connection: psycopg.Connection[Any]) -> tuple[Member, ...] | None:
            return members.renew(
                connection, schema, supervisor, node, incarnation, lease=lease,
                active=active, leaving=leaving,
            )

        return await self._run(renew)

    async def leave(self, supervisor: str, node: str, incarnation: int) -> None:
        self._writable()
        schema = self._queries.schema
        await self._run(
            lambda connection: members.leave(connection, schema, supervisor, node, incarnation)
        )

    async def members(self, supervisor: str | None = None) -> tuple[Member, ...]:
        schema = self._queries.schema
        return await self._run(
            lambda connection: members.members(connection, schema, supervisor)
        )

    # -- writing ---------------------------------------------------------------------

    async def claim(self, kind: str, key: str) -> Claim:
        _check_ident(kind, key)
        self._writable()
        query = self._queries.claim

        def claim(connection: psycopg.Connection[Any]) -> Claim:
            row = _read(connection, query, (kind, key), f"{kind}/{key}").fetchone()
            if row is None:
                return Claim(record=None, epoch=1, version=0)
            record = decode(row)
            if row[sql.DELETED]:
                return Claim(record=None, epoch=record.epoch, version=record.version)
            return Claim(record=record, epoch=record.epoch, version=record.version)

        return await self._run(claim)

    async def commit(self, operations: Sequence[Operation]) -> None:
        """Apply *operations* in one transaction, all or none: the first whose condition
        fails raises its `ConflictError` and nothing is written."""
        outcomes = await self._commit(operations, atomic=True)
        for outcome in outcomes:
            if outcome is not None:  # pragma: no cover - atomic raises first
                raise outcome

    async def commit_each(self, operations: Sequence[Operation]) -> Outcomes:
        """Apply *operations* in one transaction, each on its own condition: one that
        fails is not applied and its `ConflictError` is returned at its index (so is
        every later operation on the same record); the others are committed."""
        return await self._commit(operations, atomic=False)

    async def _commit(self, operations: Sequence[Operation], *, atomic: bool) -> Outcomes:
        self._writable()
        operations = list(operations)
        bulk = None if atomic else sql.bulk(self._queries, operations)
        if bulk is not None:
            _check_idents(bulk.kinds, bulk.keys)
        else:
            for operation in operations:
                _check_ident(*sql.ident(operation))
        if not operations:
            await trio.lowlevel.checkpoint()
            return []
        try:
            return await self._write(operations, atomic, bulk)
        except PersistenceError as exc:
            raise type(exc)(self._secret.scrub(str(exc))) from exc.__cause__

    async def _write(
        self, operations: list[Operation], atomic: bool, bulk: sql.Bulk | None
    ) -> Outcomes:
        """Commit *operations* on the connection of the writes, one batch at a time:
        the writer's usual batch (*bulk*) as one statement from the trio thread
        (`_bulk`), any other in a transaction on a worker thread."""
        queries = self._queries

        def commit(connection: psycopg.Connection[Any]) -> Outcomes:
            return _transaction(connection, queries, operations, atomic)

        async with self._writing:
            try:
                held = await self._write_connection()
                if bulk is not None:
                    return await self._bulk(held, operations, bulk)
                return await self._on_thread(held, commit)
            finally:
                left = self._held
                if left is not None and left.pool is not self._writes:  # closed meanwhile
                    self._held = None
                    _give_back(left.pool, left.connection)  # its pool closes it

    async def _bulk(self, held: _Held, operations: list[Operation], bulk: sql.Bulk) -> Outcomes:
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
        self, held: _Held, statement: tuple[bytes, bytes], values: list[bytes],
        formats: list[int],
    ) -> Any:
        """The result of *statement* run with *values*, as a statement prepared on the
        connection (as psycopg prepares a query it runs often: the server parses and
        plans it once, not for every batch). Run again when the server says it did
        not commit and may be retried; any other error raised."""
        pg, _ = _psycopg()
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
                    held, pgconn.send_query_prepared, name, values, formats
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

    async def _execute(self, held: _Held, send: Callable[..., None], *args: Any) -> Any:
        """``send(*args)``, one of libpq's calls that send a query, on the connection of
        the writes, from the trio thread without blocking it: libpq's non-blocking
        calls, trio waiting on the socket. Returns its result, an error of the
        server's included. Interrupted (a lost connection, a cancellation), the
        connection is given up: its query cancelled on the server, then closed."""
        pg, _ = _psycopg()
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
                    f"the connection to PostgreSQL failed while committing ({_first_line(exc)})"
                ) from exc
            raise
        if result is None:  # pragma: no cover - libpq gives a result for every query
            raise PersistenceError("PostgreSQL returned nothing for a statement")
        return result

    async def _write_connection(self) -> _Held:
        """The connection of the writes: the one held since the last write, unless the
        database dropped it meanwhile (or it was held `_HOLD` seconds: it goes back to
        its pool); else one from the pool, on a worker thread."""
        held = self._held
        pool = self._writes
        if held is not None:
            sound = _sound(held.connection)
            if sound and held.pool is pool and time.monotonic() < held.until:
                return held
            self._held = None
            if not sound:  # the pool discards it, without a query on this thread
                _CLOSED.add(held.connection)
                held.connection.close()
            _give_back(held.pool, held.connection)
        if pool is None:
            raise PersistenceError(f"{self!r} is not open (open a supervisor on it)")
        taken = _Taken()
        try:
            await trio.to_thread.run_sync(taken.take, pool, abandon_on_cancel=True)
        finally:
            connection = taken.abandon()  # taken or not, the trio side decides now
            if connection is not None:
                self._held = _Held(connection, pool, time.monotonic() + _HOLD)
        assert self._held is not None
        return self._held

    async def _on_thread(self, held: _Held, work: Callable[[psycopg.Connection[Any]], T]) -> T:
        """*work* with the connection of the writes, on a worker thread. Cancelled: as
        `_run` (the query is cancelled on the server, and the connection, closed, goes
        back to its pool once *work* returns; the next write takes another)."""
        running = _Running()
        connection = held.connection

        def job() -> T:
            pg, _ = _psycopg()
            with running.lock:
                began = not running.cancelled
                running.connection = connection if began else None
            try:
                if not began:  # abandoned before it began: do nothing
                    raise _Abandoned
                return work(connection)
            except pg.Error as exc:
                raise PersistenceError(f"PostgreSQL failed: {_first_line(exc)}") from exc
            finally:
                with running.lock:
                    running.connection = None
                    running.finished = True
                    if running.cancelled:
                        _CLOSED.add(connection)
                        connection.close()
                        _give_back(held.pool, connection)

        try:
            return await trio.to_thread.run_sync(job, abandon_on_cancel=True)
        except trio.Cancelled:
            # Finished before the cancellation: the connection is as sound as it was.
            if not running.cancel() and self._held is held:
                self._held = None
            raise

    def _give_up(self, held: _Held) -> None:
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
            _CLOSED.add(connection)
            connection.close()
            _give_back(held.pool, connection)

        threading.Thread(target=give_up, name="trio-pgs cancel", daemon=True).start()

    def _writable(self) -> None:
        if self.read_only:
            raise PersistenceError(
                f"{self!r} is read-only; nothing was written. Open it without "
                "read_only=True to change records"
            )


def _attempt(
    pool: psycopg_pool.ConnectionPool[Any], running: _Running,
    work: Callable[[psycopg.Connection[Any]], T],
) -> T:
    """*work* on one pooled connection (the pool's `_check_idle` has weeded out the
    connections the database dropped while they were idle)."""
    pg, pg_pool = _psycopg()
    try:
        with pool.connection() as connection:
            with running.lock:
                if running.cancelled:  # abandoned before it began: do nothing
                    raise _Abandoned
                running.connection = connection
            try:
                return work(connection)
            finally:
                with running.lock:
                    running.connection = None
                    if running.cancelled:
                        _CLOSED.add(connection)
                        connection.close()
    except pg_pool.PoolTimeout:
        raise PersistenceError(
            f"no connection to PostgreSQL within {pool.timeout} s (is the database up?)"
        ) from None
    except pg.Error as exc:  # connecting, or giving the connection back
        raise PersistenceError(f"PostgreSQL failed: {_first_line(exc)}") from exc


class _Held:
    """The connection of the writes, its pool, and until when it is held."""

    __slots__ = ("connection", "pool", "until")

    def __init__(
        self, connection: psycopg.Connection[Any], pool: psycopg_pool.ConnectionPool[Any],
        until: float,
    ) -> None:
        self.connection = connection
        self.pool = pool
        self.until = until


class _Taken:
    """A connection taken from a pool on a worker thread, for a trio caller who may
    stop waiting: whichever comes last, the taking or the caller's giving up
    (`abandon`), sees the other; a connection nobody will use goes back at once."""

    __slots__ = ("abandoned", "connection", "lock")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.connection: psycopg.Connection[Any] | None = None
        self.abandoned = False

    def take(self, pool: psycopg_pool.ConnectionPool[Any]) -> None:  # on a worker thread
        pg, pg_pool = _psycopg()
        try:
            connection = pool.getconn()
        except pg_pool.PoolTimeout:
            raise PersistenceError(
                f"no connection to PostgreSQL within {pool.timeout} s (is the database up?)"
            ) from None
        except pg.Error as exc:
            raise PersistenceError(f"PostgreSQL failed: {_first_line(exc)}") from exc
        with self.lock:
            if not self.abandoned:
                self.connection = connection
                return
        _give_back(pool, connection)

    def abandon(self) -> psycopg.Connection[Any] | None:  # on the trio thread
        """The connection taken, if it was: the caller's now."""
        with self.lock:
            self.abandoned = True
            return self.connection


def _give_back(
    pool: psycopg_pool.ConnectionPool[Any], connection: psycopg.Connection[Any]
) -> None:
    """Return a connection of the writes to its pool, which discards it if it is
    closed (a closed pool closes it)."""
    try:
        pool.putconn(connection)
    except Exception as exc:  # a closed pool, say: the connection goes all the same
        logger.debug("giving a connection back failed: %r", exc)
        connection.close()


def _sound(connection: psycopg.Connection[Any]) -> bool:
    """Whether a connection held idle can run a query: open, not in a transaction,
    and not dropped by the database (`_check_idle`)."""
    pg, _ = _psycopg()
    if connection.pgconn.transaction_status != pg.pq.TransactionStatus.IDLE:
        return False
    try:
        _check_idle(connection)
    except pg.Error:
        return False
    return True


def _given_options(pg: Any, dsn: str) -> str:
    """The ``options`` the DSN (or else PGOPTIONS) gives: the store's own settings go
    after them, never instead."""
    try:
        options = pg.conninfo.conninfo_to_dict(dsn).get("options")
    except pg.Error:
        options = None  # connecting will say what is wrong with the DSN
    return str(options if options is not None else os.environ.get("PGOPTIONS", "")).strip()


def _check_idle(connection: psycopg.Connection[Any]) -> None:
    """The pool's check of a connection it hands out, without a round trip: an idle
    connection has nothing to read, unless the database dropped it meanwhile (a
    restart, a failover, a terminated backend, an idle timeout sends an error and
    closes). Such a connection is discarded and another one taken, instead of failing
    the operation that would use it."""
    pg, _ = _psycopg()
    if connection.closed or connection.broken:
        raise pg.OperationalError("closed")
    readable, _, _ = select.select([connection.fileno()], [], [], 0)
    if readable:
        connection.close()  # so that the pool discards it, and replaces it
        raise pg.OperationalError("the database dropped this connection while it was idle")


def _transaction(
    connection: psycopg.Connection[Any], queries: sql.Queries, operations: list[Operation],
    atomic: bool,
) -> Outcomes:
    """Commit *operations* on *connection*, running the transaction again when the
    server says it did not commit and may be retried (serialization, deadlock). A
    connection lost before COMMIT was sent means nothing was written; lost while
    committing, the outcome is unknown."""
    psycopg, _ = _psycopg()
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
    terminated backend) leaves the outcome unknown."""
    sqlstate = getattr(exc, "sqlstate", None)
    if phase.committing and (broken or sqlstate is None or sqlstate[:2] in ("08", "57")):
        return OutcomeUnknown(
            f"the connection to PostgreSQL failed while committing ({_first_line(exc)})"
        )
    return PersistenceError(f"PostgreSQL did not commit: {_first_line(exc)}")


def _page(
    queries: sql.Queries, kind: str, after: str | None, connection: psycopg.Connection[Any]
) -> list[tuple[Any, ...]]:
    if after is None:
        return _read(connection, queries.scan_first, (kind, _SCAN_CHUNK), kind).fetchall()
    return _read(connection, queries.scan, (kind, after, _SCAN_CHUNK), kind).fetchall()


def _read(
    connection: psycopg.Connection[Any], query: str, params: tuple[Any, ...], what: str
) -> psycopg.Cursor[Any]:
    psycopg, _ = _psycopg()
    try:
        return connection.execute(query, params, binary=True)
    except psycopg.Error as exc:
        raise PersistenceError(f"{what}: PostgreSQL failed: {_first_line(exc)}") from exc


def decode(row: Sequence[Any]) -> Record:
    """The record in a row of the records table (`sql.COLUMNS`), checked: what the
    schema cannot rule out (NULL data, NULL, non-finite or nested array items, an empty
    key, versions below 1) is refused with `PersistenceError`."""
    kind, key = row[0], row[1]
    try:
        problem = _problem(row)
    except (TypeError, ValueError) as exc:
        problem = f"{type(exc).__name__}: {exc}"
    if problem is not None:
        raise PersistenceError(
            f"{kind}/{key}: the stored row is not a valid trio-pgs record ({problem}); "
            "inspect or purge it"
        )
    _, _, version, epoch, _, data, state_version, updated_at, crashes, quarantined, \
        history, reminders = row
    return Record(
        kind=kind, key=key, data=bytes(data or b""), version=version,
        state_version=state_version, epoch=epoch, updated_at=updated_at,
        crashes=tuple(crashes), quarantined=quarantined, history=tuple(history),
        reminders=unpack_reminders(reminders),
    )


def _problem(row: Sequence[Any]) -> str | None:
    kind, key, version, epoch, deleted, data, state_version, updated_at, crashes, \
        _, history, reminders = row
    if not kind or not key:
        return "its kind or key is empty"
    if version < 1 or epoch < 0 or state_version < 1:
        return "its version or state_version is below 1, or its epoch below 0"
    if data is None and not deleted:
        return "it has no data"
    if not all(type(t) is float and math.isfinite(t) for t in crashes):
        return "its crash times are not all numbers"
    if not all(type(old) is bytes for old in history):
        return "its history does not hold states only"
    if not math.isfinite(updated_at):
        return "its updated_at is not a number"
    try:
        unpack_reminders(reminders)
    except ValueError as exc:
        return f"its reminders are not what trio-pgs writes: {exc}"
    return None


def _check_ident(kind: str, key: str) -> None:
    if not isinstance(kind, str) or not isinstance(key, str):
        raise TypeError("kinds and keys are strings")
    if "\x00" in kind or "\x00" in key:
        raise ValueError(f"PostgreSQL text cannot hold a NUL character: {kind!r}/{key!r}")
    try:
        size = len(kind.encode()) + len(key.encode())
    except UnicodeEncodeError:
        raise ValueError(
            f"PostgreSQL text holds UTF-8, which a lone surrogate is not: {kind!r}/{key!r}"
        ) from None
    if size > _MAX_IDENT_BYTES:
        raise ValueError(
            f"a kind and key of {size} bytes in UTF-8 do not fit the records' index "
            f"(at most {_MAX_IDENT_BYTES} bytes together): {kind[:40]!r}/{key[:40]!r}..."
        )
    if not kind or not key:
        raise ValueError(f"a kind and a key are non-empty strings, not {kind!r}/{key!r}")


def _check_idents(kinds: list[str], keys: list[str]) -> None:
    """`_check_ident` of each kind and key (strings, by `sql.bulk`), at once for the
    usual ones: ASCII, no NUL, none empty, the longest kind and key fitting together."""
    joined = "".join(kinds) + "".join(keys)
    if not (
        joined.isascii() and "\x00" not in joined and min(map(len, kinds)) > 0
        and min(map(len, keys)) > 0
        and max(map(len, kinds)) + max(map(len, keys)) <= _MAX_IDENT_BYTES
    ):
        for kind, key in zip(kinds, keys, strict=True):
            _check_ident(kind, key)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


class _Secret:
    """What of a DSN must never be shown: its password, in a URL's user information
    or as a ``password`` parameter. `masked` is the DSN without it; `scrub` takes it
    (and the whole DSN) out of a message, such as libpq's, which may quote them."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        passwords = []
        scheme, sep, rest = dsn.partition("://")
        masked = dsn
        if sep:
            authority = rest.split("?", 1)[0]
            userinfo, at, _ = authority.rpartition("@")
            user, colon, password = userinfo.partition(":")
            if at and colon and password:
                passwords.append(password)
                masked = f"{scheme}://{user}:***@{rest[len(userinfo) + 1:]}"
        for match in _PASSWORD_PARAMETER.finditer(dsn):
            value = match.group(2)
            if value:
                passwords.append(value.strip("'"))
        masked = _PASSWORD_PARAMETER.sub(r"\1***", masked)
        self.masked = masked
        self._passwords = sorted(
            {p for p in passwords} | {urllib.parse.unquote(p) for p in passwords},
            key=len, reverse=True,
        )

    def scrub(self, text: str) -> str:
        text = text.replace(self.dsn, self.masked)
        for password in self._passwords:
            text = text.replace(password, "***")
        return text


def without_password(dsn: str) -> str:
    """*dsn* fit for a message: its password hidden."""
    return _Secret(dsn).masked


_PASSWORD_PARAMETER = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|[^&\s]*)", re.IGNORECASE)
#: Connections closed after a cancellation: the pool's warning about each is expected.
_CLOSED: weakref.WeakSet[Any] = weakref.WeakSet()


class _ExpectedDiscard(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (
            record.msg == "discarding closed connection: %s"
            and bool(record.args) and isinstance(record.args, tuple)
            and record.args[0] in _CLOSED
        )


logging.getLogger("psycopg.pool").addFilter(_ExpectedDiscard())

