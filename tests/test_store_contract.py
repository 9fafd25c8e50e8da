"""The store contract in code: every store in the repo passes the conformance kit, the
kit catches a store that breaks it, and claims fence the runtime's writers."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
import trio

from trio_pgs import (
    ConflictError,
    Delete,
    DiskCacheStore,
    MemoryStore,
    PersistenceError,
    PersistentSupervisor,
    Put,
    Record,
)
from trio_pgs.testing import FaultyStore, check_store

from .servers import TallyServer


async def test_memory_store_keeps_the_store_contract():
    await check_store(MemoryStore)


async def test_faulty_store_keeps_the_store_contract_when_it_injects_nothing():
    await check_store(FaultyStore)


async def test_diskcache_store_keeps_the_store_contract(tmp_path: Path):
    await check_store(lambda: DiskCacheStore(tmp_path / uuid.uuid4().hex))


async def test_postgres_store_keeps_the_store_contract(postgres):
    await check_store(postgres.store)


async def test_a_diskcache_record_purged_and_created_again_continues_its_versions(
    tmp_path: Path,
):
    async with PersistentSupervisor(store=DiskCacheStore(tmp_path / "s")) as sup:
        ref = await sup.start(TallyServer, key="a")
        await ref.call(("add", "x"))
        await ref.stop()
        again = await sup.start(TallyServer, key="a")
        await again.call(("add", "y"))
    store = DiskCacheStore(tmp_path / "s")
    await store.open()
    try:
        record = await store.load("tally", "a")
        assert record is not None and record.version == 4  # 1, 2, deleted; 3, 4
        assert [r.key async for r in store.scan("tally")] == ["a"]
        assert await store.kinds() == {"tally"}
    finally:
        await store.close()


class CarelessStore(MemoryStore):
    """Applies every write, whatever version it expects."""

    async def commit(self, operations: Any) -> None:
        for operation in operations:
            if isinstance(operation, Put):
                self._records[operation.record.kind, operation.record.key] = operation.record
        await trio.lowlevel.checkpoint()


async def test_the_kit_names_the_promise_a_store_breaks():
    with pytest.raises(AssertionError, match="a put expecting another version"):
        await check_store(CarelessStore)


class ForgetfulTombstones(MemoryStore):
    """Keeps a deleted record's version, not its epoch."""

    def _stored(self, ident: Any) -> tuple[int, int] | None:
        stored = super()._stored(ident)
        if stored is not None and ident not in self._records:
            return stored[0], 0
        return stored


class ReopenableStore(MemoryStore):
    async def open(self) -> None:
        self._open = False
        await super().open()


@pytest.mark.parametrize(
    ("make", "promise"),
    [
        (ForgetfulTombstones, "a deleted record keeps its epoch"),
        (ReopenableStore, "a second open while the store is open raises ValueError"),
    ],
    ids=["tombstone-epoch", "second-open"],
)
async def test_the_kit_catches_a_store_that_forgets_a_promise(make: Any, promise: str):
    with pytest.raises(AssertionError, match=promise):
        await check_store(make)


async def test_the_kit_says_when_make_store_returns_a_store_that_is_not_empty():
    shared = MemoryStore()
    with pytest.raises(AssertionError, match="must return a new, empty store each time"):
        await check_store(lambda: shared)


async def test_a_record_created_again_continues_the_versions_of_the_deleted_one():
    store = MemoryStore()
    await store.open()
    await store.commit([Put(Record(
        kind="k", key="a", data=b"1",
    ), 0), Put(Record(kind="k", key="a", data=b"2", version=2), 1)])
    await store.commit([Delete("k", "a")])  # a purge
    with pytest.raises(ConflictError):
        await store.commit([Put(Record(kind="k", key="a", data=b"again"), 0)])


async def test_a_restored_record_is_never_overwritten_by_an_activation_left_behind():
    """Purge a server while it is active, restore an old copy of its record: the
    activation left behind must not write over the restored record."""
    store = MemoryStore()
    async with PersistentSupervisor(store=store) as sup:
        ref = await sup.start(TallyServer, key="a")
        await ref.call(("add", "x"))
        exported = await store.load("tally", "a")
        assert exported is not None
        await ref.call(("add", "y"))
        await store.commit([Delete("tally", "a")])  # trio-pgs purge
        claim = await store.claim("tally", "a")  # trio-pgs import
        restored = Record(
            kind="tally", key="a", data=exported.data, version=claim.version + 1,
            state_version=exported.state_version, epoch=claim.epoch,
        )
        await store.commit([Put(restored, claim.version)])
        with pytest.raises(PersistenceError):
            await ref.call(("add", "z"))  # the activation left behind: fenced off
        assert await store.load("tally", "a") == restored
        assert await ref.call("get") == ["x"]  # served from the restored record


async def test_an_activation_is_fenced_off_once_another_claimed_its_server():
    store = MemoryStore()
    async with PersistentSupervisor(store=store) as sup:
        ref = await sup.start(TallyServer, key="a")
        await ref.call(("add", "x"))
        await store.claim("tally", "a")  # another process activated it
        with pytest.raises(ConflictError):
            await ref.call(("add", "lost"))
        assert await ref.call("get") == ["x"]


async def test_versions_and_epochs_never_repeat_across_a_stop_and_a_new_start():
    store = MemoryStore()
    async with PersistentSupervisor(store=store) as sup:
        ref = await sup.start(TallyServer, key="a")
        await ref.call(("add", "x"))
        before = await store.load("tally", "a")
        await ref.stop()
        await sup.start(TallyServer, key="a")
        after = await store.load("tally", "a")
    assert before is not None and after is not None
    assert after.version > before.version
    assert after.epoch > before.epoch



def test_a_supervisor_refuses_a_store_that_lacks_the_protocols_methods():
    with pytest.raises(TypeError, match=r"not a trio_pgs\.Store: it needs open\(\)"):
        PersistentSupervisor(store=object())  # type: ignore[arg-type]


class BatchPunisher(MemoryStore):
    """Says every operation of a batch with a conflict was refused."""

    async def commit_each(self, operations: Any) -> Any:
        outcomes = await MemoryStore().commit_each(operations)  # checks nothing stored
        try:
            await self.commit(operations)
        except ConflictError as exc:
            return [exc] * len(operations)
        return outcomes


async def test_the_kit_catches_a_batch_that_fails_every_server_for_one_conflict():
    with pytest.raises(AssertionError, match="commit_each refuses a conflicting operation"):
        await check_store(BatchPunisher)
