"""What goes in and out of a `DiskCacheStore` row: a record as one inline bytes value
(a JSON header line, then the state, the history and the reminders), a deleted
record's tombstone, the Cache table's keys, and the diskcache `Disk` that never
pickles.

Rule of this module: rows are data, never instructions. A row that holds a pickle or
names a file is refused, and no file it names is opened or deleted.
"""

from __future__ import annotations

import json
import math
import sqlite3
from typing import Any

import diskcache
import diskcache.core

from ._errors import PersistenceError
from ._schedule import pack_reminders, unpack_reminders
from ._store import Delete, Operation, Put, Record

#: Separates kind and key in a diskcache key; kinds may not contain it.
SEPARATOR = "\x1f"
#: The row that marks a directory as a trio-pgs store, with the record format version.
FORMAT_KEY = SEPARATOR + "trio-pgs-format"
FORMAT = "1"

#: Before a deleted record's db key, the key of its tombstone: a row holding its last
#: version and epoch, so that a record created again continues them. It sorts before
#: every kind (kinds are printable), so scans and kinds() never meet it.
TOMBSTONE = SEPARATOR + "tombstone" + SEPARATOR


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


def write_row(cache: diskcache.Cache, db_key: str, value: bytes, now: float) -> bool:
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


def encode_tombstone(stored: tuple[int, int]) -> bytes:
    return b'{"v":%d,"e":%d}' % stored


def stored_in_header(value: object) -> tuple[int, int] | None:
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


def row_key_of(operation: Operation) -> str:
    if isinstance(operation, Put):
        return row_key(operation.record.kind, operation.record.key)
    return row_key(operation.kind, operation.key)


def unconditional(operation: Operation) -> bool:
    """A delete that checks nothing (a purge): it never decodes the row."""
    return (
        isinstance(operation, Delete)
        and operation.expected_version is None and operation.epoch is None
    )
