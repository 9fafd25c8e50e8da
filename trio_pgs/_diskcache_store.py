"""`DiskCacheStore`: the embedded default, on a diskcache (SQLite) directory.

The store itself: opening, claims, commits, loads, scans and the due index's reads, on
a dedicated thread. What a row holds is `_diskcache_rows`; the due index's table and
query, `_diskcache_due`; the directory's lock and read-only connection,
`_diskcache_files`."""

from __future__ import annotations

import contextlib
import functools
import heapq
import itertools
import logging
import math
import operator
import os
import pathlib
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TypeVar

import attrs
import diskcache
import diskcache.core

from ._diskcache_due import (
    ANY_DUE,
    CREATE_DUE,
    DROP_DUE,
    DUE_KINDS_PER_QUERY,
    DUE_TABLE,
    SET_DUE,
    chunks,
    due_query,
    has_due_table,
)
from ._diskcache_files import (
    closed,
    closed_in_background,
    closing,
    connect_read_only,
    creating,
    lock_directory,
    not_a_store,
)
from ._diskcache_rows import (
    FORMAT,
    FORMAT_KEY,
    SEPARATOR,
    TOMBSTONE,
    SafeDisk,
    decode_row,
    encode_record,
    encode_tombstone,
    row_key,
    row_key_of,
    split_key,
    stored_in_header,
    unconditional,
    write_row,
)
from ._errors import PersistenceError
from ._schedule import Due
from ._store import Claim, Operation, Put, Record, check_version, due_of
from ._thread import DedicatedThread

T = TypeVar("T")
logger = logging.getLogger("trio_pgs.store")

_SCAN_CHUNK = 1000
#: Versions remembered at most (see _known_versions): a bound, not a per-server cost.
_VERSIONS_KEPT = 100_000
#: The character right after SEPARATOR: kind + _AFTER_SEPARATOR sorts after every key
#: of that kind.
_AFTER_SEPARATOR = chr(ord(SEPARATOR) + 1)
#: A row's columns, read with SQL: never through diskcache's `get`, which opens the file
#: a row names (a FIFO hangs it, /dev/zero fills the memory).
_SELECT_ROW = "SELECT mode, filename, value FROM Cache WHERE key = ? AND raw = 1"
_SELECT_VALUE = "SELECT value FROM Cache WHERE key = ? AND raw = 1"
#: The due entry of a key that this store does not know (see _due_known): NaN, unequal
#: to every time, and not None, so that the key's next write writes its entry.
_UNKNOWN = math.nan


class DiskCacheStore:
    """Records in a diskcache directory (SQLite), the embedded default store.

    The cache is opened with eviction off (diskcache's default evicts beyond 1 GiB,
    which would silently delete servers), stores only bytes, refuses to unpickle, and
    keeps every value inside the SQLite database so that a batch commits atomically.
    It is used from one dedicated thread, opened once and closed on that thread.

    While open, the store holds an exclusive lock on its directory: another process, or
    another store object of this process, cannot open it (`PersistenceError`, naming
    the holder). The lock goes when the store closes or its process dies.

    SQLite runs with ``synchronous=NORMAL`` by default: a commit survives a crash of the
    process, and a power cut may lose the last commits (never corrupt the file). With
    ``durable=True`` it runs with ``synchronous=FULL``: a commit survives a power cut,
    at the price of an fsync per batch.

    It keeps a due index of reminders (`SupportsReminders`): the table `DUE_TABLE` of
    the same database, written in the transaction that writes the records.

    With ``read_only=True``, the store only reads (`load`, `scan`, `kinds`, `due`;
    `commit` raises `PersistenceError`): it takes no lock, so it works while an
    application has the store open, and writes nothing, so it works on read-only media.
    It opens an existing store only.
    """

    def __init__(
        self, directory: str | os.PathLike[str], *, durable: bool = False, read_only: bool = False
    ) -> None:
        # diskcache expands "~" itself: so must the lock, the read-only opening and the
        # file checks, or they would look at another directory than the database's.
        self.directory = os.path.expanduser(os.fspath(directory))
        self._path = os.path.abspath(self.directory)  # see _diskcache_files.closing
        self.durable = durable
        self.read_only = read_only
        self._cache: diskcache.Cache | None = None
        self._lock: int | None = None  # the lock file's descriptor, while open
        self._identity: tuple[int, int] | None = None
        #: See _index; read-only, the one connection.
        self._keys: sqlite3.Connection | None = None
        #: See _known_versions: db key -> (version, epoch), or None when absent.
        self._versions: dict[str, tuple[int, int] | None] = {}
        #: Valid with _versions, and forgotten with them: db key -> its entry in the due
        #: index as this store committed it (None: it has none). A key missing here is
        #: _UNKNOWN, unless its kind had no entry (see _unknown_due): its next write
        #: also deletes whatever entry it may have.
        self._due_known: dict[str, float | None] = {}
        #: Valid with _due_known: kind -> whether it had entries when this store looked.
        self._kinds_indexed: dict[str, bool] = {}
        self._data_version: int | None = None
        self._thread: DedicatedThread | None = None

    def __repr__(self) -> str:
        if self.read_only:
            return f"DiskCacheStore({self.directory!r}, read_only=True)"
        return f"DiskCacheStore({self.directory!r})"

    async def _run(self, fn: Callable[[], T]) -> T:
        if self._thread is None:
            raise PersistenceError(f"{self!r} is not open (open a supervisor on it)")
        return await self._thread.run(fn)

    async def open(self) -> None:
        if self._thread is not None:
            raise ValueError(f"{self!r} is already open in another supervisor")
        if not self.read_only:
            await closed_in_background(self._path)
        thread = self._thread = DedicatedThread(f"trio-pgs {self.directory}")
        thread.start()
        try:
            await self._run(self._open_read_only if self.read_only else self._open)
        except BaseException:
            # Cancelled, the open may still finish on the thread: close after it, there,
            # whatever it opened (connections, the lock).
            self._thread = None
            thread.post(self._close)
            await thread.stop()
            raise

    def _open(self) -> None:
        try:
            os.makedirs(self.directory, exist_ok=True)
            self._lock = lock_directory(self.directory)
        except OSError as exc:
            raise PersistenceError(
                f"cannot open the store directory {self.directory!r}: {exc}. "
                "Check that it is a writable directory (or a path where one can be made)."
            ) from exc
        try:
            with creating(self.directory):  # a new store is whole, or marked unfinished
                self._cache = self._open_cache()
            self._identity = self._file_identity()
        except BaseException:
            self._close()
            raise

    def _open_cache(self) -> diskcache.Cache:
        # Made, then initialised: a Cache whose __init__ fails (a file that is no
        # database) has opened its connection already, and only the object closes it.
        cache = diskcache.Cache.__new__(diskcache.Cache)
        try:
            cache.__init__(
                self.directory,
                disk=SafeDisk,
                eviction_policy="none",
                cull_limit=0,
                statistics=False,
                tag_index=False,
                disk_min_file_size=1 << 40,
                sqlite_synchronous=2 if self.durable else 1,
            )
        except Exception as exc:
            with contextlib.suppress(Exception):
                cache.close()
            if isinstance(exc, sqlite3.Error) and (error := not_a_store(self.directory, exc)):
                raise error from exc
            raise PersistenceError(
                f"cannot open the store directory {self.directory!r}: {exc}. "
                "Check that it is a writable directory (or a path where one can be made)."
            ) from exc
        try:
            if self._format(cache._con) is None:
                if cache._sql("SELECT 1 FROM Cache LIMIT 1").fetchone() is not None:
                    raise PersistenceError(
                        f"{self.directory!r} is a diskcache directory, but not a trio-pgs "
                        "store; give trio-pgs a directory of its own"
                    )
                cache.set(FORMAT_KEY, FORMAT)
            # A store from before the due index gets an empty one, which is right: no
            # record written then has reminders. Creating it reads no record.
            for statement in CREATE_DUE:
                cache._sql(statement)
        except BaseException:
            cache.close()
            raise
        return cache

    def _open_read_only(self) -> None:
        """Open with a read-only SQLite connection of our own: diskcache's `Cache`
        rewrites its settings rows whenever it opens."""
        path = pathlib.Path(self.directory, diskcache.core.DBNAME)
        if not os.path.isdir(self.directory):
            raise PersistenceError(
                f"{self.directory!r}: no such directory (a read-only store opens an "
                "existing store, and creates nothing)"
            )
        if not path.is_file():
            raise PersistenceError(
                f"{self.directory!r} is not a trio-pgs store (it has no "
                f"{diskcache.core.DBNAME})"
            )
        try:
            self._keys = connect_read_only(path)
            if self._format(self._keys) is None:
                raise PersistenceError(
                    f"{self.directory!r} is not a trio-pgs store (its database has no "
                    "trio-pgs format marker)"
                )
            self._identity = self._file_identity()
        except BaseException as exc:
            self._close()
            if isinstance(exc, sqlite3.Error):
                error = not_a_store(self.directory, exc) or PersistenceError(
                    f"cannot read the store in {self.directory!r}: {exc}"
                )
                raise error from exc
            raise

    def _format(self, connection: sqlite3.Connection) -> str | None:
        """The store's format marker, or None if the database has none; a marker of
        another format, or a row there that trio-pgs did not write, is refused."""
        row = connection.execute(_SELECT_ROW, (FORMAT_KEY,)).fetchone()
        if row is None:
            return None
        mode, filename, marker = row
        if mode != diskcache.core.MODE_RAW or filename is not None or type(marker) is not str:
            raise PersistenceError(
                f"{self.directory!r}: the row where trio-pgs keeps its format marker holds "
                "something trio-pgs did not write (a file name, a pickle or bytes); this "
                "directory was tampered with, or is not a trio-pgs store"
            )
        if marker != FORMAT:
            raise PersistenceError(
                f"{self.directory!r} holds trio-pgs records of format {marker!r}; "
                f"this version reads format {FORMAT!r}. Upgrade trio-pgs."
            )
        return marker

    def _file_identity(self) -> tuple[int, int] | None:
        try:
            stat = os.stat(os.path.join(self.directory, diskcache.core.DBNAME))
        except OSError:
            return None
        return stat.st_dev, stat.st_ino

    def _check_file(self) -> None:
        """SQLite goes on writing into a database file that was deleted: whatever it
        acknowledged then would be lost. Refuse instead (one stat per load or batch)."""
        if self._file_identity() != self._identity:
            raise PersistenceError(
                f"{self!r}: the store's database file was deleted or replaced while it "
                "was open; nothing was read or written. Restore the directory (or start "
                "afresh) and open the supervisor again"
            )

    async def close(self) -> None:
        """Close the database on its thread. Cancelled (a store still busy with an
        abandoned commit at shutdown), the thread closes it once that is done."""
        thread = self._thread
        if thread is None:
            return
        directory = self._path
        event = closing(directory)

        def close() -> None:
            try:
                self._close()
            finally:
                closed(directory, event)

        try:
            await thread.run(close)
        finally:
            self._thread = None
            await thread.stop()

    def _close(self) -> None:
        self._forget()
        if self._keys is not None:
            self._keys.close()
            self._keys = None
        if self._cache is not None:
            self._cache.close()
            self._cache = None
        if self._lock is not None:  # last: the database is closed before anyone gets in
            os.close(self._lock)
            self._lock = None

    def _opened(self) -> diskcache.Cache:
        if self._cache is None:
            raise PersistenceError(f"{self!r} is not open")
        return self._cache

    async def load(self, kind: str, key: str) -> Record | None:
        return await self._run(lambda: self._load(kind, key))

    def _load(self, kind: str, key: str) -> Record | None:
        self._check_file()
        return self._read(kind, key)

    def _read(self, kind: str, key: str) -> Record | None:
        """The record, read with diskcache's own connection (inside a commit, its
        transaction), or with the read-only one."""
        connection = self._keys if self._cache is None else self._cache._con
        if connection is None:
            raise PersistenceError(f"{self!r} is not open")
        try:
            row = connection.execute(_SELECT_ROW, (row_key(kind, key),)).fetchone()
        except sqlite3.Error as exc:
            raise PersistenceError(f"{kind}/{key}: the store could not be read: {exc}") from exc
        return None if row is None else decode_row(kind, key, *row)

    async def commit(self, operations: Sequence[Operation]) -> None:
        operations = list(operations)
        await self._run(lambda: self._commit(operations))

    def _commit(self, operations: list[Operation]) -> None:
        cache = self._writable()
        db_keys = [row_key_of(operation) for operation in operations]
        try:
            with cache.transact():
                seen, tombstones = self._check(cache, operations, db_keys)
                indexed, kinds = self._apply(cache, operations, db_keys, tombstones)
        except (PersistenceError, ValueError):  # refused: nothing was written
            raise
        except Exception as exc:
            self._forget()  # whatever happened, read again
            raise PersistenceError(f"the store could not commit: {exc}") from exc
        # Learnt in the transaction, and true once it committed (not before: a batch
        # rolled back after deleting a kind's last entry leaves that entry).
        self._versions.update(seen)
        self._due_known.update(indexed)
        self._kinds_indexed.update(kinds)

    def _forget(self) -> None:
        """Forget what this store knows of the rows: read them again."""
        self._versions.clear()
        self._due_known.clear()
        self._kinds_indexed.clear()
        self._data_version = None

    def _writable(self) -> diskcache.Cache:
        if self.read_only:
            raise PersistenceError(
                f"{self!r} is read-only; nothing was written. Open it without "
                "read_only=True to change records"
            )
        cache = self._opened()
        self._check_file()
        return cache

    def _check(
        self, cache: diskcache.Cache, operations: list[Operation], db_keys: list[str]
    ) -> tuple[dict[str, tuple[int, int] | None], list[tuple[int, int] | None]]:
        """Check every condition before the first write, so a conflict leaves the
        transaction with nothing to roll back. Returns the (version, epoch) each key
        is left with, and for each operation the one it found (a delete's tombstone)."""
        versions = self._known_versions(cache)
        seen: dict[str, tuple[int, int] | None] = {}
        found: list[tuple[int, int] | None] = []
        for operation, db_key in zip(operations, db_keys, strict=True):
            if db_key in seen:
                current = seen[db_key]
            elif db_key in versions:
                current = versions[db_key]
            elif unconditional(operation):  # a purge never decodes the row
                current = self._stored_leniently(db_key)
            else:
                current = self._stored(db_key)
            if not unconditional(operation):
                check_version(current, operation)
            if isinstance(operation, Put):
                seen[db_key] = (operation.record.version, operation.record.epoch)
            else:
                seen[db_key] = current  # its tombstone keeps them
            found.append(current)
        return seen, found

    def _apply(
        self,
        cache: diskcache.Cache,
        operations: list[Operation],
        db_keys: list[str],
        found: list[tuple[int, int] | None],
    ) -> tuple[dict[str, float | None], dict[str, bool]]:
        """Write the batch, and each record's entry in the due index; returns the
        entries it leaves (see _due_known) and what it learnt of kinds (see
        _kinds_indexed)."""
        now = time.time()
        indexed: dict[str, float | None] = {}
        kinds: dict[str, bool] = {}
        for operation, db_key, stored in zip(operations, db_keys, found, strict=True):
            if isinstance(operation, Put):
                record = operation.record
                if not write_row(cache, db_key, encode_record(record), now):
                    # Created: over a tombstone, if it had one (a rare path).
                    cache._sql("DELETE FROM Cache WHERE key = ? AND raw = 1",
                               (TOMBSTONE + db_key,))
                kind, key = record.kind, record.key
                due = due_of(record) if record.reminders else None
            else:
                # The row only: diskcache's `delete` would also delete the file that a
                # (crafted) row names.
                cache._sql("DELETE FROM Cache WHERE key = ? AND raw = 1", (db_key,))
                if stored is not None:
                    write_row(cache, TOMBSTONE + db_key, encode_tombstone(stored), now)
                kind, key, due = operation.kind, operation.key, None
            if db_key in indexed:
                known = indexed[db_key]
            elif db_key in self._due_known:
                known = self._due_known[db_key]
            else:
                known = self._unknown_due(cache, kind, kinds)
            if due != known:  # the hot path, a record without reminders, skips this
                if due is None:
                    cache._sql(DROP_DUE, (kind, key))
                else:
                    cache._sql(SET_DUE, (kind, key, due))
            indexed[db_key] = due
        return indexed, kinds

    def _unknown_due(
        self, cache: diskcache.Cache, kind: str, learnt: dict[str, bool]
    ) -> float | None:
        """The entry of a key of *kind* missing from _due_known: None if the kind had
        no entry when this store looked (every entry of the kind added since is in
        _due_known), else _UNKNOWN. One indexed query per kind (what it finds goes
        into *learnt*), inside the write transaction, valid as long as _due_known is:
        a kind without reminders never touches the index, not even on the first write
        of each key."""
        has_entries = self._kinds_indexed.get(kind)
        if has_entries is None:
            has_entries = learnt.get(kind)
        if has_entries is None:
            has_entries = learnt[kind] = cache._sql(ANY_DUE, (kind,)).fetchone() is not None
        return _UNKNOWN if has_entries else None

    def _stored(self, db_key: str) -> tuple[int, int] | None:
        """The (version, epoch) of a record, or of its tombstone; None if neither."""
        record = self._read(*db_key.split(SEPARATOR, 1))
        if record is not None:
            return record.version, record.epoch
        return self._tombstone(db_key)

    def _stored_leniently(self, db_key: str) -> tuple[int, int] | None:
        """`_stored`, for a row that may be unreadable: from its header if it has
        one, else its tombstone's (the row's own version is then lost)."""
        row = self._opened()._con.execute(_SELECT_VALUE, (db_key,)).fetchone()
        stored = None if row is None else stored_in_header(row[0])
        return stored if stored is not None else self._tombstone(db_key)

    def _tombstone(self, db_key: str) -> tuple[int, int] | None:
        row = self._opened()._con.execute(_SELECT_VALUE, (TOMBSTONE + db_key,)).fetchone()
        return None if row is None else stored_in_header(row[0])

    async def claim(self, kind: str, key: str) -> Claim:
        """Raise the stored epoch of (*kind*, *key*) by one, in one transaction, and
        return the `Claim`. Nothing is written for a key with no record."""
        return await self._run(lambda: self._claim(kind, key))

    def _claim(self, kind: str, key: str) -> Claim:
        cache = self._writable()
        db_key = row_key(kind, key)
        try:
            with cache.transact():
                record = self._read(kind, key)
                if record is None:
                    version, epoch = self._tombstone(db_key) or (0, 0)
                    return Claim(record=None, epoch=epoch + 1, version=version)
                record = attrs.evolve(record, epoch=record.epoch + 1)
                write_row(cache, db_key, encode_record(record), time.time())
        except (PersistenceError, ValueError):  # refused: nothing was written
            raise
        except Exception as exc:
            self._forget()
            raise PersistenceError(f"{kind}/{key}: the store could not claim it: {exc}") from exc
        self._versions[db_key] = (record.version, record.epoch)
        return Claim(record=record, epoch=record.epoch, version=record.version)

    def _known_versions(self, cache: diskcache.Cache) -> dict[str, tuple[int, int] | None]:
        """The versions this store committed or read, valid while no other connection
        has committed to the database since (SQLite's ``data_version`` tells, read in
        the write transaction, so nobody can commit between the check and the writes).
        They spare the read of every row before its conditional write."""
        data_version = cache._sql("PRAGMA data_version").fetchone()[0]
        if data_version != self._data_version or len(self._versions) > _VERSIONS_KEPT:
            self._forget()
            self._data_version = data_version
        return self._versions

    async def kinds(self) -> set[str]:
        """Every kind with a stored record: one indexed query per kind, each a job of
        its own on the store's thread (other work goes on in between)."""
        found: set[str] = set()
        after = " "  # kinds are printable: they sort after the format row
        while True:
            db_key = await self._run(functools.partial(self._next_key_from, after))
            if db_key is None:
                return found
            kind, separator, _ = db_key.partition(SEPARATOR)
            if separator:
                found.add(kind)
                after = kind + _AFTER_SEPARATOR  # past every key of that kind
            else:
                after = db_key + "\x00"  # a row trio-pgs did not write: step over it

    async def due(
        self, kinds: Sequence[str], *, after: Due | None = None, limit: int = 1000
    ) -> list[Due]:
        """The due index's entries of *kinds*, earliest first (then by kind and key),
        strictly after *after* if given, at most *limit* of them: one job on the store's
        thread, which reads *limit* entries per query whatever the index holds.

        A row of the index that trio-pgs would not write (another type, an empty key,
        no finite time) is never listed; an index that cannot be read (its table
        dropped or replaced) raises `PersistenceError`."""
        if isinstance(kinds, str):
            raise TypeError(f"due() takes a sequence of kinds, not the str {kinds!r}")
        for kind in kinds:
            row_key(kind, "-")  # a kind that could name no record is refused
        wanted = sorted(set(kinds))
        limit = operator.index(limit)
        if not wanted or limit <= 0:
            return []
        return await self._run(lambda: self._due(wanted, after, limit))

    def _due(self, kinds: list[str], after: Due | None, limit: int) -> list[Due]:
        self._check_file()
        connection = self._keys if self._cache is None else self._cache._con
        if connection is None:
            raise PersistenceError(f"{self!r} is not open")
        try:
            if self._cache is None and not has_due_table(connection):
                return []  # read-only, a store from before the due index: none is due
            pages = [
                connection.execute(*due_query(chunk, after, limit)).fetchall()
                for chunk in chunks(kinds, DUE_KINDS_PER_QUERY)
            ]
        except sqlite3.Error as exc:
            raise PersistenceError(
                f"{self!r}: the due index ({DUE_TABLE}) could not be read: {exc}"
            ) from exc
        rows = pages[0] if len(pages) == 1 else itertools.islice(heapq.merge(*pages), limit)
        return [Due(float(due), kind, key) for due, kind, key in rows]

    async def scan(
        self, kind: str, *, on_skip: Callable[[str, PersistenceError], None] | None = None
    ) -> AsyncIterator[Record]:
        """The records of *kind*, in key order, read in chunks through the key index
        (each chunk a job of its own on the store's thread).

        A row that is not a valid record is skipped: ``on_skip(key, error)`` is called
        for it (on the trio thread) if given, else a warning is logged.
        """
        row_key(kind, "-")  # the kind is checked before it reads anything
        after, end = kind + SEPARATOR, kind + _AFTER_SEPARATOR
        while True:
            chunk, skipped, last = await self._run(
                functools.partial(self._scan_chunk, after, end)
            )
            for key, error in skipped:
                if on_skip is not None:
                    on_skip(key, error)
                else:
                    logger.warning("scan skipped %s/%s: %s", kind, key, error,
                                   extra={"kind": kind, "key": key})
            for record in chunk:
                yield record
            if last is None:
                break
            after = last

    def _index(self) -> sqlite3.Connection:
        """A read-only connection to the cache's database, for range queries on its
        key index: diskcache's own `iterkeys` pages with a query SQLite cannot answer
        from the index, which is quadratic in the number of rows. (Opened read-only,
        the store's one connection.)"""
        if self._keys is None:
            if self.read_only:
                raise PersistenceError(f"{self!r} is not open")
            path = pathlib.Path(self.directory, diskcache.core.DBNAME).absolute()
            self._keys = sqlite3.connect(path.as_uri() + "?mode=ro", uri=True)
        return self._keys

    def _next_key_from(self, lower: str) -> str | None:
        self._check_file()
        row = self._index().execute(
            "SELECT key FROM Cache WHERE raw = 1 AND key >= ? ORDER BY key LIMIT 1", (lower,)
        ).fetchone()
        return None if row is None else str(row[0])

    def _scan_chunk(
        self, after: str, end: str
    ) -> tuple[list[Record], list[tuple[str, PersistenceError]], str | None]:
        """Up to _SCAN_CHUNK records with keys in (after, end), the keys of the rows
        that are not valid records, and the last key read (None when the range is
        exhausted)."""
        self._check_file()
        rows = self._index().execute(
            "SELECT key, mode, filename, value FROM Cache"
            " WHERE raw = 1 AND key > ? AND key < ? ORDER BY key LIMIT ?",
            (after, end, _SCAN_CHUNK),
        ).fetchall()
        found: list[Record] = []
        skipped: list[tuple[str, PersistenceError]] = []
        for db_key, mode, filename, value in rows:
            ident = split_key(db_key)
            if ident is None:
                continue
            try:
                found.append(decode_row(*ident, mode, filename, value))
            except PersistenceError as exc:
                skipped.append((ident[1], exc))
        return found, skipped, (rows[-1][0] if len(rows) == _SCAN_CHUNK else None)
