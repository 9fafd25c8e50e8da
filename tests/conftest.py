from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

import trio_pgs
from trio_pgs import MemoryStore, PersistentSupervisor

from . import servers


@pytest.fixture(autouse=True)
def lifecycle() -> Iterator[servers.Lifecycle]:
    servers.LIFECYCLE = servers.Lifecycle()
    yield servers.LIFECYCLE


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore()


@pytest.fixture
async def sup(store: MemoryStore) -> AsyncIterator[PersistentSupervisor]:
    async with trio_pgs.PersistentSupervisor(
        store=store, servers=[servers.TallyServer]
    ) as supervisor:
        yield supervisor
