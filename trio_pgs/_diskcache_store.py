"""`DiskCacheStore`: the embedded default, on a diskcache (SQLite) directory."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import heapq
import itertools
import json
import logging
import math
import operator
import os
import pathlib
import socket
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, TypeVar

import attrs
import diskcache
import diskcache.core
import trio

from ._errors import PersistenceError
from ._schedule import (
    Due,
    pack_reminders,
    unpack_reminders,
)
from ._store import Claim, Delete, Operation, Put, Record, check_version, due_of
from ._thread import DedicatedThread

T = TypeVar("T")
logger = logging.getLogger("trio_pgs.store")

#: Separates kind and key in a diskcache key; kinds may not contain it.
SEPARATOR = "\x1f"
#: The row that marks a directory as a trio-pgs store, with the record format version.
FORMAT_KEY = SEPARATOR + "trio-pgs-format"
FORMAT = "1"
_SCAN_CHUNK = 1000
#: Versions remembered at most (see _known_versions): a bound, not a per-server cost.
_VERSIONS_KEPT = 100_000
#: The character right after SEPARATOR: kind + _AFTER_SEPARATOR sorts after every key
#: of that kind.
_AFTER_SEPARATOR = chr(ord(SEPARATOR) + 1)
#: The file in a store's directory that a process holding the store has locked (flock),
#: holding that process's pid and host name.
LOCK_NAME = "trio-pgs.lock"
#: A row's columns, read with SQL: never through diskcache's `get`, which opens the file
#: a row names (a FIFO hangs it, /dev/zero fills the memory).
_SELECT_ROW = "SELECT mode, filename, value FROM Cache WHERE key = ? AND raw = 1"
_SELECT_VALUE = "SELECT value FROM Cache WHERE key = ? AND raw = 1"
#: Before a deleted record's db key, the key of its tombstone: a row holding its last
#: version and epoch, so that a record created again continues them. It sorts before
#: every kind (kinds are printable), so scans and kinds() never meet it.
TOMBSTONE = SEPARATOR + "tombstone" + SEPARATOR
#: The due index (`SupportsReminders`): a table of its own in the cache's database, one
#: row per record whose `due_of` is not None, written in the transaction that writes the
#: record. Ordered by (kind, due, key), so that `due` seeks each kind at its cursor and
#: SQLite merges the kinds in order (a (due, kind, key) index cannot seek a cursor among
#: many equal due times, and walks the entries of every other kind).
DUE_TABLE = "trio_pgs_due"
_CREATE_DUE = (
    f"CREATE TABLE IF NOT EXISTS {DUE_TABLE} (kind TEXT NOT NULL, key TEXT NOT NULL,"
    " due REAL NOT NULL, PRIMARY KEY (kind, key)) WITHOUT ROWID",
    f"CREATE INDEX IF NOT EXISTS {DUE_TABLE}_order ON {DUE_TABLE} (kind, due, key)",
)
_SET_DUE = f"INSERT OR REPLACE INTO {DUE_TABLE} (kind, key, due) VALUES (?, ?, ?)"
_DROP_DUE = f"DELETE FROM {DUE_TABLE} WHERE kind = ? AND key = ?"
_ANY_DUE = f"SELECT 1 FROM {DUE_TABLE} WHERE kind = ? LIMIT 1"
#: What makes a row of the due table an entry `due` returns: a foreign or hand-made
#: row (another type, an empty key, a time that is no finite number) is never listed.
_VALID_DUE = (
    " AND typeof(key) = 'text' AND key <> '' AND typeof(due) = 'real'"
    " AND abs(due) <= 1.7976931348623157e308"  # not a constraint the index could take
)
#: Kinds per query of `due` (a UNION ALL of one SELECT per kind; SQLite allows 500).
_DUE_KINDS_PER_QUERY = 100
#: The due entry of a key that this store does not know (see _due_known): NaN, unequal
#: to every time, and not None, so that the key's next write writes its entry.
_UNKNOWN = math.nan


class RefusedPickle(PersistenceError):
    """A stored row holds a pickle, which trio-pgs never loads (it could run code)."""


class _PickledKey:
    pass


_PICKLED_KEY = _PickledKey()


class SafeDisk(diskcache.Disk):  # type: ignore[misc]
    """A diskcache `Disk` that stores only `bytes` and `str`, and never unpickles.

    diskcache pickles anything else by default, and unpickles whatever a row says is a
    pickle: anyone able to write the cache file could run code in the application
    (CVE-2025-69872). This disk refuses both directions.
    """

    def put(self, key: Any) -> tuple[Any, bool]:
        if type(key) is not str:
            raise TypeError(f"trio-pgs stores use str keys only, not {type(key).__name__}")
        return super().put(key)  # type: ignore[no-any-return]

    def get(self, key: Any, raw: bool) -> Any:
        if not raw:
            return _PICKLED_KEY
        return super().get(key, raw)

    def store(self, value: Any, read: bool, key: Any = diskcache.core.UNKNOWN) -> Any:
        if read or type(value) not in (bytes, str):
            raise TypeError(
                f"trio-pgs stores bytes and str only, not {type(value).__name__}; "
                "nothing is pickled"
            )
        return super().store(value, read, key=key)

    def fetch(self, mode: int, filename: str | None, value: Any, read: bool) -> Any:
        # trio-pgs reads rows with its own SQL (decode_row); this is the second line.
        if mode == diskcache.core.MODE_PICKLE:
            raise RefusedPickle(
                "a row of this store holds a pickle; trio-pgs refuses to load it "
                "(somebody other than trio-pgs wrote it). Inspect or purge that row."
            )
        if mode != diskcache.core.MODE_RAW or filename is not None:
            raise PersistenceError(
                "a row of this store is not an inline value; trio-pgs never reads the "
                "file a row names. Inspect or purge that row."
            )
        return super().fetch(mode, filename, value, read)

    def remove(self, file_path: str) -> None:
        """Delete nothing: trio-pgs writes no value files, so a file that a row names
        is somebody else's (diskcache would delete it with the row)."""


def encode_record(record: Record) -> bytes:
    """A header line of JSON, then the state's bytes, the history's, and the
    reminders' (as `pack_reminders` writes them; a record without reminders is written
    as before they existed)."""
    version, state_version, epoch, updated_at = (
        record.version, record.state_version, record.epoch, record.updated_at
    )
    if (
        not record.crashes and not record.quarantined and not record.history
        and type(version) is int and type(state_version) is int and type(epoch) is int
        and type(updated_at) is float and math.isfinite(updated_at)
    ):
        # The common record, formatted directly: the same bytes as json.dumps below,
        # at a fifth of its cost (this runs once per record written).
        if not record.reminders:
            return b"%s\n%s" % (
                b'{"v":%d,"sv":%d,"e":%d,"t":%s,"n":[%d]}'
                % (version, state_version, epoch, repr(updated_at).encode(), len(record.data)),
                record.data,
            )
        reminders = _encode_reminders(record)
        return b'{"v":%d,"sv":%d,"e":%d,"t":%s,"n":[%d],"r":%d}\n%s%s' % (
            version, state_version, epoch, repr(updated_at).encode(), len(record.data),
            len(reminders), record.data, reminders,
        )
    header = {
        "v": record.version,
        "sv": record.state_version,
        "e": record.epoch,
        "t": record.updated_at,
        "n": [len(record.data), *(len(old) for old in record.history)],
    }
    if record.crashes:
        header["c"] = list(record.crashes)
    if record.quarantined:
        header["q"] = True
    reminders = _encode_reminders(record)
    if reminders:
        header["r"] = len(reminders)
    encoded = json.dumps(header, separators=(",", ":")).encode()
    return b"".join((encoded, b"\n", record.data, *record.history, reminders))


def _encode_reminders(record: Record) -> bytes:
    """The record's reminders as the bytes its row keeps after the history (b"" for
    none). ``ValueError``, and nothing is written, for reminders that would not read
    back (`pack_reminders` says which)."""
    if not record.reminders:
        return b""
    try:
        return pack_reminders(record.reminders).encode()
    except ValueError as exc:
        raise ValueError(f"{record.kind}/{record.key}: {exc}; nothing was written") from None


def decode_record(kind: str, key: str, value: object) -> Record:
    if not isinstance(value, bytes):
        raise PersistenceError(
            f"{kind}/{key}: the stored row is {type(value).__name__}, not a trio-pgs "
            "record; it was written by something else"
        )
    line, newline, body = value.partition(b"\n")
    try:
        header = json.loads(line)
        sizes = header["n"]
        parts, offset = [], 0
        for size in sizes:
            parts.append(body[offset : offset + size])
            offset += size
        reminders = header.get("r", 0)
        if type(reminders) is not int or reminders < 0:
            raise ValueError("the reminders' length in the header is not a count")
        text, offset = body[offset : offset + reminders], offset + reminders
        if not newline or offset != len(body):
            raise ValueError("the lengths in the header do not match the row")
        return Record(
            kind=kind,
            key=key,
            data=parts[0],
            version=header["v"],
            state_version=header["sv"],
            epoch=header["e"],
            updated_at=header["t"],
            crashes=tuple(header.get("c", ())),
            quarantined=bool(header.get("q", False)),
            history=tuple(parts[1:]),
            reminders=unpack_reminders(text.decode()),
        )
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise PersistenceError(
            f"{kind}/{key}: the stored row is not a valid trio-pgs record ({exc}); "
            "inspect or purge it"
        ) from exc


def decode_row(kind: str, key: str, mode: object, filename: object, value: object) -> Record:
    """The record in a Cache row, from its columns alone. Rows are data, never
    instructions: a row that is not an inline bytes value (one that names a file, or
    holds a pickle) is refused, and the file it names is never opened, looked at or
    deleted."""
    if mode == diskcache.core.MODE_PICKLE:
        raise RefusedPickle(
            f"{kind}/{key}: a row of this store holds a pickle; trio-pgs refuses to load it "
            "(somebody other than trio-pgs wrote it). Inspect or purge that row."
        )
    if filename is not None:
        shown = repr(filename)
        if len(shown) > 200:
            shown = shown[:200] + "..."
        raise PersistenceError(
            f"{kind}/{key}: the stored row is not a valid trio-pgs record: it names a file "
            f"({shown}), and trio-pgs keeps every value inside the database and never reads "
            "a file a row names. Inspect or purge it (purging deletes the row only)"
        )
    if mode != diskcache.core.MODE_RAW:
        raise PersistenceError(
            f"{kind}/{key}: the stored row is not a valid trio-pgs record (its diskcache "
            f"mode is {mode!r}, not an inline value); inspect or purge it"
        )
    return decode_record(kind, key, value)


def _write_row(cache: diskcache.Cache, db_key: str, value: bytes, now: float) -> bool:
    """``cache.set(db_key, value)`` inside the open transaction, in one statement for
    an existing row. Its columns get what diskcache's own `set` writes for inline bytes
    (our `SafeDisk` stores nothing else). A new row goes through `set` (and False is
    returned: the row was created). diskcache's
    `set` reads the row before it updates it, which was a third of the store thread's
    time per record; and over a row that names a file, it would delete that file."""
    updated = cache._sql(
        "UPDATE Cache SET store_time = ?, expire_time = NULL, access_time = ?,"
        " access_count = 0, tag = NULL, size = 0, mode = ?, filename = NULL, value = ?"
        " WHERE key = ? AND raw = 1",
        (now, now, diskcache.core.MODE_RAW, sqlite3.Binary(value), db_key),
    ).rowcount
    if not updated:
        cache.set(db_key, value)
    return bool(updated)


def split_key(db_key: object) -> tuple[str, str] | None:
    if not isinstance(db_key, str) or db_key == FORMAT_KEY or db_key.startswith(TOMBSTONE):
        return None
    kind, separator, key = db_key.partition(SEPARATOR)
    return (kind, key) if separator else None


def _encode_tombstone(stored: tuple[int, int]) -> bytes:
    return b'{"v":%d,"e":%d}' % stored


def _stored_in_header(value: object) -> tuple[int, int] | None:
    """The (version, epoch) in a row's header or a tombstone, read from its value
    column alone; None if it holds none (a row trio-pgs did not write)."""
    if not isinstance(value, bytes):
        return None
    try:
        header = json.loads(value.partition(b"\n")[0])
        version, epoch = header["v"], header["e"]
    except (ValueError, KeyError, TypeError):
        return None
    if type(version) is not int or type(epoch) is not int:
        return None
    return version, epoch


def row_key(kind: str, key: str) -> str:
    """The Cache table's key of (*kind*, *key*). A kind is non-empty and holds no
    SEPARATOR: anything else could name another row (a tombstone, the format marker,
    another kind's record), and is refused."""
    if not isinstance(kind, str) or not kind or SEPARATOR in kind:
        raise ValueError(
            f"a server kind must be a non-empty str without {SEPARATOR!r}, not {kind!r}"
        )
    if not isinstance(key, str) or not key:
        raise ValueError(f"a server key must be a non-empty str, not {key!r}")
    return kind + SEPARATOR + key


def _db_key(operation: Operation) -> str:
    if isinstance(operation, Put):
        return row_key(operation.record.kind, operation.record.key)
    return row_key(operation.kind, operation.key)


def _unconditional(operation: Operation) -> bool:
    """A delete that checks nothing (a purge): it never decodes the row."""
    return (
        isinstance(operation, Delete)
        and operation.expected_version is None and operation.epoch is None
    )


def _due_query(
    kinds: list[str], after: Due | None, limit: int
) -> tuple[str, list[object]]:
    """The query of `DiskCacheStore.due` for *kinds*: for each kind, a seek in the due
    index to its first entry after *after*, and SQLite merges the kinds in order (a
    UNION ALL whose parts each come in order needs no sort), reading at most *limit*
    entries in all."""
    parts, parameters = [], []
    for kind in kinds:
        if after is None:
            since, values = "", []
        elif kind == after.kind:
            since, values = " AND (due, key) > (?, ?)", [after.due, after.key]
        elif kind > after.kind:  # its entries at after.due come after *after*
            since, values = " AND due >= ?", [after.due]
        else:
            since, values = " AND due > ?", [after.due]
        parts.append(f"SELECT due, kind, key FROM {DUE_TABLE} WHERE kind = ?{since}{_VALID_DUE}")
        parameters += [kind, *values]
    sql = " UNION ALL ".join(parts) + " ORDER BY 1, 2, 3 LIMIT ?"
    return sql, [*parameters, limit]


def _chunks(items: list[str], size: int) -> list[list[str]]:
    return [items[start : start + size] for start in range(0, len(items), size)]


def _has_due_table(connection: sqlite3.Connection) -> bool:
    found = connection.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (DUE_TABLE,)
    ).fetchone()
    return found is not None


def _lock_directory(directory: str) -> int:
    """Lock *directory* for this process (an exclusive `flock` on its lock file, which
    the OS releases when the file is closed or the process dies) and write the holder's
    pid and host name into the file. Held elsewhere, it raises `PersistenceError`
    naming the holder, at once: it never waits."""
    fd = os.open(
        os.path.join(directory, LOCK_NAME), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644
    )
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 1024, 0)
        os.close(fd)
        raise PersistenceError(_in_use(directory, holder)) from None
    except BaseException:
        os.close(fd)
        raise
    me = json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, me + b"\n", 0)
    return fd


def _in_use(directory: str, holder: bytes) -> str:
    """The refusal of a store directory locked by *holder* (its lock file's content)."""
    try:
        found = json.loads(holder)
        pid, host = int(found["pid"]), str(found["host"])
    except (ValueError, KeyError, TypeError):
        return (
            f"{directory!r} is in use by another process (it has not written its pid yet): "
            "a DiskCacheStore directory serves one process at a time. Stop that process "
            "first, or open the store with read_only=True to read it meanwhile"
        )
    if pid == os.getpid() and host == socket.gethostname():
        return (
            f"{directory!r} is already open in this process (pid {pid} on host {host!r}), "
            "by another DiskCacheStore: a store directory serves one store object at a "
            "time. Use that one, or close it first (read_only=True opens it for reading "
            "meanwhile)"
        )
    return (
        f"{directory!r} is in use by process {pid} on host {host!r}: a DiskCacheStore "
        "directory serves one process at a time. Stop that process first, or open the "
        "store with read_only=True to read it meanwhile"
    )


#: The directories (absolute paths) of the stores of this process that are closing: a
#: close cut off by its caller (a shutdown's deadline) goes on in the background, and
#: releases the directory's lock only at its end.
_closing: dict[str, threading.Event] = {}
_closing_lock = threading.Lock()
#: How long (real time) an opener waits for such a close: it waits behind at most the
#: one job still running on that store's thread.
_CLOSING_WAIT = 30.0


async def _closed_in_background(path: str) -> None:
    """Wait until a store of this process on *path* (absolute) that is still closing
    has closed, so that a restart in the same process is not refused by a lock about to
    go. In a thread, in real time: a mock clock must not skip the wait."""
    with _closing_lock:
        closed = _closing.get(path)
    if closed is not None:
        await trio.to_thread.run_sync(closed.wait, _CLOSING_WAIT, abandon_on_cancel=True)


def _connect_read_only(path: pathlib.Path) -> sqlite3.Connection:
    """A connection that can only read the database at *path*, and never writes it.

    ``mode=ro`` first: it reads a store while an application writes to it (SQLite's WAL
    index keeps the reader consistent). On read-only media it fails when the store was
    closed cleanly: a WAL reader needs the ``-shm`` and ``-wal`` files, which exist
    only while the store is open, and cannot be created there. Then, and only if there
    is no ``-wal`` file, it opens with ``immutable=1``, which reads the file with no
    locking at all: safe there because with no ``-wal`` file no writer has the store
    open, and none can start on media where that file cannot be created. Used for every
    read-only open, ``immutable=1`` would let a listing read pages that a running
    application is rewriting.
    """
    uri = path.absolute().as_uri()
    connection = sqlite3.connect(uri + "?mode=ro", uri=True)
    try:
        connection.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()  # opens it
        return connection
    except BaseException as exc:
        connection.close()  # whatever failed (a file that is no database too)
        if not isinstance(exc, sqlite3.OperationalError) or os.path.lexists(f"{path}-wal"):
            raise
    connection = sqlite3.connect(uri + "?mode=ro&immutable=1", uri=True)
    try:
        connection.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()
    except BaseException:
        connection.close()
        raise
    return connection


def _not_a_store(directory: str, exc: sqlite3.Error) -> PersistenceError | None:
    """What an SQLite error met while opening a store's database says about it, if it
    says that the database is not a store's (None: another failure)."""
    message = str(exc)
    if "no such table" in message:
        found = f"its {diskcache.core.DBNAME} has no diskcache table"
    elif "not a database" in message:
        found = f"its {diskcache.core.DBNAME} is not an SQLite database ({message})"
    elif "malformed" in message:
        return PersistenceError(
            f"the store in {directory!r} is damaged: {diskcache.core.DBNAME}: {message}. "
            "Restore the directory from a backup"
        )
    else:
        return None
    return PersistenceError(f"{directory!r} is not a trio-pgs store: {found}")


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
        self._path = os.path.abspath(self.directory)  # see _closing
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
            await _closed_in_background(self._path)
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
            self._lock = _lock_directory(self.directory)
        except OSError as exc:
            raise PersistenceError(
                f"cannot open the store directory {self.directory!r}: {exc}. "
                "Check that it is a writable directory (or a path where one can be made)."
            ) from exc
        try:
            self._cache = self._open_cache()
            self._identity = self._file_identity()
        except BaseException:
            self._close()
            raise

    def _open_cache(self) -> diskcache.Cache:
        database = os.path.join(self.directory, diskcache.core.DBNAME)
        if os.path.isfile(database) and os.path.getsize(database) == 0:
            # SQLite would take an empty file for an empty database, and a truncated
            # copy of a store would open as a new, empty one.
            raise PersistenceError(
                f"{self.directory!r} is not a valid trio-pgs store: its database file "
                f"({diskcache.core.DBNAME}) is empty. Restore it from a backup, or remove "
                "it to start afresh"
            )
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
            if isinstance(exc, sqlite3.Error) and (error := _not_a_store(self.directory, exc)):
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
            for statement in _CREATE_DUE:
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
            self._keys = _connect_read_only(path)
            if self._format(self._keys) is None:
                raise PersistenceError(
                    f"{self.directory!r} is not a trio-pgs store (its database has no "
                    "trio-pgs format marker)"
                )
            self._identity = self._file_identity()
        except BaseException as exc:
            self._close()
            if isinstance(exc, sqlite3.Error):
                error = _not_a_store(self.directory, exc) or PersistenceError(
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
        closed = threading.Event()
        directory = self._path
        with _closing_lock:
            _closing[directory] = closed

        def close() -> None:
            try:
                self._close()
            finally:
                closed.set()
                with _closing_lock:
                    if _closing.get(directory) is closed:
                        del _closing[directory]

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
        db_keys = [_db_key(operation) for operation in operations]
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
            elif _unconditional(operation):  # a purge never decodes the row
                current = self._stored_leniently(db_key)
            else:
                current = self._stored(db_key)
            if not _unconditional(operation):
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
                if not _write_row(cache, db_key, encode_record(record), now):
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
                    _write_row(cache, TOMBSTONE + db_key, _encode_tombstone(stored), now)
                kind, key, due = operation.kind, operation.key, None
            if db_key in indexed:
                known = indexed[db_key]
            elif db_key in self._due_known:
                known = self._due_known[db_key]
            else:
                known = self._unknown_due(cache, kind, kinds)
            if due != known:  # the hot path, a record without reminders, skips this
                if due is None:
                    cache._sql(_DROP_DUE, (kind, key))
                else:
                    cache._sql(_SET_DUE, (kind, key, due))
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
            has_entries = learnt[kind] = cache._sql(_ANY_DUE, (kind,)).fetchone() is not None
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
        stored = None if row is None else _stored_in_header(row[0])
        return stored if stored is not None else self._tombstone(db_key)

    def _tombstone(self, db_key: str) -> tuple[int, int] | None:
        row = self._opened()._con.execute(_SELECT_VALUE, (TOMBSTONE + db_key,)).fetchone()
        return None if row is None else _stored_in_header(row[0])

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
                _write_row(cache, db_key, encode_record(record), time.time())
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
            if self._cache is None and not _has_due_table(connection):
                return []  # read-only, a store from before the due index: none is due
            pages = [
                connection.execute(*_due_query(chunk, after, limit)).fetchall()
                for chunk in _chunks(kinds, _DUE_KINDS_PER_QUERY)
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
