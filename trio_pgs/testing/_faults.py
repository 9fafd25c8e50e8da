"""`FaultyStore`: a store wrapper that injects errors and delays."""

from __future__ import annotations

import random
from collections import deque
from collections.abc import AsyncIterator, Sequence
from typing import Literal

import attrs
import trio

from .._errors import PersistenceError
from .._memory_store import MemoryStore
from .._schedule import Due
from .._store import (
    Claim,
    OnSkip,
    Operation,
    Record,
    Store,
    SupportsKinds,
    SupportsReminders,
    SupportsReportingScan,
    claimer,
    keeps_reminders,
)

Where = Literal["load", "commit"]


class InjectedFault(PersistenceError):
    """The error a `FaultyStore` raises: a store failure that did not really happen."""


@attrs.frozen
class FaultStatistics:
    """What a `FaultyStore` did: calls passed to the inner store, and faults injected."""

    loads: int
    commits: int
    failed_loads: int
    failed_commits: int


class FaultyStore:
    """Wraps a store (a new `MemoryStore` by default) and makes it fail on purpose.

    Faults come from a script (`fail_next`) first, then at random by rate
    (``load_failure_rate``, ``commit_failure_rate``, from a ``seed`` for repeatable
    runs). Delays (``load_delay``, ``commit_delay``, seconds of trio time) slow every
    call; `hold_commits` makes commits wait until `release_commits`. A failed commit
    changes nothing in the inner store, as with a real store's rolled-back transaction.
    Set the rates back to 0 (or `heal`) and the store behaves again.
    """

    def __init__(self, inner: Store | None = None, *, seed: int | None = None) -> None:
        self.inner: Store = inner if inner is not None else MemoryStore()
        self._claim = claimer(self.inner)
        self.load_failure_rate = 0.0
        self.commit_failure_rate = 0.0
        self.load_delay = 0.0
        self.commit_delay = 0.0
        self._random = random.Random(seed)
        self._script: dict[Where, deque[BaseException]] = {"load": deque(), "commit": deque()}
        self._gate: trio.Event | None = None
        self._loads = self._commits = self._failed_loads = self._failed_commits = 0

    def __repr__(self) -> str:
        return f"FaultyStore({self.inner!r})"

    def fail_next(
        self, where: Where, times: int = 1, error: BaseException | None = None
    ) -> None:
        """Make the next *times* loads or commits raise *error* (an `InjectedFault`)."""
        if where not in self._script:
            raise ValueError(f"where must be 'load' or 'commit', not {where!r}")
        for _ in range(times):
            self._script[where].append(error or InjectedFault(f"injected {where} failure"))

    def heal(self) -> None:
        """Stop injecting: no rates, no script, no delay, commits released."""
        self.load_failure_rate = self.commit_failure_rate = 0.0
        self.load_delay = self.commit_delay = 0.0
        for script in self._script.values():
            script.clear()
        self.release_commits()

    def hold_commits(self) -> None:
        """Make every commit wait until `release_commits` (to observe the output gate)."""
        if self._gate is None:
            self._gate = trio.Event()

    def release_commits(self) -> None:
        """Let the commits held by `hold_commits` go on, and stop holding new ones."""
        if self._gate is not None:
            self._gate.set()
            self._gate = None

    def statistics(self) -> FaultStatistics:
        """A snapshot of the calls passed to the inner store and the faults injected."""
        return FaultStatistics(
            self._loads, self._commits, self._failed_loads, self._failed_commits
        )

    def _fault(self, where: Where, rate: float) -> BaseException | None:
        if self._script[where]:
            return self._script[where].popleft()
        if rate and self._random.random() < rate:
            return InjectedFault(f"injected {where} failure (rate {rate})")
        return None

    async def open(self) -> None:
        await self.inner.open()

    async def close(self) -> None:
        await self.inner.close()

    async def _before_load(self) -> None:
        if self.load_delay:
            await trio.sleep(self.load_delay)
        error = self._fault("load", self.load_failure_rate)
        if error is not None:
            self._failed_loads += 1
            await trio.lowlevel.checkpoint()
            raise error
        self._loads += 1

    async def load(self, kind: str, key: str) -> Record | None:
        await self._before_load()
        return await self.inner.load(kind, key)

    async def commit(self, operations: Sequence[Operation]) -> None:
        if self._gate is not None:
            await self._gate.wait()
        if self.commit_delay:
            await trio.sleep(self.commit_delay)
        error = self._fault("commit", self.commit_failure_rate)
        if error is not None:
            self._failed_commits += 1
            await trio.lowlevel.checkpoint()
            raise error
        self._commits += 1
        await self.inner.commit(operations)

    async def claim(self, kind: str, key: str) -> Claim:
        """The inner store's claim (a plain load where it has none), failing and
        delayed as a load."""
        await self._before_load()
        return await self._claim(kind, key)

    async def scan(self, kind: str, *, on_skip: OnSkip | None = None) -> AsyncIterator[Record]:
        """The inner store's scan; unreadable rows reported to *on_skip* if it can."""
        if isinstance(self.inner, SupportsReportingScan):
            rows = self.inner.scan(kind, on_skip=on_skip)
        else:
            rows = self.inner.scan(kind)
        async for record in rows:
            yield record

    @property
    def keeps_reminders(self) -> bool:
        """Whether the inner store keeps reminders: then this one does too."""
        return keeps_reminders(self.inner)

    async def due(
        self, kinds: Sequence[str], *, after: Due | None = None, limit: int = 1000
    ) -> list[Due]:
        """The inner store's due index (empty if it has none), failing and delayed
        as a load."""
        await self._before_load()
        if isinstance(self.inner, SupportsReminders):
            return await self.inner.due(kinds, after=after, limit=limit)
        return []

    async def kinds(self) -> set[str]:
        """The inner store's kinds (empty if it cannot list them)."""
        if isinstance(self.inner, SupportsKinds):
            return await self.inner.kinds()
        await trio.lowlevel.checkpoint()
        return set()
