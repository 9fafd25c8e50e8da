"""The group-commit writer: every server's writes, one store transaction at a time.

Rule of this module: every operation handed to the writer gets exactly one outcome,
told to whoever handed it: committed, failed (with the store's error), not committed
(the writer stopped before sending it to the store), or unknown (the writer stopped
waiting for the store while it had it: `OutcomeUnknown`).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

from ._errors import ConflictError, OutcomeUnknown, SupervisorNotRunning
from ._events import EventType
from ._store import Operation, Store, SupportsCommitEach

logger = logging.getLogger("trio_pgs.writer")


#: Called in the writer's task once an operation handed to `Writer.submit` is durable
#: (with None: at `Writer.settled_at`) or failed (with the store's error). It must not
#: block or raise.
Callback = Callable[[BaseException | None], None]


class _Batch:
    __slots__ = ("callbacks", "done", "errors", "operations")

    def __init__(self) -> None:
        self.operations: list[Operation] = []
        self.errors: dict[int, BaseException] = {}
        self.callbacks: list[tuple[int, Callback]] = []
        self.done = trio.Event()

    def fail(self, error: BaseException) -> None:
        for index in range(len(self.operations)):
            self.errors[index] = error


def _not_committed() -> SupervisorNotRunning:
    return SupervisorNotRunning(
        "the supervisor shut down before this change was sent to the store; it was not "
        "committed. Open the supervisor again and retry"
    )


def _outcome_unknown(
    why: str = "the supervisor shut down while the store had this change "
    "(shutdown_timeout ran out)",
) -> OutcomeUnknown:
    return OutcomeUnknown(f"{why}; it may or may not be stored")


class Writer:
    """Commits what servers hand it, batching whatever is pending while the store is
    busy with the previous transaction (group commit).

    `commit` returns once the operation is durable, or raises the store's error for
    it. One server's conflict does not fail the others' writes: a store that
    commits each operation on its own condition (`SupportsCommitEach`) says which
    failed; for another, a failed batch is retried one operation at a time. Once
    stopped (`run` cancelled), it commits nothing more: what it holds and what it is
    given fail at once.
    """

    def __init__(
        self,
        store: Store,
        emit: Callable[..., None] | None = None,
        interrupt: Callable[[BaseException], None] | None = None,
    ) -> None:
        self._store = store
        self._each = store.commit_each if isinstance(store, SupportsCommitEach) else None
        self._emit = emit  # the supervisor's, when it has an on_event hook
        #: Told of a KeyboardInterrupt, SystemExit (or another BaseException) that a
        #: store raised: the supervisor shuts down, then raises it.
        self._interrupt = interrupt
        self._pending = _Batch()
        self._wakeup = trio.Event()
        self._idle: trio.Event | None = None
        self._stopped = False
        self.commits = 0
        self.records_written = 0
        self.failed = 0
        #: Operations refused for their epoch (a later claim took the record).
        self.fenced = 0
        self._busy = False
        #: When the outcome of the last batch was known (trio time), told to its
        #: callbacks: a committed operation's time, read once per batch.
        self.settled_at = 0.0

    def idle(self) -> bool:
        """Whether nothing is pending or being committed."""
        return not self._pending.operations and not self._busy

    def queued(self, item: object) -> bool:
        """Whether *item* (an operation given to `commit`, or a callback given to
        `submit`) waits for the next transaction: not sent to the store yet. For the
        shutdown's account of what was lost (a scan of the pending batch)."""
        batch = self._pending
        return any(operation is item for operation in batch.operations) or any(
            callback is item for _, callback in batch.callbacks
        )

    async def wait_idle(self) -> None:
        while not self.idle():
            self._idle = trio.Event()
            await self._idle.wait()

    async def commit(self, operation: Operation) -> None:
        if self._stopped:
            await trio.lowlevel.checkpoint()
            raise _not_committed()
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
        if self._stopped:
            callback(_not_committed())
            return
        batch = self._pending
        operations = batch.operations
        batch.callbacks.append((len(operations), callback))
        operations.append(operation)
        if len(operations) == 1:  # else set already: see `run`
            self._wakeup.set()

    async def run(self) -> None:
        """Serve commits until cancelled; then fail what is left (see the module)."""
        try:
            while True:
                # Set once the pending batch has an operation, and replaced by an Event
                # not set only together with that batch (no checkpoint in between).
                await self._wakeup.wait()
                self._wakeup = trio.Event()
                # The batch lives in _run's frame only: once committed, nothing here
                # keeps its records, and the states behind them, alive.
                await self._run()
        finally:
            self._stopped = True
            batch, self._pending = self._pending, _Batch()
            batch.fail(_not_committed())
            self._finish(batch)

    async def _run(self) -> None:
        batch, self._pending = self._pending, _Batch()
        self._busy = True
        try:
            await self._commit(batch)
        except trio.Cancelled:
            batch.fail(_outcome_unknown())
            raise
        except BaseException as exc:  # KeyboardInterrupt, SystemExit... out of the store
            unknown = _outcome_unknown(f"the store raised {exc!r} while it had this change")
            unknown.__cause__ = exc
            batch.fail(unknown)
            if self._interrupt is None:
                raise
            self._interrupt(exc)
        finally:
            self._busy = False
            self._finish(batch)

    def _finish(self, batch: _Batch) -> None:
        # Errors are rare: counting the fenced ones costs nothing per committed write.
        for error in batch.errors.values():
            if isinstance(error, ConflictError) and error.fenced:
                self.fenced += 1
        errors = batch.errors
        if batch.callbacks:
            self.settled_at = trio.current_time()
        for index, callback in batch.callbacks:
            try:
                callback(errors.get(index) if errors else None)
            except Exception:  # a bug of ours: never let it stop the writer
                logger.exception("a commit callback raised")
        batch.done.set()
        if self._idle is not None and self.idle():
            self._idle.set()
            self._idle = None

    async def _commit(self, batch: _Batch) -> None:
        started = trio.current_time()
        if self._each is not None:
            await self._commit_each(self._each, batch, started)
            return
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
                    self._committed(1, started)
        else:
            self._committed(len(batch.operations), started)

    async def _commit_each(
        self, commit_each: Callable[..., Awaitable[list[ConflictError | None]]],
        batch: _Batch, started: float,
    ) -> None:
        """One transaction for the batch, the store telling each operation's outcome:
        a conflict fails its own server's write only."""
        try:
            outcomes = await commit_each(batch.operations)
        except Exception as exc:
            batch.fail(exc)
            self.failed += len(batch.operations)
            return
        for index, conflict in enumerate(outcomes):
            if conflict is not None:
                batch.errors[index] = conflict
                self.failed += 1
        written = len(batch.operations) - len(batch.errors)
        if written:
            self._committed(written, started)

    def _committed(self, records: int, started: float) -> None:
        self.commits += 1
        self.records_written += records
        if self._emit is not None:
            self._emit(EventType.COMMITTED, None, records=records,
                       seconds=trio.current_time() - started)
