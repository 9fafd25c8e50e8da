"""An activation's claim, sent from the trio thread.

An activation begins with its claim (`PostgresStore.claim`): one ``UPDATE ...
RETURNING`` round trip. Through a worker thread it also costs a hop each way, as
much as the statement itself here (a ``SELECT`` of one row: 80 to 135 us from a
blocking client, 285 to 290 us through ``trio.to_thread``). So a claim goes the way
of the writes' batch instead (`Writes.run`): a statement prepared on a connection held
between claims, sent through libpq's non-blocking calls while trio waits on the
socket. That connection is the store's claims pool, of one connection whose commits,
as the other claims', do not wait for the WAL flush (decision 39).

One claim at a time goes this way. A claim made while another is under way (a burst
of activations) goes to the worker threads of the pool of reads, as every claim did
before: a burst is spread over that pool, and never waits behind one connection.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import _postgres_sql as sql
from ._errors import PersistenceError
from ._postgres_conn import first_line, import_psycopg
from ._postgres_writes import Writes

if TYPE_CHECKING:
    import psycopg_pool


class Claims:
    """The claims of one store sent from the trio thread, on a pool of one connection
    (`pool`, None while the store is closed). *owner* names the store in errors."""

    def __init__(self, queries: sql.Queries, owner: object) -> None:
        self._statement = queries.claim_libpq
        self._line = Writes(queries, owner)

    @property
    def pool(self) -> psycopg_pool.ConnectionPool[Any] | None:
        return self._line.pool

    @pool.setter
    def pool(self, pool: psycopg_pool.ConnectionPool[Any] | None) -> None:
        self._line.pool = pool

    @property
    def free(self) -> bool:
        """Whether a claim may go this way now: the store is open with its claims pool,
        and no other claim is using it."""
        return self._line.pool is not None and not self._line.busy

    def let_go(self) -> Any:
        """At close: as `Writes.let_go`."""
        return self._line.let_go()

    async def claim(self, kind: str, key: str) -> tuple[Any, ...] | None:
        """Claim *kind*/*key*: the row the claim returned, as a worker thread's cursor
        would have it, or None if there is no such row. A failure is a
        `PersistenceError`; as with any claim, it may have raised the row's epoch."""
        connection, result = await self._line.run(
            self._statement, lambda encoding: [kind.encode(encoding), key.encode(encoding)]
        )
        if result.ntuples == 0:
            return None
        from psycopg.adapt import Transformer  # the store is open: psycopg is there

        transformer = Transformer(connection)
        transformer.set_pgresult(result)
        row: tuple[Any, ...] = transformer.load_row(0, tuple)
        return row


def claim_failed(
    what: str, exc: PersistenceError, scrub: Callable[[str], str]
) -> PersistenceError:
    """The error of a failed claim of *what*, worded as the worker threads' claims
    word theirs: PostgreSQL's own first line if it said something, else what the
    store said (no connection within the timeout, the store closed). *scrub* takes
    the DSN's secrets out of it."""
    psycopg, _ = import_psycopg()
    cause = exc.__cause__
    if isinstance(cause, psycopg.Error):
        return PersistenceError(scrub(f"{what}: PostgreSQL failed: {first_line(cause)}"))
    return PersistenceError(scrub(str(exc)))
