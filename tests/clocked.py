"""Stores on threads, for the behaviour tests written against a MemoryStore: trio's
autojump clock holds still while a store operation runs, so that to the servers the
store answers at once (see `Clocked`)."""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Sequence
from typing import TypeVar

import trio
import trio.testing

from trio_pgs import DiskCacheStore, Record
from trio_pgs._store import Operation

T = TypeVar("T")


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


class Clocked:
    """A mixin for a store on a thread, for tests written against a MemoryStore:

    - trio's autojump clock does not jump while a query runs (to the servers, the
      database answers at once, as a MemoryStore does), so a test's timeouts mean what
      they say; with any other clock nothing changes;
    - `wait_all_tasks_blocked` (patched by conftest) waits for running store
      operations too;
    - `load`, `kinds` and `commit` work on the closed store (opening it for the
      call), as a MemoryStore's do, so a test reads what a closed supervisor left, or
      writes what the next one finds.
    """

    async def _run(self, work: Callable[..., T], **options: bool) -> T:
        with _clock_held():
            return await super()._run(work, **options)  # type: ignore[misc]

    async def open(self) -> None:
        with _clock_held():
            await super().open()  # type: ignore[misc]

    async def close(self) -> None:
        with _clock_held():
            await super().close()  # type: ignore[misc]

    async def load(self, kind: str, key: str) -> Record | None:
        if self._is_open():
            return await super().load(kind, key)  # type: ignore[misc]
        await self.open()
        try:
            return await super().load(kind, key)  # type: ignore[misc]
        finally:
            await self.close()

    async def kinds(self) -> set[str]:
        if self._is_open():
            return await super().kinds()  # type: ignore[misc]
        await self.open()
        try:
            return await super().kinds()  # type: ignore[misc]
        finally:
            await self.close()

    async def commit(self, operations: Sequence[Operation]) -> None:
        if self._is_open():
            return await super().commit(operations)  # type: ignore[misc]
        await self.open()
        try:
            return await super().commit(operations)  # type: ignore[misc]
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


class ClockedDiskCacheStore(Clocked, DiskCacheStore):
    """A DiskCacheStore for tests written against a MemoryStore (see `Clocked`)."""

    def _is_open(self) -> bool:
        return self._thread is not None
