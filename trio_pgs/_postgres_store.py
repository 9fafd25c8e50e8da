"""`PostgresStore`: records in a PostgreSQL database, for processes that share them.

psycopg's sync API runs on worker threads, one pooled connection per running
operation (its async API is asyncio-only). The writes have a connection of their own,
held from one batch to the next; the group-commit writer's usual batch, one prepared
statement, goes from the trio thread through libpq's non-blocking calls, trio waiting
on the socket: no thread hop, no pool checkout, no cursor (`_postgres_writes`).

Correctness rests on plain SQL: every write is a conditional UPDATE (or an INSERT that
fails on an existing row), claims are an UPDATE of the stored epoch; nothing depends on
advisory locks or LISTEN/NOTIFY, so the same SQL runs on PostgreSQL-compatible
distributed databases. The SQL and the schema are in `_postgres_sql`; the connections
from trio in `_postgres_conn`; the checks of what goes in and out of a row in
`_postgres_rows`.
"""

from __future__ import annotations

import functools
import logging
import re
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import trio

from . import _postgres_members as members
from . import _postgres_sql as sql
from ._errors import PersistenceError
from ._postgres_claims import Claims, claim_failed
from ._postgres_conn import (
    Running,
    Secret,
    attempt,
    check_idle,
    first_line,
    give_back,
    given_options,
    import_psycopg,
    read,
)
from ._postgres_rows import check_ident, check_idents, decode
from ._postgres_writes import Outcomes, Writes
from ._schedule import Due
from ._store import Claim, Member, OnSkip, Operation, Record

if TYPE_CHECKING:
    import psycopg
    import psycopg_pool


T = TypeVar("T")
logger = logging.getLogger("trio_pgs.store")

_SCAN_CHUNK = 1000

#: The setting of the connections that load and claim. A claim is an UPDATE whose
#: commit need not wait for the WAL flush: it is durable with the next durable commit
#: of anyone (the WAL is one sequence), at the latest the activation's first write,
#: and no acknowledged update rests on it alone (every write is also checked on its
#: version). Decision 39 in docs/decisions.md.
_ASYNC_COMMIT = "-c synchronous_commit=off"
_SCHEMA_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")


class PostgresStore:
    """Keeps records in the tables of one PostgreSQL schema (``trio_pgs`` by default),
    which it creates, and upgrades, when it opens.

    *dsn* is a libpq connection string or URL (``postgresql://user@host/db``).
    *pool_size* bounds the connections (and threads) that load and claim at once;
    the writer's batches have one more connection of their own, and so do the claims
    sent from the trio thread (one at a time; `_postgres_claims`). *read_only*: the store
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
        import_psycopg()
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
        self._secret = Secret(dsn)
        #: Loads, scans and claims, on connections whose commits do not wait for the
        #: WAL flush (`_ASYNC_COMMIT`); and the writes, on one connection that does.
        self._pool: psycopg_pool.ConnectionPool[Any] | None = None
        self._writes = Writes(self._queries, self)
        #: Claims one at a time from the trio thread, on a pool of their own.
        self._claims = Claims(self._queries, self)
        self._opening = False
        self._limiter = trio.CapacityLimiter(pool_size)

    def __repr__(self) -> str:
        mode = ", read_only=True" if self.read_only else ""
        return f"PostgresStore({self._secret.masked!r}, schema={self.schema!r}{mode})"

    # -- opening and closing ---------------------------------------------------------

    async def open(self) -> None:
        if self._pool is not None or self._opening:
            raise ValueError(f"{self!r} is already open in another supervisor")
        self._opening = True
        abandoned = threading.Event()

        def open_pools() -> tuple[Any, Any, Any]:
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
        self._pool, self._writes.pool, self._claims.pool = pools

    def _open(self) -> tuple[Any, Any, Any]:
        """The pools: of reads, of the writes and of the claims (None when read-only)."""
        pg, pg_pool = import_psycopg()
        kwargs: dict[str, Any] = {
            "autocommit": True, "connect_timeout": max(1, round(self.connect_timeout)),
        }
        given = given_options(pg, self.dsn)
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
                f"{self!r} could not be opened: {self._secret.scrub(first_line(exc))}"
            ) from None
        reads = {**kwargs, "options": f"{kwargs.get('options', '')} {_ASYNC_COMMIT}".strip()}
        pools = []
        wanted = [("reads", self.pool_size, reads)]
        if not self.read_only:
            wanted.append(("writes", 1, kwargs))
            wanted.append(("claims", 1, reads))
        for name, size, options in wanted:
            pool: psycopg_pool.ConnectionPool[Any] = pg_pool.ConnectionPool(
                self.dsn, min_size=1, max_size=size, kwargs=options, open=False,
                timeout=self.connect_timeout, name=f"trio-pgs {name}", check=check_idle,
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
        of_reads, of_writes, of_claims = [*pools, None, None][:3]  # the last two: writable
        return of_reads, of_writes, of_claims

    async def close(self) -> None:
        pools = [pool for pool in (self._pool, self._writes.pool, self._claims.pool)
                 if pool is not None]
        self._pool = self._writes.pool = self._claims.pool = None
        held = [self._writes.let_go(), self._claims.let_go()]

        def close() -> None:
            for one in held:
                if one is not None:
                    give_back(one.pool, one.connection)
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
        running = Running()

        def job() -> T:
            return attempt(pool, running, work)

        try:
            return await trio.to_thread.run_sync(job, abandon_on_cancel=True, limiter=self._limiter)
        except trio.Cancelled:
            running.cancel()
            raise
        except PersistenceError as exc:
            raise type(exc)(self._secret.scrub(str(exc))) from exc.__cause__

    # -- reading ---------------------------------------------------------------------

    async def load(self, kind: str, key: str) -> Record | None:
        check_ident(kind, key)
        query = self._queries.load

        def load(connection: psycopg.Connection[Any]) -> Record | None:
            row = read(connection, query, (kind, key), f"{kind}/{key}").fetchone()
            return None if row is None else decode(row)

        return await self._run(load)

    async def due(
        self, kinds: Sequence[str], *, after: Due | None = None, limit: int = 1000
    ) -> list[Due]:
        """The due index (`SupportsReminders`): a page of the partial index on
        ``(due, kind, key)``, in its order."""
        kinds = list(kinds)
        for kind in kinds:
            check_ident(kind, "-")
        queries = self._queries
        params: tuple[Any, ...]
        if after is None:
            query, params = queries.due_first, (kinds, limit)
        else:
            query, params = queries.due_after, (kinds, after.due, after.kind, after.key, limit)

        def due(connection: psycopg.Connection[Any]) -> list[Due]:
            rows = read(connection, query, params, "the due index").fetchall()
            return [Due(float(d), k, n) for d, k, n in rows]

        return await self._run(due)

    async def kinds(self) -> set[str]:
        query = self._queries.kinds

        def kinds(connection: psycopg.Connection[Any]) -> set[str]:
            return {row[0] for row in read(connection, query, (), "kinds").fetchall()}

        return await self._run(kinds)

    async def scan(self, kind: str, *, on_skip: OnSkip | None = None) -> AsyncIterator[Record]:
        """The records of *kind*, in key order, read a page at a time through the
        primary key's index. A row that is not a valid record is skipped: ``on_skip(key,
        error)`` is told of it if given, else a warning is logged."""
        check_ident(kind, "-")  # the kind alone
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
        check_ident(kind, key)
        self._writable()
        if self._claims.free:  # from the trio thread (`_postgres_claims`)
            try:
                row = await self._claims.claim(kind, key)
            except PersistenceError as exc:
                raise claim_failed(f"{kind}/{key}", exc, self._secret.scrub) from exc
            return _claimed(row)
        query = self._queries.claim

        def claim(connection: psycopg.Connection[Any]) -> Claim:
            return _claimed(read(connection, query, (kind, key), f"{kind}/{key}").fetchone())

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
            check_idents(bulk.kinds, bulk.keys)
        else:
            for operation in operations:
                check_ident(*sql.ident(operation))
        if not operations:
            await trio.lowlevel.checkpoint()
            return []
        try:
            return await self._writes.commit(operations, atomic, bulk)
        except PersistenceError as exc:
            raise type(exc)(self._secret.scrub(str(exc))) from exc.__cause__

    def _writable(self) -> None:
        if self.read_only:
            raise PersistenceError(
                f"{self!r} is read-only; nothing was written. Open it without "
                "read_only=True to change records"
            )


def _page(
    queries: sql.Queries, kind: str, after: str | None, connection: psycopg.Connection[Any]
) -> list[tuple[Any, ...]]:
    if after is None:
        return read(connection, queries.scan_first, (kind, _SCAN_CHUNK), kind).fetchall()
    return read(connection, queries.scan, (kind, after, _SCAN_CHUNK), kind).fetchall()


def _claimed(row: Sequence[Any] | None) -> Claim:
    """The claim that returned *row* (None: there was no row)."""
    if row is None:
        return Claim(record=None, epoch=1, version=0)
    record = decode(row)
    if row[sql.DELETED]:
        return Claim(record=None, epoch=record.epoch, version=record.version)
    return Claim(record=record, epoch=record.epoch, version=record.version)
