"""What the tests of the ``trio-pgs`` command share: a store filled by a real
supervisor, and ways to read and write it behind the command's back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio

from trio_pgs import DiskCacheStore, PersistentSupervisor, Put, Record, ServerCrashed

from .servers import TallyServer


class FragileServer(TallyServer):
    """Quarantined by its first crash; keeps one earlier state."""

    kind = "fragile"
    max_crashes = 1
    keep_history = 1


async def _fill(directory: Path) -> None:
    async with PersistentSupervisor(
        store=DiskCacheStore(directory), servers=[TallyServer, FragileServer]
    ) as sup:
        alice = await sup.start(TallyServer, "apple", key="alice")
        await alice.call(("add", "pear"))
        await sup.start(TallyServer, key="bob")
        fragile = await sup.start(FragileServer, key="bad")
        await fragile.call(("add", "one"))
        with pytest.raises(ServerCrashed):
            await fragile.call("crash")


def filled_store(directory: Path) -> Path:
    """*directory* as a store holding tally/alice (version 2), tally/bob and the
    quarantined fragile/bad (version 3, one earlier state)."""
    trio.run(_fill, directory)
    return directory


def records(directory: Path) -> dict[tuple[str, str], Record]:
    """Every record in the store, read as the read commands read it (read-only, so
    that it works while an application holds the store)."""

    async def scan() -> dict[tuple[str, str], Record]:
        store = DiskCacheStore(directory, read_only=True)
        await store.open()
        try:
            return {
                (record.kind, record.key): record
                for kind in await store.kinds()
                async for record in store.scan(kind)
            }
        finally:
            await store.close()

    return trio.run(scan)


def put(directory: Path, record: Record, expected_version: int) -> None:
    async def write() -> None:
        store = DiskCacheStore(directory)
        await store.open()
        try:
            await store.commit([Put(record, expected_version)])
        finally:
            await store.close()

    trio.run(write)


def call(directory: Path, key: str, request: Any, cls: type[TallyServer] = TallyServer) -> Any:
    async def run() -> Any:
        async with PersistentSupervisor(store=DiskCacheStore(directory), servers=[cls]) as sup:
            return await sup.ref(cls, key).call(request)

    return trio.run(run)


def rows(out: str) -> list[list[str]]:
    return [line.split("\t") for line in out.splitlines()]
