"""The group-commit writer: every server's writes, one store transaction at a time."""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from ._errors import PersistenceError
from ._events import EventType
from ._store import Operation, Store

logger = logging.getLogger("trio_pgs.writer")


#: Called in the writer's task once an operation handed to `Writer.submit` is durable
#: (with None) or failed (with the store's error). It must not block or raise.
Callback = Callable[[BaseException | None], None]


class _Batch:
    __slots__ = ("callbacks", "done", "errors", "operations")

    def __init__(self) -> None:
        self.operations: list[Operation] = []
        self.errors: dict[int, BaseException] = {}
        self.callbacks: list[tuple[int, Callback]] = []
        self.done = trio.Event()


class Writer:
    """Commits what servers hand it, batching whatever is pending while the store is
    busy with the previous transaction (group commit).

    `commit` returns once the operation is durable, or raises the store's error for
    it. A failed batch is retried one operation at a time, so that one server's
    conflict does not fail the others' writes.
    """

    def __init__(self, store: Store, emit: Callable[..., None] | None = None) -> None:
        self._store = store
        self._emit = emit  # the supervisor's, when it has an on_event hook
        self._pending = _Batch()
        self._wakeup = trio.Event()
        self.commits = 0
        self.records_written = 0
        self.failed = 0
        self._busy = False

    def idle(self) -> bool:
        """Whether nothing is pending or being committed."""
        return not self._pending.operations and not self._busy

    async def commit(self, operation: Operation) -> None:
        batch = self._pending
        index = len(batch.operations)
        batch.operations.append(operation)
        self._wakeup.set()
        await batch.done.wait()
        if batch.errors:
            error = batch.errors.get(index)
            if error is not None:
                raise error

    def submit(self, operation: Operation, callback: Callback) -> None:
        """Queue *operation* for the next transaction without waiting for it: the
        writer calls *callback* with its outcome (the output gate of a server that
        does not resume until its next message)."""
        batch = self._pending
        batch.callbacks.append((len(batch.operations), callback))
        batch.operations.append(operation)
        self._wakeup.set()

    async def run(self) -> None:
        """Serve commits until cancelled; cancel it only once no server is left."""
        while True:
            await self._wakeup.wait()
            self._wakeup = trio.Event()
            batch, self._pending = self._pending, _Batch()
            self._busy = True
            completed = False
            try:
                await self._commit(batch)
                completed = True
            finally:
                self._busy = False
                unknown = None if completed else PersistenceError(
                    "the writer stopped before this transaction's outcome was known"
                )
                for index, callback in batch.callbacks:
                    try:
                        callback(unknown or batch.errors.get(index))
                    except Exception:  # a bug of ours: never let it stop the writer
                        logger.exception("a commit callback raised")
                batch.done.set()

    async def _commit(self, batch: _Batch) -> None:
        started = trio.current_time()
        try:
            await self._store.commit(batch.operations)
        except Exception as exc:
            if len(batch.operations) == 1:
                batch.errors[0] = exc
                self.failed += 1
                return
            logger.info("a batch of %d failed (%r); retrying one by one",
                        len(batch.operations), exc)
            for index, operation in enumerate(batch.operations):
                started = trio.current_time()
                try:
                    await self._store.commit([operation])
                except Exception as one:
                    batch.errors[index] = one
                    self.failed += 1
                else:
                    self.commits += 1
                    self.records_written += 1
                    if self._emit is not None:
                        self._emit(EventType.COMMITTED, None, records=1,
                                   seconds=trio.current_time() - started)
        else:
            self.commits += 1
            self.records_written += len(batch.operations)
            if self._emit is not None:
                self._emit(EventType.COMMITTED, None, records=len(batch.operations),
                           seconds=trio.current_time() - started)
