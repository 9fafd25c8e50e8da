"""The store protocol, on both embedded stores."""

from __future__ import annotations

import contextlib
import pickle
import sqlite3

import diskcache
import pytest
from hypothesis import given
from hypothesis import strategies as st

from trio_pgs import (
    ActivationFailed,
    ConflictError,
    Delete,
    DiskCacheStore,
    MemoryStore,
    PersistenceError,
    PersistentSupervisor,
    Put,
    Record,
)
from trio_pgs._diskcache_rows import SEPARATOR

from .servers import TallyServer


@pytest.fixture(params=["memory", "diskcache"])
async def opened(request, tmp_path):
    store = MemoryStore() if request.param == "memory" else DiskCacheStore(tmp_path / "s")
    await store.open()
    yield store
    await store.close()


def rec(key: str, data: bytes = b"1", version: int = 1, kind: str = "k") -> Record:
    return Record(kind=kind, key=key, data=data, version=version)


async def test_load_of_a_missing_record_is_none(opened):
    assert await opened.load("k", "missing") is None


async def test_put_then_load_round_trips_the_record(opened):
    record = Record(
        kind="k", key="a", data=b'{"x":1}', version=1, state_version=3, epoch=7, updated_at=123.5,
    )
    await opened.commit([Put(record, 0)])
    assert await opened.load("k", "a") == record


async def test_put_with_a_stale_version_is_a_conflict(opened):
    await opened.commit([Put(rec("a"), 0)])
    with pytest.raises(ConflictError, match="k/a"):
        await opened.commit([Put(rec("a", b"2", 2), 0)])
    await opened.commit([Put(rec("a", b"2", 2), 1)])
    assert (await opened.load("k", "a")).data == b"2"


async def test_a_write_with_an_older_epoch_is_fenced_off(opened):
    await opened.commit([Put(Record(kind="k", key="a", data=b"1", version=1, epoch=5), 0)])
    with pytest.raises(ConflictError, match="epoch"):
        await opened.commit([Put(Record(kind="k", key="a", data=b"2", version=2, epoch=4), 1)])


async def test_a_batch_is_atomic(opened):
    await opened.commit([Put(rec("a"), 0)])
    with pytest.raises(ConflictError):
        await opened.commit([Put(rec("b"), 0), Put(rec("a", b"x", 5), 3)])
    assert await opened.load("k", "b") is None
    assert (await opened.load("k", "a")).data == b"1"


async def test_a_batch_may_write_one_record_twice(opened):
    await opened.commit([Put(rec("a"), 0), Put(rec("a", b"2", 2), 1)])
    assert (await opened.load("k", "a")).version == 2


async def test_delete_removes_and_checks_its_version(opened):
    await opened.commit([Put(rec("a"), 0)])
    with pytest.raises(ConflictError):
        await opened.commit([Delete("k", "a", 2)])
    await opened.commit([Delete("k", "a", 1)])
    assert await opened.load("k", "a") is None


async def test_scan_yields_the_records_of_one_kind(opened):
    await opened.commit([Put(rec(str(i)), 0) for i in range(2500)])
    await opened.commit([Put(rec("x", kind="other"), 0)])
    keys = {record.key async for record in opened.scan("k")}
    assert keys == {str(i) for i in range(2500)}
    assert [r.key async for r in opened.scan("other")] == ["x"]


async def test_memory_store_keeps_its_data_when_closed():
    store = MemoryStore()
    await store.open()
    await store.commit([Put(rec("a"), 0)])
    await store.close()
    await store.open()
    assert await store.load("k", "a") is not None


def _open_raw(directory) -> diskcache.Cache:
    return diskcache.Cache(str(directory))


async def test_diskcache_store_has_eviction_off_and_stores_inline(tmp_path):
    store = DiskCacheStore(tmp_path / "s")
    await store.open()
    big = b"x" * 300_000  # beyond diskcache's file threshold
    await store.commit([Put(rec("big", big), 0)])
    await store.close()
    raw = _open_raw(tmp_path / "s")
    assert raw.eviction_policy == "none"
    assert not any(p.suffix == ".val" for p in (tmp_path / "s").rglob("*"))
    raw.close()
    await store.open()
    assert (await store.load("k", "big")).data == big
    await store.close()


async def test_a_pickle_row_is_refused_without_running_it(tmp_path):
    store = DiskCacheStore(tmp_path / "s")
    async with PersistentSupervisor(store=store) as sup:
        await sup.start(TallyServer, key="victim")
    raw = _open_raw(tmp_path / "s")
    raw.set("tally" + SEPARATOR + "victim", Exploit())  # diskcache pickles it
    raw.close()
    async with PersistentSupervisor(store=store, servers=[TallyServer]) as sup:
        with pytest.raises(ActivationFailed, match="pickle") as info:
            await sup.ref(TallyServer, "victim").call("get")
        assert isinstance(info.value.__cause__, PersistenceError)
    assert not (tmp_path / "pwned").exists()
    assert Exploit.ran is False


class Exploit:
    ran = False

    def __reduce__(self):
        return (exec, ("Exploit.ran = True; open('pwned', 'w')",))


async def test_diskcache_refuses_to_store_anything_but_bytes(tmp_path):
    store = DiskCacheStore(tmp_path / "s")
    await store.open()
    with pytest.raises(PersistenceError):
        await store.commit([Put(Record(kind="k", key="a", data="text", version=1), 0)])  # type: ignore[arg-type]
    await store.close()


async def test_a_foreign_diskcache_directory_is_refused(tmp_path):
    raw = _open_raw(tmp_path / "s")
    raw.set("somebody", b"else")
    raw.close()
    with pytest.raises(PersistenceError, match="not a trio-pgs store"):
        await DiskCacheStore(tmp_path / "s").open()


async def test_diskcache_store_is_used_from_one_thread(tmp_path):
    import threading

    store = DiskCacheStore(tmp_path / "s")
    await store.open()
    seen = set()
    for _ in range(20):
        seen.add(await store._run(threading.get_ident))
    await store.close()
    assert len(seen) == 1 and threading.get_ident() not in seen


async def test_sqlite_runs_with_synchronous_full_when_durable(tmp_path):
    store = DiskCacheStore(tmp_path / "s", durable=True)
    await store.open()
    level = await store._run(lambda: store._cache._sql("PRAGMA synchronous").fetchone()[0])
    await store.close()
    assert level == 2
    assert sqlite3  # the pragma is SQLite's own


def test_unpickling_is_not_reachable_from_safe_disk():
    from trio_pgs._diskcache_rows import SafeDisk

    disk = SafeDisk("/nonexistent")
    with pytest.raises(PersistenceError):
        disk.fetch(diskcache.core.MODE_PICKLE, None, pickle.dumps(Exploit()), False)
    assert Exploit.ran is False


async def test_an_unconditional_delete_removes_a_pickle_row_without_reading_it(tmp_path):
    store = DiskCacheStore(tmp_path / "s")
    await store.open()
    await store.commit([Put(rec("a"), 0)])
    await store.close()
    raw = _open_raw(tmp_path / "s")
    raw.set("k" + SEPARATOR + "a", Exploit())
    raw.close()
    await store.open()
    with pytest.raises(PersistenceError, match="pickle"):
        await store.commit([Delete("k", "a", 1)])  # a conditional delete must read it
    await store.commit([Delete("k", "a")])
    assert await store.load("k", "a") is None
    await store.close()
    assert Exploit.ran is False


@given(
    version=st.integers(0, 2**53), state_version=st.integers(0, 1000),
    epoch=st.integers(0, 2**31), updated_at=st.floats(allow_nan=False, allow_infinity=False),
    data=st.binary(max_size=50),
)
def test_the_fast_record_header_is_the_json_one(version, state_version, epoch, updated_at, data):
    import json

    from trio_pgs._diskcache_rows import decode_record, encode_record

    record = Record(
        kind="k", key="a", data=data, version=version, state_version=state_version, epoch=epoch,
        updated_at=updated_at,
    )
    header = {"v": version, "sv": state_version, "e": epoch, "t": updated_at,
              "n": [len(data)]}
    expected = json.dumps(header, separators=(",", ":")).encode() + b"\n" + data
    assert encode_record(record) == expected
    assert decode_record("k", "a", expected) == record


async def test_diskcache_scan_and_kinds_keep_kinds_that_share_a_prefix_apart(tmp_path):
    store = DiskCacheStore(tmp_path / "s")
    await store.open()
    try:
        kinds = ["a", "a b", "ab", "a.b"]
        await store.commit([
            Put(Record(
                kind=kind, key=f"{kind}-{i}", data=b"1",
            ), 0) for kind in kinds for i in range(3)
        ])
        assert await store.kinds() == set(kinds)
        for kind in kinds:
            keys = [record.key async for record in store.scan(kind)]
            assert keys == [f"{kind}-{i}" for i in range(3)]
    finally:
        await store.close()


async def test_diskcache_scan_pages_through_more_than_one_chunk(tmp_path, monkeypatch):
    from trio_pgs import _diskcache_store

    monkeypatch.setattr(_diskcache_store, "_SCAN_CHUNK", 7)
    store = DiskCacheStore(tmp_path / "s")
    await store.open()
    try:
        await store.commit([Put(Record(kind="k", key=f"{i:03d}", data=b"1"), 0) for i in range(50)])
        assert [r.key async for r in store.scan("k")] == [f"{i:03d}" for i in range(50)]
    finally:
        await store.close()


async def test_diskcache_scan_reports_rows_that_are_not_records(tmp_path, caplog):
    store = DiskCacheStore(tmp_path / "s")
    await store.open()
    await store.commit([Put(rec("a"), 0), Put(rec("c"), 0)])
    await store.close()
    raw = _open_raw(tmp_path / "s")
    raw.set("k" + SEPARATOR + "b", b"not a record")
    raw.close()
    await store.open()
    try:
        skipped = []
        found = [r.key async for r in store.scan("k", on_skip=lambda *s: skipped.append(s))]
        assert found == ["a", "c"]
        assert [key for key, _ in skipped] == ["b"]
        assert isinstance(skipped[0][1], PersistenceError)
        assert "scan skipped" not in caplog.text
        assert [r.key async for r in store.scan("k")] == ["a", "c"]
        assert "scan skipped k/b" in caplog.text  # without on_skip: logged
    finally:
        await store.close()


async def test_diskcache_conditional_writes_see_another_connections_commits(tmp_path):
    """The store skips re-reading versions it wrote itself, but never past a commit made
    through another connection (a tool writing the database directly: no other store
    can open the directory while this one holds it)."""
    from trio_pgs._diskcache_rows import encode_record

    from .crafted_rows import craft_row

    directory = tmp_path / "s"

    def theirs(record: Record | None) -> None:  # a commit through another connection
        if record is not None:
            craft_row(directory, "k", "a", mode=diskcache.core.MODE_RAW,
                      value=encode_record(record))
            return
        with contextlib.closing(sqlite3.connect(directory / "cache.db")) as con, con:
            con.execute("DELETE FROM Cache WHERE key = ?", ("k" + SEPARATOR + "a",))

    mine = DiskCacheStore(directory)
    await mine.open()
    try:
        await mine.commit([Put(rec("a", b"1", 1), 0)])
        await mine.commit([Put(rec("a", b"2", 2), 1)])  # from what it knows: no read
        theirs(rec("a", b"3", 3))
        with pytest.raises(ConflictError, match="expected stored version 2, found 3"):
            await mine.commit([Put(rec("a", b"4", 3), 2)])
        await mine.commit([Put(rec("a", b"4", 4), 3)])
        theirs(None)
        with pytest.raises(ConflictError, match="found 0"):
            await mine.commit([Put(rec("a", b"5", 5), 4)])
        assert await mine.load("k", "a") is None
    finally:
        await mine.close()
