"""The store protocol: what trio-pgs needs from a place that keeps records."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from typing import Any, Protocol, runtime_checkable

import attrs

from ._errors import ConflictError


@attrs.frozen
class Record:
    """One stored server: its encoded state and the bookkeeping that travels with it.

    ``version`` grows by one with every committed write (the first is 1) and is what a
    conditional write checks. ``epoch`` is a fencing token: a store that serves several
    processes refuses a write whose epoch is older than the stored one. ``state_version``
    is the schema version of ``data``. ``crashes`` holds the wall-clock times of the
    server's recent crashes and ``quarantined`` whether it crashed too often, so that
    both survive a process restart. ``history`` holds earlier committed states, newest
    first, when the server class keeps any (``keep_history``).
    """

    kind: str
    key: str
    data: bytes
    version: int = 1
    state_version: int = 1
    epoch: int = 0
    updated_at: float = 0.0
    crashes: tuple[float, ...] = ()
    quarantined: bool = False
    history: tuple[bytes, ...] = ()


def next_record(old: Record, data: bytes, state_version: int, keep_history: int) -> Record:
    """The record that follows *old* with the new state *data*, keeping the last
    *keep_history* states. The hot path: one `Record` built directly (`attrs.evolve`
    costs twice as much)."""
    history = (old.data, *old.history)[:keep_history] if keep_history else ()
    return Record(
        old.kind, old.key, data, old.version + 1, state_version, old.epoch, time.time(),
        old.crashes, old.quarantined, history,
    )


def next_version(old: Record, **changes: Any) -> Record:
    """*old* with *changes* as the next version: the bookkeeping writes (crashes,
    quarantine, release, rollback, migration)."""
    return attrs.evolve(old, version=old.version + 1, updated_at=time.time(), **changes)


@attrs.frozen
class Put:
    """Write *record*, provided the stored version is *expected_version* (0: absent)."""

    record: Record
    expected_version: int


@attrs.frozen
class Delete:
    """Delete a record, provided the stored version is *expected_version* (None: any)."""

    kind: str
    key: str
    expected_version: int | None = None


Operation = Put | Delete


@runtime_checkable
class Store(Protocol):
    """What a store adapter provides. All methods are called from the trio thread.

    A store serves one open supervisor at a time. `commit` is atomic: either every
    operation of the batch is applied or none is, and a failed condition raises
    `ConflictError`. Blocking libraries must run on a thread of their own.
    """

    async def open(self) -> None:
        """Open the store; raise `PersistenceError` saying what is wrong if it cannot."""

    async def close(self) -> None:
        """Release the store's resources; data stays."""

    async def load(self, kind: str, key: str) -> Record | None:
        """Return the record of (*kind*, *key*), or None."""

    async def commit(self, operations: Sequence[Operation]) -> None:
        """Apply *operations* atomically, checking each one's expected version."""

    def scan(self, kind: str) -> AsyncIterator[Record]:
        """Iterate over every record of *kind*, in no particular order."""

    # Optional: ``async def kinds(self) -> set[str]``, every kind with a stored record,
    # used once at startup to log the kinds that no listed class serves.


def check_operation(current: Record | None, operation: Operation) -> None:
    """Raise `ConflictError` unless *operation* may apply over *current*.

    Shared by the embedded stores, which check versions in-process.
    """
    check_version(None if current is None else (current.version, current.epoch), operation)


def check_version(current: tuple[int, int] | None, operation: Operation) -> None:
    """`check_operation`, given only the stored (version, epoch), or None if absent."""
    if isinstance(operation, Put):
        kind, key = operation.record.kind, operation.record.key
        expected: int | None = operation.expected_version
        found = 0 if current is None else current[0]
        if current is not None and operation.record.epoch < current[1]:
            raise ConflictError(
                f"{kind}/{key}: write fenced off (epoch {operation.record.epoch} is older "
                f"than the stored epoch {current[1]}); another activation owns it"
            )
    else:
        kind, key = operation.kind, operation.key
        expected = operation.expected_version
        found = 0 if current is None else current[0]
    if expected is not None and expected != found:
        raise ConflictError(
            f"{kind}/{key}: expected stored version {expected}, found {found}; "
            "another writer changed it"
        )
