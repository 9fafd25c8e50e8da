from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
import trio.testing

import trio_pgs
from trio_pgs import PersistentSupervisor, Store

from . import servers
from .clocked import ClockedDiskCacheStore, wait_all_tasks_blocked
from .postgres import Server

#: The modules of behaviour that does not depend on the store: each of their tests runs
#: on a MemoryStore, a DiskCacheStore and a PostgresStore (the `store_backend`
#: parameter).
ON_EVERY_BACKEND = {
    "test_caller_hostile", "test_edges", "test_events", "test_hibernation",
    "test_lifecycle", "test_messages", "test_modes", "test_persistence", "test_ref",
    "test_reminders", "test_state", "test_supervisor",
}
BACKENDS = ["memory", "diskcache", "postgres"]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    module = metafunc.module.__name__.rpartition(".")[2]
    if "store_backend" in metafunc.fixturenames and module in ON_EVERY_BACKEND:
        metafunc.parametrize("store_backend", BACKENDS, indirect=True)


@pytest.fixture(scope="session")
def postgres() -> Iterator[Server]:
    """The session's PostgreSQL server (TRIO_PGS_POSTGRES_DSN, or a pgserver one)."""
    server = Server()
    yield server
    server.close()


@pytest.fixture(autouse=True)
def store_backend(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[str]:
    """Which store `servers.new_store` (so the `store` fixture, and the tests'
    FaultyStore) makes: "memory" unless the module runs on every backend."""
    name = getattr(request, "param", "memory")
    if name == "postgres":
        server: Server = request.getfixturevalue("postgres")
        servers.new_store = server.store
        monkeypatch.setattr(trio.testing, "wait_all_tasks_blocked", wait_all_tasks_blocked)
    elif name == "diskcache":
        directories = request.getfixturevalue("tmp_path_factory")
        servers.new_store = lambda: ClockedDiskCacheStore(directories.mktemp("store"))
        monkeypatch.setattr(trio.testing, "wait_all_tasks_blocked", wait_all_tasks_blocked)
    else:
        servers.new_store = trio_pgs.MemoryStore
    yield name
    servers.new_store = trio_pgs.MemoryStore


@pytest.fixture(autouse=True)
def lifecycle() -> Iterator[servers.Lifecycle]:
    servers.LIFECYCLE = servers.Lifecycle()
    yield servers.LIFECYCLE


@pytest.fixture
def store() -> Store:
    return servers.new_store()


@pytest.fixture
async def sup(store: Store) -> AsyncIterator[PersistentSupervisor]:
    async with trio_pgs.PersistentSupervisor(
        store=store, servers=[servers.TallyServer]
    ) as supervisor:
        yield supervisor
