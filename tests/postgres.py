"""A real PostgreSQL for the tests: the server named by TRIO_PGS_POSTGRES_DSN, or else a
throwaway one started with pgserver (PostgreSQL binaries in a wheel) in a temporary
directory. Each store the tests make gets a schema of its own."""

from __future__ import annotations

import math
import os
import tempfile
import uuid
import warnings
import weakref
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import trio
import trio.testing

from trio_pgs import PostgresStore, Record
from trio_pgs._store import Operation

T = TypeVar("T")
DSN_VARIABLE = "TRIO_PGS_POSTGRES_DSN"


class Server:
    """One PostgreSQL server for the whole test session."""

    def __init__(self) -> None:
        self._stop: Callable[[], None] | None = None
        dsn = os.environ.get(DSN_VARIABLE)
        if not dsn:
            dsn = self._start()
        self.dsn = dsn
        self.schemas: list[str] = []

    def _start(self) -> str:
        directory = tempfile.mkdtemp(prefix="trio-pgs-postgres-")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # platformdirs: XDG_RUNTIME_DIR is not set
            try:
                import pgserver
            except ImportError:
                raise RuntimeError(
                    "the PostgreSQL tests need a server: install pgserver (it has wheels "
                    f"for Python 3.10 to 3.12) or set {DSN_VARIABLE} to a database's DSN"
                ) from None
            server = pgserver.get_server(directory, cleanup_mode="delete")
        self._stop = server.cleanup
        return str(server.get_uri())

    def schema(self) -> str:
        name = "test_" + uuid.uuid4().hex[:20]
        self.schemas.append(name)
        return name

    def store(self, **options: Any) -> PostgresStore:
        """A new, empty store in a schema of its own; autojump clocks wait for it."""
        options.setdefault("schema", self.schema())
        return ClockedPostgresStore(self.dsn, **options)

    def close(self) -> None:
        if self._stop is not None:
            self._stop()
            return
        import psycopg

        with psycopg.connect(self.dsn, autocommit=True) as connection:  # not ours: tidy
            for name in self.schemas:
                connection.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


#: Per mock clock: how many store operations are running, and its threshold before.
_held: weakref.WeakKeyDictionary[trio.testing.MockClock, list[float]] = (
    weakref.WeakKeyDictionary()
)


class _InFlight:
    """The store operations running now, in every ClockedPostgresStore."""

    count = 0
    quiet: trio.Event | None = None

    @classmethod
    def done(cls) -> None:
        cls.count -= 1
        if cls.count == 0 and cls.quiet is not None:
            cls.quiet.set()
            cls.quiet = None


async def wait_all_tasks_blocked(cushion: float = 0.0) -> None:
    """`trio.testing.wait_all_tasks_blocked`, where a task waiting for PostgreSQL is not
    blocked: returns once every task is blocked and no query is running (what the
    same call means with a MemoryStore, whose operations end at once)."""
    while True:
        await _original_wait_all_tasks_blocked(cushion)
        if _InFlight.count == 0:
            return
        if _InFlight.quiet is None:
            _InFlight.quiet = trio.Event()
        await _InFlight.quiet.wait()


_original_wait_all_tasks_blocked = trio.testing.wait_all_tasks_blocked


class ClockedPostgresStore(PostgresStore):
    """A PostgresStore for tests written against a MemoryStore:

    - trio's autojump clock does not jump while a query runs (to the servers, the
      database answers at once, as a MemoryStore does), so a test's timeouts mean what
      they say; with any other clock nothing changes;
    - `wait_all_tasks_blocked` (patched by conftest) waits for running queries too;
    - `load`, `kinds` and `commit` work on the closed store (opening it for the
      call), as a MemoryStore's do, so a test reads what a closed supervisor left, or
      writes what the next one finds.
    """

    async def _run(self, work: Callable[[Any], T]) -> T:
        with _clock_held():
            return await super()._run(work)

    async def open(self) -> None:
        with _clock_held():
            await super().open()

    async def close(self) -> None:
        with _clock_held():
            await super().close()

    async def load(self, kind: str, key: str) -> Record | None:
        if self._pool is not None:
            return await super().load(kind, key)
        await self.open()
        try:
            return await super().load(kind, key)
        finally:
            await self.close()

    async def kinds(self) -> set[str]:
        if self._pool is not None:
            return await super().kinds()
        await self.open()
        try:
            return await super().kinds()
        finally:
            await self.close()

    async def commit(self, operations: Sequence[Operation]) -> None:
        if self._pool is not None:
            return await super().commit(operations)
        await self.open()
        try:
            return await super().commit(operations)
        finally:
            await self.close()


class _clock_held:
    def __enter__(self) -> None:
        _InFlight.count += 1
        clock = trio.lowlevel.current_clock()
        self.clock = clock if isinstance(clock, trio.testing.MockClock) else None
        if self.clock is None:
            return
        held = _held.setdefault(self.clock, [0, 0.0])
        if held[0] == 0:
            held[1] = self.clock.autojump_threshold
            self.clock.autojump_threshold = math.inf
        held[0] += 1

    def __exit__(self, *exc: object) -> None:
        _InFlight.done()
        if self.clock is None:
            return
        held = _held[self.clock]
        held[0] -= 1
        if held[0] == 0:
            self.clock.autojump_threshold = held[1]
