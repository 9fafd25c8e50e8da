"""DiskCacheStore: reminders in the record's row, and the due index beside the records.

The index is the table `trio_pgs_due` of the store's SQLite file, written in the
transaction that writes the records: these tests check that it lasts, that a store from
before it opens and works, that a crash leaves records and index in step, that rows
nobody should have written do not break it, and that the hot path (records without
reminders) never touches it.
"""

from __future__ import annotations

import contextlib
import json
import math
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import diskcache.core
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from trio_pgs import Delete, DiskCacheStore, PersistenceError, Put, Record
from trio_pgs._diskcache_due import DUE_TABLE
from trio_pgs._diskcache_rows import SEPARATOR, decode_record, encode_record
from trio_pgs._schedule import EARLIEST, LATEST, MAX_EVERY, MIN_EVERY, Due, StoredReminder
from trio_pgs._store import SupportsReminders, due_of

from .crafted_rows import craft_row

ROOT = Path(__file__).resolve().parent.parent
DB = diskcache.core.DBNAME


def rec(key: str, *dues: float, version: int = 1, kind: str = "k", **fields: Any) -> Record:
    reminders = tuple(StoredReminder(f"r{n}", due) for n, due in enumerate(dues))
    return Record(kind=kind, key=key, data=b"1", version=version, reminders=reminders,
                  **fields)


@asynccontextmanager
async def opened(directory: Path, read_only: bool = False) -> AsyncIterator[DiskCacheStore]:
    store = DiskCacheStore(directory, read_only=read_only)
    await store.open()
    try:
        yield store
    finally:
        await store.close()


@contextlib.contextmanager
def raw(directory: Path) -> Iterator[sqlite3.Connection]:
    """The store's database through a connection of its own (as a tool would write it),
    committed at the end of the block."""
    with contextlib.closing(sqlite3.connect(directory / DB)) as con, con:
        yield con


def index_rows(directory: Path, kind: str = "k") -> set[tuple[Any, ...]]:
    with raw(directory) as con:
        return set(con.execute(f"SELECT kind, key, due FROM {DUE_TABLE} WHERE kind = ?",
                               (kind,)))


def has_due_table(directory: Path) -> bool:
    with raw(directory) as con:
        return con.execute(
            "SELECT 1 FROM sqlite_master WHERE name = ?", (DUE_TABLE,)
        ).fetchone() is not None


async def assert_in_step(store: DiskCacheStore, directory: Path, kind: str = "k") -> None:
    """The index holds exactly one entry per record of *kind* that `due_of` lists."""
    expected = set()
    async for record in store.scan(kind):
        due = due_of(record)
        if due is not None:
            expected.add((kind, record.key, due))
    assert index_rows(directory, kind) == expected
    listed = await store.due([kind], limit=10_000)
    assert listed == sorted(Due(due, k, key) for k, key, due in expected)


async def traced(store: DiskCacheStore) -> list[str]:
    """The writes to the index that the store's connection runs from now on
    (diskcache's connection is its thread's: the one of the store's thread)."""
    seen: list[str] = []

    def trace() -> None:
        assert store._cache is not None
        store._cache._con.set_trace_callback(
            lambda sql: seen.append(sql) if DUE_TABLE in sql and "SELECT" not in sql else None
        )

    await store._run(trace)
    return seen


# -- the index lasts --------------------------------------------------------------------


def test_the_store_offers_the_due_index():
    assert isinstance(DiskCacheStore("unused"), SupportsReminders)


async def test_the_due_index_survives_close_and_reopen(tmp_path):
    directory = tmp_path / "s"
    records = [
        rec("a", 30.0, 10.0), rec("b", 20.0), rec("c"), rec("q", 5.0, quarantined=True),
        rec("x", 1.0, kind="other"),
    ]
    async with opened(directory) as store:
        await store.commit([Put(record, 0) for record in records])
        before = await store.due(["k", "other"])
    assert before == [Due(1.0, "other", "x"), Due(10.0, "k", "a"), Due(20.0, "k", "b")]
    async with opened(directory) as store:
        assert await store.due(["k", "other"]) == before
        for record in records:
            assert await store.load(record.kind, record.key) == record
        await assert_in_step(store, directory)
    async with opened(directory, read_only=True) as reader:
        assert await reader.due(["k", "other"]) == before
        assert await reader.due(["k"], after=Due(10.0, "k", "a")) == before[2:]


async def test_a_read_only_store_sees_the_writers_index_as_it_commits(tmp_path):
    directory = tmp_path / "s"
    async with opened(directory) as writer, opened(directory, read_only=True) as reader:
        await writer.commit([Put(rec("a", 7.0), 0)])
        assert await reader.due(["k"]) == [Due(7.0, "k", "a")]
        await writer.commit([Delete("k", "a", 1)])
        assert await reader.due(["k"]) == []


async def test_due_pages_through_many_equal_times_and_many_kinds(tmp_path, monkeypatch):
    """Equal due times are the common case of reminders set for one moment: the cursor
    seeks past them, kind by kind, in (due, kind, key) order, also when the kinds
    are asked in more than one query."""
    from trio_pgs import _diskcache_store

    monkeypatch.setattr(_diskcache_store, "DUE_KINDS_PER_QUERY", 2)
    kinds = ["a", "b", "c", "d", "e"]
    records = [rec(f"{n:02d}", 5.0 if n % 3 else 4.0, kind=kind)
               for kind in kinds for n in range(12)]
    expected = sorted(Due(due_of(r) or 0.0, r.kind, r.key) for r in records)
    async with opened(tmp_path / "s") as store:
        await store.commit([Put(record, 0) for record in records])
        assert await store.due(kinds, limit=1000) == expected
        assert await store.due([*reversed(kinds), "a"], limit=1000) == expected
        for limit in (1, 7, 13):
            pages: list[Due] = []
            after = None
            while page := await store.due(kinds, after=after, limit=limit):
                assert len(page) <= limit
                pages += page
                after = page[-1]
            assert pages == expected
        assert await store.due(["b", "d"], after=Due(4.0, "c", "00")) == [
            due for due in expected if due.kind in "bd" and due > Due(4.0, "c", "00")
        ]
        assert await store.due(kinds, limit=0) == []
        assert await store.due([]) == []
        with pytest.raises(TypeError):
            await store.due("abc")  # a str is not a list of kinds
        with pytest.raises(ValueError):
            await store.due(["a" + SEPARATOR])


# -- what each write does to the index ---------------------------------------------------


async def test_a_claim_keeps_the_reminders_and_does_not_touch_the_index(tmp_path):
    directory = tmp_path / "s"
    async with opened(directory) as store:
        await store.commit([Put(rec("a", 9.0), 0)])
        statements = await traced(store)
        claim = await store.claim("k", "a")
        assert claim.record == rec("a", 9.0, epoch=1)
        assert statements == []
        assert await store.due(["k"]) == [Due(9.0, "k", "a")]
        await store.commit([Put(rec("a", 9.0, version=2, epoch=1), 1)])
        assert statements == [], "an unchanged due time was written again"
        assert await store.load("k", "a") == rec("a", 9.0, version=2, epoch=1)


async def test_records_without_reminders_never_touch_the_index(tmp_path):
    """The hot path: writing a record without reminders runs no statement on the index
    when the store knows it has no entry: it wrote the record since it opened, or the
    record's kind had no entry at all when it looked (once per kind)."""
    directory = tmp_path / "s"
    async with opened(directory) as store:
        statements = await traced(store)
        await store.commit([Put(rec(key), 0) for key in "abc"])
        await store.commit([Put(rec(key, version=2), 1) for key in "abc"])
        await store.claim("k", "a")
        await store.commit([Put(rec("a", version=3, epoch=1), 2), Delete("k", "b", 2)])
        assert statements == []
    async with opened(directory) as store:
        statements = await traced(store)
        await store.commit([Put(rec("a", version=4, epoch=1), 3)])
        assert statements == []


async def test_a_write_whose_entry_is_not_known_deletes_whatever_entry_it_had(tmp_path):
    """In a kind that has entries, the first write of a record after the store opened
    deletes its entry, whatever the store thinks: an entry that a writer other than
    this store left goes with the record's next write. Later writes know better."""
    directory = tmp_path / "s"
    async with opened(directory) as store:
        await store.commit([Put(rec(key), 0) for key in "abc"] + [Put(rec("d", 1.0), 0)])
    async with opened(directory) as store:
        statements = await traced(store)
        await store.commit([Put(rec("a", version=2), 1)])
        assert len(statements) == 1 and statements[0].startswith("DELETE")
        await store.commit([Put(rec("a", version=3), 2), Delete("k", "a", 3)])
        assert len(statements) == 1
        await store.commit([Delete("k", "b", 1)])
        assert len(statements) == 2
        await store.commit([Put(rec("x", kind="other"), 0)])  # a kind without entries
        assert len(statements) == 2
    assert index_rows(directory) == {("k", "d", 1.0)}


async def test_one_batch_may_set_and_clear_an_entry_several_times(tmp_path):
    directory = tmp_path / "s"
    async with opened(directory) as store:
        await store.commit([
            Put(rec("a", 1.0), 0), Put(rec("a", version=2), 1),
            Put(rec("b"), 0), Put(rec("b", 2.0, version=2), 1),
            Put(rec("c", 3.0), 0), Delete("k", "c", 1),
            Put(rec("d", 4.0), 0), Delete("k", "d", 1), Put(rec("d", 5.0, version=2), 1),
        ])
        assert await store.due(["k"]) == [Due(2.0, "k", "b"), Due(5.0, "k", "d")]
        await assert_in_step(store, directory)


async def test_a_purge_of_an_unreadable_row_removes_its_entry(tmp_path):
    directory = tmp_path / "s"
    async with opened(directory) as store:
        await store.commit([Put(rec("a", 1.0), 0)])
    craft_row(directory, "k", "a", mode=diskcache.core.MODE_RAW, value=b"garbage")
    async with opened(directory) as store:
        await store.commit([Delete("k", "a")])
        assert await store.due(["k"]) == []
        assert await store.load("k", "a") is None


async def test_another_connections_commit_is_not_trusted_past(tmp_path):
    """What the store knows of the index is forgotten when another connection commits
    (SQLite's data_version), as its versions are: an entry a tool added to a record
    without reminders goes with that record's next write."""
    directory = tmp_path / "s"
    async with opened(directory) as store:
        await store.commit([Put(rec("a"), 0), Put(rec("b", 2.0), 0)])
        with raw(directory) as con:
            con.execute(f"INSERT INTO {DUE_TABLE} VALUES ('k', 'a', 1.0)")
            con.execute(f"DELETE FROM {DUE_TABLE} WHERE key = 'b'")
        assert await store.due(["k"]) == [Due(1.0, "k", "a")]  # the index says so
        await store.commit([Put(rec("a", version=2), 1), Put(rec("b", 2.0, version=2), 1)])
        assert await store.due(["k"]) == [Due(2.0, "k", "b")]
        await assert_in_step(store, directory)


async def test_reminders_that_would_not_read_back_are_refused_before_anything_is_written(
    tmp_path,
):
    """(A payload is written as it is: make_reminder and an import make it JSON.)"""
    async with opened(tmp_path / "s") as store:
        await store.commit([Put(rec("a", 1.0), 0)])
        for bad in (
            (StoredReminder("r", math.nan),),
            (StoredReminder("r", math.inf),),
            (StoredReminder("b", 1.0), StoredReminder("a", 2.0)),  # not sorted by name
            (StoredReminder("a", 1.0), StoredReminder("a", 2.0)),
            (StoredReminder(5, 1.0),),  # type: ignore[arg-type]
            (StoredReminder("", 1.0),),
            (StoredReminder("r", True),),
            (StoredReminder("r", 1.0, 0.0),),
            (StoredReminder("r", 1e15),),  # past the year 9999
            (StoredReminder("r", 1.0, 1e12),),  # a period of over a century
            (StoredReminder("r", 1.0, payload=None),),  # type: ignore[arg-type]
        ):
            with pytest.raises(ValueError):
                await store.commit([
                    Put(rec("b", 5.0), 0),
                    Put(attrs.evolve(rec("a", version=2), reminders=bad), 1),
                ])
        assert await store.load("k", "a") == rec("a", 1.0)
        assert await store.load("k", "b") is None
        assert await store.due(["k"]) == [Due(1.0, "k", "a")]


# -- a store from before the index ---------------------------------------------------------

#: Rows as the previous version of trio-pgs wrote them (no reminders, no index): a plain
#: record, and one with every other field.
OLD_PLAIN = b'{"v":2,"sv":1,"e":3,"t":1700000000.5,"n":[7]}\n{"n":1}'
OLD_FULL = (b'{"v":4,"sv":2,"e":1,"t":1.5,"n":[1,3,2],"c":[1.0,2.5],"q":true}\n'
            b"x" b"old" b"ol")


def old_store(directory: Path) -> None:
    """A store directory as the previous version left it: diskcache's tables, the format
    marker, two records in the old encoding, and no due table."""
    cache = diskcache.Cache(str(directory), eviction_policy="none", disk_min_file_size=1 << 40)
    try:
        cache.set(SEPARATOR + "trio-pgs-format", "1")
        cache.set("k" + SEPARATOR + "plain", OLD_PLAIN)
        cache.set("k" + SEPARATOR + "full", OLD_FULL)
    finally:
        cache.close()
    assert not has_due_table(directory)


def test_a_record_without_reminders_is_written_as_before():
    plain = decode_record("k", "plain", OLD_PLAIN)
    assert plain.reminders == () and plain.version == 2 and plain.data == b'{"n":1}'
    assert encode_record(plain) == OLD_PLAIN
    full = decode_record("k", "full", OLD_FULL)
    assert full == Record(kind="k", key="full", data=b"x", version=4, state_version=2,
                          epoch=1, updated_at=1.5, crashes=(1.0, 2.5), quarantined=True,
                          history=(b"old", b"ol"))
    assert encode_record(full) == OLD_FULL


async def test_a_store_from_before_the_due_index_opens_and_works(tmp_path):
    directory = tmp_path / "s"
    old_store(directory)
    async with opened(directory, read_only=True) as reader:  # creates nothing
        assert await reader.due(["k"]) == []
        assert (await reader.load("k", "plain")).reminders == ()  # type: ignore[union-attr]
    assert not has_due_table(directory)
    async with opened(directory) as store:
        assert has_due_table(directory)  # empty: no record written then has reminders
        assert await store.due(["k"]) == []
        assert {r.key async for r in store.scan("k")} == {"plain", "full"}
        claim = await store.claim("k", "plain")
        assert claim.epoch == 4 and claim.version == 2
        plain = claim.record
        assert plain is not None
        await store.commit([Put(attrs.evolve(plain, version=3, reminders=(
            StoredReminder("tick", 100.0, 60.0, '{"n":1}'),)), 2)])
        assert await store.due(["k"]) == [Due(100.0, "k", "plain")]
    async with opened(directory, read_only=True) as reader:
        assert await reader.due(["k"]) == [Due(100.0, "k", "plain")]
        loaded = await reader.load("k", "plain")
        assert loaded is not None
        assert loaded.reminders == (StoredReminder("tick", 100.0, 60.0, '{"n":1}'),)


async def test_opening_does_not_read_the_records(tmp_path, monkeypatch):
    """Opening costs the same with 20 records as with 20,000, and so does asking for
    the first entries due: counted in SQLite's virtual machine steps, on every
    connection the store opens."""
    steps = [0]

    def counting(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        connection = connect(*args, **kwargs)
        connection.set_progress_handler(lambda: steps.__setitem__(0, steps[0] + 1) or 0, 10)
        return connection

    async def cost(directory: Path, read_only: bool) -> tuple[int, int]:
        steps[0] = 0
        async with opened(directory, read_only) as store:
            opening = steps[0]
            assert len(await store.due(["k"], limit=10)) == 10
            return opening, steps[0] - opening

    sizes = {}
    for size in (20, 20_000):
        directory = tmp_path / str(size)
        async with opened(directory) as store:
            await store.commit([Put(rec(f"{n:05d}", float(n)), 0) for n in range(size)])
        with raw(directory) as con:  # as a store from before: no index yet
            con.execute(f"DROP TABLE {DUE_TABLE}")
        sizes[size] = directory
    connect = sqlite3.connect
    monkeypatch.setattr(sqlite3, "connect", counting)
    for directory in sizes.values():  # the first open creates the (empty) index
        async with opened(directory):
            pass
        with raw(directory) as con:
            con.executemany(f"INSERT INTO {DUE_TABLE} VALUES ('k', ?, ?)",
                            [(f"{n:05d}", float(n)) for n in range(10)])
    for read_only in (False, True):
        small, large = [await cost(directory, read_only) for directory in sizes.values()]
        assert large[0] <= small[0] + 5, (read_only, small, large)
        assert large[1] <= small[1] + 5, (read_only, small, large)


# -- crashes ------------------------------------------------------------------------------

#: Commits a first state, then a batch of two puts that crashes (os._exit, as a kill
#: would) at the point named in argv[2]: after the first record's row, after its index
#: entry, after the second row, or just before COMMIT ("none": it commits).
CRASHER = """
import os, sys, trio, diskcache
from trio_pgs import DiskCacheStore, Put, Record
from trio_pgs import _diskcache_store as module
from trio_pgs._schedule import StoredReminder

directory, point = sys.argv[1], sys.argv[2]
armed, writes = [False], []

def record(key, version, due=None):
    reminders = () if due is None else (StoredReminder("r0", due),)
    return Record(kind="k", key=key, data=b"%d" % version, version=version,
                  reminders=reminders)

def crash_at(name):
    writes.append(name)
    if armed[0] and name == point:
        os._exit(9)

write_row = module.write_row
def _write_row(cache, db_key, value, now):
    updated = write_row(cache, db_key, value, now)
    crash_at("row " + db_key[-1])
    return updated
module.write_row = _write_row

sql = diskcache.Cache._sql
class Cache(diskcache.Cache):
    @property
    def _sql(self):
        execute = sql.fget(self)
        def traced(statement, *args):
            cursor = execute(statement, *args)
            if statement == module.SET_DUE:
                crash_at("entry " + args[0][1])
            return cursor
        return traced
diskcache.Cache = Cache

apply = module.DiskCacheStore._apply
def _apply(self, *args):
    indexed = apply(self, *args)
    crash_at("commit")
    return indexed
module.DiskCacheStore._apply = _apply

async def main():
    store = DiskCacheStore(directory)
    await store.open()
    await store.commit([Put(record("a", 1, 10.0), 0), Put(record("b", 1), 0)])
    armed[0] = True
    await store.commit([Put(record("a", 2, 20.0), 1), Put(record("b", 2, 30.0), 1)])
    print(" / ".join(writes))
    await store.close()

trio.run(main)
"""


def run_crasher(directory: Path, point: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", CRASHER, str(directory), point],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )


@pytest.mark.parametrize("point", ["row a", "entry a", "row b", "entry b", "commit"])
async def test_a_crash_in_a_commit_leaves_records_and_index_as_before(tmp_path, point):
    directory = tmp_path / "s"
    done = await trio.to_thread.run_sync(run_crasher, directory, point)
    assert done.returncode == 9, done.stderr
    async with opened(directory) as store:
        assert (await store.load("k", "a")) == rec("a", 10.0)
        assert (await store.load("k", "b")) == rec("b")
        assert await store.due(["k"]) == [Due(10.0, "k", "a")]
        await assert_in_step(store, directory)


async def test_the_batch_the_crasher_writes_commits_both(tmp_path):
    directory = tmp_path / "s"
    done = await trio.to_thread.run_sync(run_crasher, directory, "none")
    assert done.returncode == 0, done.stderr
    # Every crash point above is met, in this order, by the batch it would stop.
    assert done.stdout.split(" / ")[-5:] == ["row a", "entry a", "row b", "entry b",
                                             "commit\n"]
    async with opened(directory) as store:
        assert await store.due(["k"]) == [Due(20.0, "k", "a"), Due(30.0, "k", "b")]
        await assert_in_step(store, directory)


#: Commits random batches (reminders set, changed, cleared, quarantined; deletes) until
#: it is killed.
CHURNER = """
import random, sys, trio
from trio_pgs import Delete, DiskCacheStore, Put, Record
from trio_pgs._schedule import StoredReminder

async def main():
    store = DiskCacheStore(sys.argv[1])
    await store.open()
    rng = random.Random(int(sys.argv[2]))
    versions = {}
    print("open", flush=True)
    while True:
        batch = []
        for key in rng.sample([f"{n:02d}" for n in range(30)], 8):
            version = versions.get(key, 0)
            if version and rng.random() < 0.15:
                batch.append(Delete("k", key, version))
                versions[key] = version + 0  # its tombstone keeps the version
                continue
            dues = [rng.choice([1.0, 2.0, rng.random() * 100]) for _ in range(rng.randrange(3))]
            reminders = tuple(StoredReminder(f"r{n}", due) for n, due in enumerate(dues))
            batch.append(Put(Record(kind="k", key=key, data=b"1", version=version + 1,
                                    quarantined=rng.random() < 0.1, reminders=reminders),
                             version))
            versions[key] = version + 1
        await store.commit(batch)

trio.run(main)
"""


@pytest.mark.parametrize("seed", range(3))
async def test_a_kill_at_any_moment_leaves_records_and_index_in_step(tmp_path, seed):
    directory = tmp_path / "s"
    process = subprocess.Popen(
        [sys.executable, "-c", CHURNER, str(directory), str(seed)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert process.stdout is not None
        with trio.fail_after(30):
            line = await trio.to_thread.run_sync(process.stdout.readline)
        assert line == "open\n", process.stderr.read() if process.stderr else line
        await trio.sleep(0.3 + 0.2 * seed)
        assert process.poll() is None, process.stderr.read() if process.stderr else ""
    finally:
        process.kill()
        await trio.to_thread.run_sync(process.wait)
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()
    async with opened(directory) as store:
        assert [r async for r in store.scan("k")], "the churner committed nothing"
        await assert_in_step(store, directory)


# -- hostile rows ---------------------------------------------------------------------------


async def test_rows_of_the_index_that_trio_pgs_would_not_write_are_never_listed(tmp_path):
    directory = tmp_path / "s"
    async with opened(directory) as store:
        await store.commit([Put(rec("a", 5.0), 0), Put(rec("b", 6.0), 0)])
    with raw(directory) as con:
        con.executemany(f"INSERT INTO {DUE_TABLE} VALUES (?, ?, ?)", [
            ("k", "text", "soon"), ("k", "", 1.0), ("k", b"blob", 1.0),
            ("k", "inf", math.inf), ("k", "-inf", -math.inf), (b"k", "blob kind", 1.0),
            ("k", "integer", 3),  # REAL affinity: stored as 3.0, a fine entry
        ])
    async with opened(directory) as store:
        expected = [Due(3.0, "k", "integer"), Due(5.0, "k", "a"), Due(6.0, "k", "b")]
        assert await store.due(["k"]) == expected
        assert await store.due(["k"], limit=1) == expected[:1]
        assert await store.due(["k"], after=expected[0], limit=1) == expected[1:2]
        assert await store.due(["k", "z"], after=expected[1]) == expected[2:]
    async with opened(directory, read_only=True) as reader:
        assert await reader.due(["k"]) == expected


async def test_an_index_without_constraints_holding_nulls_lists_only_its_entries(tmp_path):
    directory = tmp_path / "s"
    async with opened(directory) as store:
        await store.commit([Put(rec("a", 5.0), 0)])
    with raw(directory) as con:
        con.execute(f"DROP TABLE {DUE_TABLE}")
        con.execute(f"CREATE TABLE {DUE_TABLE} (kind, key, due)")
        con.executemany(f"INSERT INTO {DUE_TABLE} VALUES (?, ?, ?)", [
            ("k", "a", 5.0), ("k", None, 1.0), ("k", "n", None), (None, "x", 1.0),
            ("k", "i", 2),  # no affinity: an integer, not an entry trio-pgs writes
        ])
    async with opened(directory) as store:
        assert await store.due(["k"]) == [Due(5.0, "k", "a")]


@pytest.mark.parametrize("sql", [
    f"DROP TABLE {DUE_TABLE}",
    f"ALTER TABLE {DUE_TABLE} RENAME COLUMN due TO later",
])
async def test_an_index_that_cannot_be_read_is_an_error_not_a_crash(tmp_path, sql):
    directory = tmp_path / "s"
    async with opened(directory) as store:
        await store.commit([Put(rec("a", 5.0), 0)])
        with raw(directory) as con:
            con.execute(sql)
        with pytest.raises(PersistenceError, match=f"due index \\({DUE_TABLE}\\)"):
            await store.due(["k"])
        with pytest.raises(PersistenceError, match="could not commit"):
            await store.commit([Put(rec("a", 6.0, version=2), 1)])
        assert await store.load("k", "a") == rec("a", 5.0)  # the batch rolled back whole


def row(reminders: bytes, length: Any = None) -> bytes:
    """A record's row whose reminders are *reminders*, their length in the header
    *length* (by default, theirs)."""
    length = len(reminders) if length is None else length
    head = {"v": 1, "sv": 1, "e": 0, "t": 1.0, "n": [1], "r": length}
    return json.dumps(head).encode() + b"\n1" + reminders


@pytest.mark.parametrize("value", [
    row(b"", "x"), row(b"", -1), row(b"[]", True),
    row(b"[]", 5),  # longer than the row
    row(b"[]xx", 2),  # shorter than the row
    row(b"not json"), row(b"{}"), row(b"[[1,2]]"),
    row(b'[["a",1e999,null,"1"]]'),  # not finite
    row(b'[["a",1,0,"1"]]'),  # a period of 0
    row(b'[["a",1e15,null,"1"]]'),  # past the year 9999
    row(b'[["a",1,null,"{"]]'),  # a payload that is not JSON
    row(b'[["",1,null,"1"]]'),
    row(b'[["b",1,null,"1"],["a",1,null,"1"]]'),  # not sorted
    row(b'[["a",1,null,"1"],["a",2,null,"1"]]'),  # a name twice
    row(b"\xff\xfe"),  # not UTF-8
])
async def test_a_record_whose_reminders_are_unreadable_is_an_unreadable_row(tmp_path, value):
    directory = tmp_path / "s"
    async with opened(directory) as store:
        await store.commit([Put(rec("a", 5.0), 0), Put(rec("b", 6.0), 0)])
    craft_row(directory, "k", "a", mode=diskcache.core.MODE_RAW, value=value)
    async with opened(directory) as store:
        with pytest.raises(PersistenceError, match="not a valid trio-pgs record"):
            await store.load("k", "a")
        skipped: list[Any] = []
        found = [r.key async for r in store.scan("k", on_skip=lambda *s: skipped.append(s))]
        assert found == ["b"] and [key for key, _ in skipped] == ["a"]
        # The index still lists what was committed; activating "a" reports the row.
        assert await store.due(["k"]) == [Due(5.0, "k", "a"), Due(6.0, "k", "b")]
        with pytest.raises(PersistenceError, match="not a valid trio-pgs record"):
            await store.commit([Put(rec("a", version=2), 1)])
        await store.commit([Delete("k", "a")])  # a purge deletes row and entry
        assert await store.due(["k"]) == [Due(6.0, "k", "b")]


# -- the encoding -------------------------------------------------------------------------

reminders = st.lists(
    st.builds(
        StoredReminder, st.text(min_size=1, max_size=5),
        st.floats(min_value=EARLIEST, max_value=LATEST),
        st.none() | st.floats(min_value=MIN_EVERY, max_value=MAX_EVERY),
        st.sampled_from(["null", "1", '{"a":[1,"\\u00e9"]}', '"\\n"']),
    ),
    max_size=4, unique_by=lambda r: r.name,
).map(lambda rs: tuple(sorted(rs, key=lambda r: r.name)))


@given(reminders=reminders, history=st.lists(st.binary(max_size=5), max_size=2),
       data=st.binary(max_size=10), quarantined=st.booleans())
def test_reminders_read_back_as_they_were_written(reminders, history, data, quarantined):
    record = Record(kind="k", key="a", data=data, history=tuple(history),
                    quarantined=quarantined, reminders=reminders, updated_at=1.5)
    encoded = encode_record(record)
    assert decode_record("k", "a", encoded) == record
    line = encoded.partition(b"\n")[0]  # formatted directly or not, the same JSON
    assert line == json.dumps(json.loads(line), separators=(",", ":")).encode()
