"""`MemoryStore`: records in a dict, for tests and examples."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import trio

from ._store import Delete, Operation, Put, Record, check_operation


class MemoryStore:
    """Keeps records in this process's memory.

    Closing it keeps the data, so a test can open a new supervisor on the same store
    to play a restart. Like every store, it serves one open supervisor at a time.
    """

    def __init__(self) -> None:
        self._records: dict[tuple[str, str], Record] = {}
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

    async def commit(self, operations: Sequence[Operation]) -> None:
        await trio.lowlevel.checkpoint()
        # Check every condition against the batch's own earlier writes, then apply.
        after: dict[tuple[str, str], Record | None] = {}
        for operation in operations:
            ident = _ident(operation)
            current = after[ident] if ident in after else self._records.get(ident)
            check_operation(current, operation)
            after[ident] = operation.record if isinstance(operation, Put) else None
        for ident, record in after.items():
            if record is None:
                self._records.pop(ident, None)
            else:
                self._records[ident] = record

    async def scan(self, kind: str) -> AsyncIterator[Record]:
        for record in list(self._records.values()):
            if record.kind == kind:
                await trio.lowlevel.checkpoint()
                yield record

    async def kinds(self) -> set[str]:
        await trio.lowlevel.checkpoint()
        return {kind for kind, _ in self._records}

    def __len__(self) -> int:
        return len(self._records)


def _ident(operation: Operation) -> tuple[str, str]:
    if isinstance(operation, Delete):
        return operation.kind, operation.key
    return operation.record.kind, operation.record.key
