"""DiskCacheStore: one process per directory, read-only opening, rows that are only data."""

from __future__ import annotations

import functools
import gc
import hashlib
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import diskcache
import diskcache.core
import pytest
import trio

from trio_pgs import Delete, DiskCacheStore, PersistenceError, Put, Record

from .crafted_rows import craft_row, guarded, immutable_directory, row_exists, unblocking

ROOT = Path(__file__).resolve().parent.parent
LOCK = "trio-pgs.lock"
DB = diskcache.core.DBNAME

#: Opens the store in argv[1], says so, and holds it until its stdin closes.
HOLDER = """
import sys, trio
from trio_pgs import DiskCacheStore

async def main():
    store = DiskCacheStore(sys.argv[1])
    await store.open()
    print("open", flush=True)
    await trio.to_thread.run_sync(sys.stdin.read)
    await store.close()

trio.run(main)
"""


def rec(key: str, data: bytes = b"1", version: int = 1, kind: str = "k") -> Record:
    return Record(kind=kind, key=key, data=data, version=version)


async def fill(directory: Path, *records: Record) -> None:
    store = DiskCacheStore(directory)
    await store.open()
    try:
        await store.commit([Put(record, 0) for record in records])
    finally:
        await store.close()


@asynccontextmanager
async def opened(directory: Path, read_only: bool = False) -> AsyncIterator[DiskCacheStore]:
    store = DiskCacheStore(directory, read_only=True) if read_only else DiskCacheStore(directory)
    await store.open()
    try:
        yield store
    finally:
        await store.close()


@asynccontextmanager
async def holder_process(directory: Path) -> AsyncIterator[subprocess.Popen[str]]:
    """Another process with the store open, until the block ends."""
    process = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(directory)],
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert process.stdout is not None
        with trio.fail_after(30):
            line = await trio.to_thread.run_sync(process.stdout.readline)
        assert line == "open\n", f"the holder did not open the store: {line!r}"
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        assert process.stdin is not None and process.stdout is not None
        process.stdin.close()
        process.stdout.close()


def fingerprint(path: Path) -> tuple[str, int]:
    return hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns


# -- A. one process per directory -------------------------------------------------------------


async def test_a_second_process_cannot_open_a_store_in_use_and_is_told_by_whom(tmp_path):
    directory = tmp_path / "s"
    await fill(directory, rec("a"))
    async with holder_process(directory) as holder:
        with trio.fail_after(5), pytest.raises(PersistenceError) as info:  # at once
            await DiskCacheStore(directory).open()
        message = str(info.value)
        assert f"process {holder.pid}" in message
        assert repr(socket.gethostname()) in message
        assert "read_only=True" in message  # the way out
        holder.stdin.close()  # type: ignore[union-attr]  # it closes the store and exits
        assert await trio.to_thread.run_sync(holder.wait) == 0
    async with opened(directory) as store:  # closed: free again
        assert (await store.load("k", "a")) == rec("a")


async def test_a_store_open_here_keeps_another_process_out(tmp_path):
    directory = tmp_path / "s"
    async with opened(directory):
        done = await trio.to_thread.run_sync(lambda: subprocess.run(
            [sys.executable, "-c", HOLDER, str(directory)],
            cwd=ROOT, input="", capture_output=True, text=True, timeout=60,
        ))
    assert done.returncode != 0
    assert "PersistenceError" in done.stderr
    assert f"process {os.getpid()}" in done.stderr


async def test_a_second_store_object_in_this_process_is_refused(tmp_path):
    directory = tmp_path / "s"
    async with opened(directory):
        with pytest.raises(PersistenceError, match=f"already open in this process.*{os.getpid()}"):
            await DiskCacheStore(directory).open()
    async with opened(directory):  # the refusal left nothing behind
        pass


async def test_the_lock_file_names_the_holder_and_close_releases_it(tmp_path):
    directory = tmp_path / "s"
    store = DiskCacheStore(directory)
    await store.open()
    text = (directory / LOCK).read_text()
    assert str(os.getpid()) in text and socket.gethostname() in text
    await store.close()
    async with opened(directory):
        pass


async def test_a_killed_holder_leaves_the_store_free(tmp_path):
    directory = tmp_path / "s"
    await fill(directory, rec("a"))
    async with holder_process(directory) as holder:
        holder.send_signal(signal.SIGKILL)
        assert await trio.to_thread.run_sync(holder.wait) == -signal.SIGKILL
        with trio.fail_after(5):
            async with opened(directory) as store:
                assert (await store.load("k", "a")) == rec("a")


async def test_an_opener_waits_for_a_close_of_this_process_that_was_cut_off(tmp_path):
    """A supervisor's shutdown may stop waiting for its store's close (under a mock
    clock it does at once): the store then closes in the background, its lock last.
    Opening the directory again in this process waits for that close, instead of being
    refused by a lock that is about to go."""
    directory = tmp_path / "s"
    await fill(directory, rec("a"))
    store = DiskCacheStore(directory)
    await store.open()
    release = threading.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(store._run, functools.partial(release.wait, 10))  # busy
        await trio.sleep(0.05)
        with trio.move_on_after(0.1) as cut:
            await store.close()  # queued behind the busy job
        assert cut.cancelled_caught
        threading.Timer(0.3, release.set).start()
        with trio.fail_after(5):
            async with opened(directory) as again:
                assert await again.load("k", "a") == rec("a")


# -- B. read-only opening ---------------------------------------------------------------------


async def test_read_only_reads_everything_and_writes_nothing(tmp_path):
    directory = tmp_path / "s"
    await fill(directory, rec("a"), rec("b"), rec("x", kind="other"))
    (directory / LOCK).unlink()
    before = fingerprint(directory / DB)
    async with opened(directory, read_only=True) as store:
        assert await store.kinds() == {"k", "other"}
        assert [r.key async for r in store.scan("k")] == ["a", "b"]
        assert await store.load("other", "x") == rec("x", kind="other")
        assert await store.load("k", "missing") is None
        with pytest.raises(PersistenceError, match="read-only"):
            await store.commit([Put(rec("c"), 0)])
        with pytest.raises(PersistenceError, match="read-only"):
            await store.commit([Delete("k", "a")])
    assert fingerprint(directory / DB) == before
    assert not (directory / LOCK).exists()
    async with opened(directory) as store:
        assert await store.load("k", "c") is None
        assert await store.load("k", "a") == rec("a")


async def test_read_only_works_while_another_store_holds_the_lock(tmp_path):
    directory = tmp_path / "s"
    async with opened(directory) as writer:
        await writer.commit([Put(rec("a"), 0)])
        async with opened(directory, read_only=True) as reader:
            assert await reader.load("k", "a") == rec("a")
            await writer.commit([Put(rec("a", b"2", 2), 1), Put(rec("b"), 0)])
            assert await reader.load("k", "a") == rec("a", b"2", 2)  # sees later commits
            assert [r.key async for r in reader.scan("k")] == ["a", "b"]
        await writer.commit([Put(rec("a", b"3", 3), 2)])  # the writer goes on


async def test_read_only_works_while_another_process_holds_the_lock(tmp_path):
    directory = tmp_path / "s"
    await fill(directory, rec("a"))
    async with holder_process(directory):
        async with opened(directory, read_only=True) as reader:
            assert await reader.load("k", "a") == rec("a")


async def test_read_only_works_on_read_only_media(tmp_path):
    directory = tmp_path / "s"
    await fill(directory, rec("a"))
    before = fingerprint(directory / DB)
    with immutable_directory(directory):
        async with opened(directory, read_only=True) as store:
            assert await store.load("k", "a") == rec("a")
            assert [r.key async for r in store.scan("k")] == ["a"]
    assert fingerprint(directory / DB) == before


async def test_read_only_of_a_missing_directory_is_a_clear_error_and_creates_nothing(tmp_path):
    with pytest.raises(PersistenceError, match="no such directory"):
        await DiskCacheStore(tmp_path / "nowhere", read_only=True).open()
    assert not (tmp_path / "nowhere").exists()


async def test_read_only_of_an_empty_directory_says_it_is_not_a_store(tmp_path):
    with pytest.raises(PersistenceError, match="not a trio-pgs store"):
        await DiskCacheStore(tmp_path, read_only=True).open()
    assert list(tmp_path.iterdir()) == []


async def test_read_only_of_a_foreign_diskcache_directory_says_it_is_not_a_store(tmp_path):
    with diskcache.Cache(tmp_path / "other") as cache:
        cache.set("somebody", b"else")
    with pytest.raises(PersistenceError, match="not a trio-pgs store"):
        await DiskCacheStore(tmp_path / "other", read_only=True).open()


async def test_read_only_of_a_database_that_is_not_sqlite_says_so(tmp_path):
    (tmp_path / DB).write_bytes(b"this is not a database, but it is long enough" * 40)
    with pytest.raises(PersistenceError, match=r"not a trio-pgs store.*not an SQLite database"):
        await DiskCacheStore(tmp_path, read_only=True).open()


async def test_a_database_that_is_not_sqlite_is_named_as_such_and_left_alone(tmp_path):
    (tmp_path / DB).write_bytes(b"this is not a database, but it is long enough" * 40)
    before = fingerprint(tmp_path / DB)
    with pytest.raises(PersistenceError, match=r"not a trio-pgs store.*not an SQLite database"):
        await DiskCacheStore(tmp_path).open()
    assert fingerprint(tmp_path / DB) == before
    async with opened(tmp_path / "fresh"):  # the refusal released the lock it took
        pass


# -- C. rows are data, never instructions -----------------------------------------------------

FILE_MODES = [
    pytest.param(diskcache.core.MODE_BINARY, id="binary"),
    pytest.param(diskcache.core.MODE_TEXT, id="text"),
]
#: The FIFO cases run on a store opened for writing and on one opened read-only (the
#: CLI's list and show), which read rows each in its own way.
BOTH_WAYS = pytest.mark.parametrize("read_only", [False, True], ids=["writable", "read-only"])


@pytest.fixture
def fifo(tmp_path) -> Path:
    path = tmp_path / "fifo"
    os.mkfifo(path)
    return path


@pytest.fixture
def precious(tmp_path) -> Path:
    """A file, alone in its directory, that no store may delete."""
    path = tmp_path / "keep" / "precious"
    path.parent.mkdir()
    path.write_bytes(b"mine")
    return path


@pytest.mark.parametrize("mode", FILE_MODES)
@BOTH_WAYS
async def test_load_of_a_row_naming_a_fifo_is_refused_without_opening_it(
    tmp_path, fifo, mode, read_only
):
    directory = tmp_path / "s"
    await fill(directory, rec("a"))
    craft_row(directory, "k", "f", mode=mode, filename=str(fifo))
    with unblocking(fifo):  # a regression fails here instead of wedging the store thread
        async with opened(directory, read_only=read_only) as store:
            with trio.fail_after(3):
                with pytest.raises(PersistenceError, match="k/f: the stored row is not a valid"):
                    await store.load("k", "f")
                assert await store.load("k", "a") == rec("a")  # the store thread is free


@BOTH_WAYS
async def test_scan_reports_a_row_naming_a_fifo_without_opening_it(tmp_path, fifo, read_only):
    directory = tmp_path / "s"
    await fill(directory, rec("a"), rec("c"))
    craft_row(directory, "k", "b", filename=str(fifo))
    with unblocking(fifo):
        async with opened(directory, read_only=read_only) as store:
            skipped: list[tuple[str, PersistenceError]] = []
            with trio.fail_after(3):
                found = [r.key async for r in store.scan("k", on_skip=lambda *s: skipped.append(s))]
            assert found == ["a", "c"]
            assert [key for key, _ in skipped] == ["b"]
            assert "names a file" in str(skipped[0][1])


@BOTH_WAYS
async def test_opening_a_store_whose_marker_row_names_a_fifo_does_not_hang(
    tmp_path, fifo, read_only
):
    directory = tmp_path / "s"
    await fill(directory)
    craft_row(directory, "", "trio-pgs-format", filename=str(fifo))  # the marker's key
    store = DiskCacheStore(directory, read_only=True) if read_only else DiskCacheStore(directory)
    with unblocking(fifo), trio.fail_after(3):
        with pytest.raises(PersistenceError, match="format marker"):
            await store.open()


async def test_a_row_naming_dev_zero_is_refused_without_reading_it(tmp_path):
    directory = tmp_path / "s"
    await fill(directory)
    craft_row(directory, "k", "z", filename="/dev/zero")
    with guarded("/dev/zero") as touched:  # a regression reads until memory runs out
        async with opened(directory) as store:
            with pytest.raises(PersistenceError, match="k/z: the stored row is not a valid"):
                await store.load("k", "z")
            skipped: list[object] = []
            assert [r async for r in store.scan("k", on_skip=lambda *s: skipped.append(s))] == []
            assert len(skipped) == 1
    assert touched == []


@pytest.mark.parametrize("relative", [False, True], ids=["absolute", "relative"])
async def test_deleting_a_row_naming_a_file_deletes_the_row_only(tmp_path, precious, relative):
    directory = tmp_path / "s"
    await fill(directory)
    name = os.path.relpath(precious, directory) if relative else str(precious)
    craft_row(directory, "k", "d", filename=name)
    async with opened(directory) as store:
        with pytest.raises(PersistenceError, match="k/d: the stored row is not a valid"):
            await store.load("k", "d")
        with pytest.raises(PersistenceError, match="k/d"):  # a conditional delete reads it
            await store.commit([Delete("k", "d", 1)])
        assert row_exists(directory, "k", "d")
        await store.commit([Delete("k", "d")])  # what `trio-pgs purge` issues
        assert await store.load("k", "d") is None
    assert not row_exists(directory, "k", "d")
    assert precious.read_bytes() == b"mine"


async def test_a_put_over_a_row_naming_a_file_is_refused_and_leaves_the_file(tmp_path, precious):
    directory = tmp_path / "s"
    await fill(directory)
    craft_row(directory, "k", "d", filename=str(precious))
    async with opened(directory) as store:
        with pytest.raises(PersistenceError, match="k/d"):
            await store.commit([Put(rec("d", b"2", 2), 1)])
        with pytest.raises(PersistenceError, match="k/d"):
            await store.commit([Put(rec("d"), 0)])
    assert precious.read_bytes() == b"mine"


@pytest.mark.parametrize(
    ("mode", "value"),
    [
        pytest.param(diskcache.core.MODE_BINARY, None, id="binary-without-file"),
        pytest.param(diskcache.core.MODE_TEXT, "text", id="text-without-file"),
        pytest.param(diskcache.core.MODE_NONE, b"x", id="mode-none"),
        pytest.param(99, b"x", id="mode-unknown"),
    ],
)
async def test_a_row_that_is_not_an_inline_value_is_unreadable(tmp_path, mode, value):
    directory = tmp_path / "s"
    await fill(directory, rec("a"))
    craft_row(directory, "k", "odd", mode=mode, value=value)
    async with opened(directory) as store:
        with pytest.raises(PersistenceError, match="k/odd: the stored row is not a valid"):
            await store.load("k", "odd")
        await store.commit([Delete("k", "odd")])
        assert [r.key async for r in store.scan("k")] == ["a"]


def test_safe_disk_never_deletes_a_file(tmp_path, precious):
    from trio_pgs._diskcache_rows import SafeDisk

    SafeDisk(str(tmp_path)).remove(str(precious))  # what diskcache calls to drop a row's file
    assert precious.read_bytes() == b"mine"


async def test_an_empty_database_file_is_refused_not_taken_for_a_new_store(tmp_path):
    """A truncated copy of a store must not open as an empty store (SQLite takes an
    empty file for an empty database)."""
    directory = tmp_path / "s"
    directory.mkdir()
    (directory / "cache.db").write_bytes(b"")
    with pytest.raises(PersistenceError, match=r"its database file \(cache\.db\) is empty"):
        await DiskCacheStore(directory).open()
    assert (directory / "cache.db").read_bytes() == b""


async def test_a_store_whose_creation_was_killed_opens_as_a_new_store(tmp_path):
    """A process killed while it created a store (its database file made, still
    empty) left a directory that no later open took ("the database file is empty";
    seen once in the SIGKILL test): the creation's marker says it was one, and the
    next open creates the store afresh. A truncated copy, with no marker, is still
    refused (above)."""
    from trio_pgs._diskcache_files import CREATING_NAME

    directory = tmp_path / "s"
    directory.mkdir()
    (directory / "cache.db").write_bytes(b"")
    (directory / CREATING_NAME).write_bytes(b"")
    store = DiskCacheStore(directory)
    await store.open()
    try:
        await store.commit([Put(Record(kind="k", key="a", data=b"1"), 0)])
        assert (await store.load("k", "a")).data == b"1"
    finally:
        await store.close()
    assert not (directory / CREATING_NAME).exists()


async def test_a_new_store_is_marked_as_being_created_until_it_is_whole(tmp_path):
    """The marker of a creation exists only while the store is made."""
    from trio_pgs._diskcache_files import CREATING_NAME

    store = DiskCacheStore(tmp_path / "s")
    await store.open()
    try:
        assert not (tmp_path / "s" / CREATING_NAME).exists()
        assert (tmp_path / "s" / "cache.db").stat().st_size > 0
    finally:
        await store.close()


async def test_a_path_under_home_locks_and_reads_the_directory_it_writes(
    tmp_path, monkeypatch
):
    """diskcache expands "~" itself: the lock and the read-only opening looked at
    ./~/x while the database went to $HOME/x (two writers could share it)."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    store = DiskCacheStore("~/x")
    await store.open()
    try:
        await store.commit([Put(Record(kind="k", key="a", data=b"1"), 0)])
        with pytest.raises(PersistenceError, match="already open in this process"):
            await DiskCacheStore(tmp_path / "x").open()
        reader = DiskCacheStore("~/x", read_only=True)
        await reader.open()
        try:
            assert await reader.load("k", "a") is not None
        finally:
            await reader.close()
    finally:
        await store.close()
    assert not (tmp_path / "~").exists()


@pytest.mark.parametrize("kind", ["", "k\x1fa", "\x1ftombstone"])
async def test_a_kind_that_could_name_another_row_is_refused(kind, tmp_path):
    store = DiskCacheStore(tmp_path / "s")
    await store.open()
    try:
        with pytest.raises(ValueError, match="kind must be a non-empty str without"):
            await store.load(kind, "a")
        with pytest.raises(ValueError, match="kind must be a non-empty str without"):
            await store.commit([Delete(kind, "a")])
        with pytest.raises(ValueError, match="kind must be a non-empty str without"):
            await store.claim(kind, "a")
    finally:
        await store.close()


async def test_a_refused_read_only_open_leaves_no_connection_behind(tmp_path):
    """A file that is no database: the first connection was not closed (Python 3.13
    reports it as an unclosed database when it is collected)."""
    directory = tmp_path / "s"
    directory.mkdir()
    (directory / "cache.db").write_bytes(b"not a database at all\n" * 300)
    with pytest.raises(PersistenceError, match="not an SQLite database"):
        await DiskCacheStore(directory, read_only=True).open()
    gc.collect()  # an unclosed connection would warn here (an error in this suite)


async def test_a_refused_writable_open_leaves_no_connection_behind(tmp_path):
    """diskcache opens its connection before it finds the file is no database."""
    directory = tmp_path / "s"
    directory.mkdir()
    (directory / "cache.db").write_bytes(b"not a database at all\n" * 300)
    with pytest.raises(PersistenceError, match="not an SQLite database"):
        await DiskCacheStore(directory).open()
    gc.collect()  # an unclosed connection would warn here (an error in this suite)
