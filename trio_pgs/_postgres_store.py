"""`PostgresStore`: records in a PostgreSQL database, for processes that share them.

psycopg's sync API runs on worker threads, one pooled connection per running
operation (its async API is asyncio-only). Correctness rests on plain SQL: every write
is a conditional UPDATE (or an INSERT that fails on an existing row), claims are an
UPDATE of the stored epoch; nothing depends on advisory locks or LISTEN/NOTIFY, so the
same SQL runs on PostgreSQL-compatible distributed databases. The SQL and the schema
are in `_postgres_sql`.
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
#: Outcomes of `commit_each`, one per operation: None (applied) or why it was not.
Outcomes = list[ConflictError | None]


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

    __slots__ = ("cancelled", "connection", "lock")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.connection: psycopg.Connection[Any] | None = None
        self.cancelled = False

    def cancel(self) -> None:  # on the trio thread
        with self.lock:
            self.cancelled = True
            running = self.connection is not None
        if running:
            threading.Thread(target=self._send_cancel, name="trio-pgs cancel", daemon=True).start()

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
        self._writing = trio.CapacityLimiter(1)

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

        def close() -> None:
            for pool in pools:
                pool.close()

        # Operations abandoned by a cancellation give their connections back (or close
        # them) when they finish; the pools close what they hold. On a thread started
        # here, so that the pools close even when the caller is already cancelled.
        closing = threading.Thread(target=close, name="trio-pgs close", daemon=True)
        closing.start()
        await trio.to_thread.run_sync(closing.join, abandon_on_cancel=True)

    # -- running on a connection -----------------------------------------------------

    async def _run(
        self, work: Callable[[psycopg.Connection[Any]], T], *, write: bool = False
    ) -> T:
        """Run *work* with a pooled connection on a worker thread (*write*: the
        connection of the writes). Cancelled, the caller stops waiting at once, the
        query is cancelled on the server, and the connection is closed once *work*
        returns (its outcome is unknown to the caller, as with any cancelled store
        operation)."""
        pool = self._writes if write else self._pool
        if pool is None:
            raise PersistenceError(f"{self!r} is not open (open a supervisor on it)")
        running = _Running()

        def job() -> T:
            return _attempt(pool, running, work)

        try:
            return await trio.to_thread.run_sync(
                job, abandon_on_cancel=True, limiter=self._writing if write else self._limiter
            )
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
        for operation in operations:
            _check_ident(*sql.ident(operation))
        if not operations:
            await trio.lowlevel.checkpoint()
            return []
        queries = self._queries

        def commit(connection: psycopg.Connection[Any]) -> Outcomes:
            return _transaction(connection, queries, operations, atomic)

        return await self._run(commit, write=True)

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
            if (
                exc.sqlstate in _RETRIED and attempt < _ATTEMPTS and not connection.broken
                and not phase.committed
            ):
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

