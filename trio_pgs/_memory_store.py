"""`MemoryStore`: records in a dict, for tests and examples."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import attrs
import trio

from ._errors import ConflictError
from ._schedule import Due
from ._store import Claim, Delete, OnSkip, Operation, Put, Record, check_version, due_of

Ident = tuple[str, str]


class MemoryStore:
    """Keeps records in this process's memory.

    Closing it keeps the data, so a test can open a new supervisor on the same store
    to play a restart. Like every store, it serves one open supervisor at a time. It
    offers every capability: kinds, reporting scans (it has no unreadable rows),
    batches that commit each operation on its own, and claims (a claim raises the
    stored epoch at once; a deleted record leaves its last version and epoch behind,
    so a new one continues them), and a due index of reminders.
    """

    def __init__(self) -> None:
        self._records: dict[Ident, Record] = {}
        #: Deleted records: their last (version, epoch).
        self._tombstones: dict[Ident, tuple[int, int]] = {}
        #: The due index: when the first reminder of each record that has one is due.
        self._due: dict[Ident, float] = {}
        self._open = False

    def __repr__(self) -> str:
        return f"MemoryStore({len(self._records)} records)"

    async def open(self) -> None:
        if self._open:
            raise ValueError("this MemoryStore is already open in another supervisor")
        self._open = True
        await trio.lowlevel.checkpoint()

    async def close(self) -> None:
        self._open = False
        await trio.lowlevel.checkpoint()

    async def load(self, kind: str, key: str) -> Record | None:
        await trio.lowlevel.checkpoint()
        return self._records.get((kind, key))

    async def claim(self, kind: str, key: str) -> Claim:
        await trio.lowlevel.checkpoint()
        ident = (kind, key)
        record = self._records.get(ident)
        if record is None:
            version, epoch = self._tombstones.get(ident, (0, 0))
            return Claim(record=None, epoch=epoch + 1, version=version)
        record = self._records[ident] = attrs.evolve(record, epoch=record.epoch + 1)
        return Claim(record=record, epoch=record.epoch, version=record.version)

    def _stored(self, ident: Ident) -> tuple[int, int] | None:
        record = self._records.get(ident)
        if record is not None:
            return record.version, record.epoch
        return self._tombstones.get(ident)

    async def commit(self, operations: Sequence[Operation]) -> None:
        await trio.lowlevel.checkpoint()
        # Check every condition against the batch's own earlier writes, then apply.
        after: dict[Ident, tuple[Record | None, tuple[int, int] | None]] = {}
        for operation in operations:
            ident = _ident(operation)
            stored = after[ident][1] if ident in after else self._stored(ident)
            check_version(stored, operation)
            if isinstance(operation, Put):
                put = operation.record
                after[ident] = (put, (put.version, put.epoch))
            else:
                after[ident] = (None, stored)
        for ident, (written, stored) in after.items():
            if written is not None:
                self._write(ident, written)
            else:
                self._drop(ident, stored)

    async def commit_each(self, operations: Sequence[Operation]) -> list[ConflictError | None]:
        await trio.lowlevel.checkpoint()
        outcomes: list[ConflictError | None] = []
        refused: set[Ident] = set()
        for operation in operations:
            ident = _ident(operation)
            try:
                if ident in refused:
                    raise ConflictError(
                        f"{ident[0]}/{ident[1]}: an earlier write to it in the same batch "
                        "was refused"
                    )
                check_version(self._stored(ident), operation)
            except ConflictError as exc:
                refused.add(ident)
                outcomes.append(exc)
                continue
            self._apply(ident, operation)
            outcomes.append(None)
        return outcomes

    def _apply(self, ident: Ident, operation: Operation) -> None:
        if isinstance(operation, Put):
            self._write(ident, operation.record)
        else:
            self._drop(ident, self._stored(ident))

    def _write(self, ident: Ident, record: Record) -> None:
        self._records[ident] = record
        self._tombstones.pop(ident, None)
        due = due_of(record)
        if due is None:
            self._due.pop(ident, None)
        else:
            self._due[ident] = due

    def _drop(self, ident: Ident, stored: tuple[int, int] | None) -> None:
        self._records.pop(ident, None)
        self._due.pop(ident, None)
        if stored is not None:
            self._tombstones[ident] = stored

    async def due(
        self, kinds: Sequence[str], *, after: Due | None = None, limit: int = 1000
    ) -> list[Due]:
        await trio.lowlevel.checkpoint()
        wanted = set(kinds)
        entries = sorted(
            Due(due, kind, key) for (kind, key), due in self._due.items() if kind in wanted
        )
        if after is not None:
            entries = [entry for entry in entries if entry > after]
        return entries[:limit]

    async def scan(self, kind: str, *, on_skip: OnSkip | None = None) -> AsyncIterator[Record]:
        for record in list(self._records.values()):
            if record.kind == kind:
                await trio.lowlevel.checkpoint()
                yield record

    async def kinds(self) -> set[str]:
        await trio.lowlevel.checkpoint()
        return {kind for kind, _ in self._records}

    def __len__(self) -> int:
        return len(self._records)


def _ident(operation: Operation) -> Ident:
    if isinstance(operation, Delete):
        return operation.kind, operation.key
    return operation.record.kind, operation.record.key
