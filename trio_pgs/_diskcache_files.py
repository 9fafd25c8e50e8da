"""A `DiskCacheStore`'s directory: the lock that keeps it to one process, the wait for
a close of this process still under way, and the read-only connection that never
writes."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pathlib
import socket
import sqlite3
import threading
from collections.abc import Iterator

import diskcache
import diskcache.core
import trio

from ._errors import PersistenceError

#: The file in a store's directory that a process holding the store has locked (flock),
#: holding that process's pid and host name.
LOCK_NAME = "trio-pgs.lock"

#: The file in a store's directory while the store is being created (`creating`): an
#: empty database file beside it is a creation cut short (a kill), not a truncated copy.
CREATING_NAME = "trio-pgs.creating"


@contextlib.contextmanager
def creating(directory: str) -> Iterator[None]:
    """Create a store in *directory* (locked by this process) within the block: an
    empty database file left by a creation cut short is removed first, and one left
    otherwise refused. The marker goes once the block has made the store whole."""
    database = os.path.join(directory, diskcache.core.DBNAME)
    marker = os.path.join(directory, CREATING_NAME)
    if os.path.isfile(database) and os.path.getsize(database) == 0:
        if not os.path.exists(marker):
            # SQLite would take an empty file for an empty database, and a truncated
            # copy of a store would open as a new, empty one.
            raise PersistenceError(
                f"{directory!r} is not a valid trio-pgs store: its database file "
                f"({diskcache.core.DBNAME}) is empty. Restore it from a backup, or "
                "remove it to start afresh"
            )
        for leftover in (database, database + "-wal", database + "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(leftover)
    new = not os.path.exists(database)
    if new:
        with open(marker, "wb") as file:
            os.fsync(file.fileno())
    yield
    if new or os.path.exists(marker):
        os.remove(marker)


def lock_directory(directory: str) -> int:
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


def closing(path: str) -> threading.Event:
    """Note that the store of this process on *path* (absolute) is closing; pass the
    event returned to `closed` once it has."""
    event = threading.Event()
    with _closing_lock:
        _closing[path] = event
    return event


def closed(path: str, event: threading.Event) -> None:
    """The store on *path* that `closing` gave *event* has closed (its lock is gone)."""
    event.set()
    with _closing_lock:
        if _closing.get(path) is event:
            del _closing[path]

async def closed_in_background(path: str) -> None:
    """Wait until a store of this process on *path* (absolute) that is still closing
    has closed, so that a restart in the same process is not refused by a lock about to
    go. In a thread, in real time: a mock clock must not skip the wait."""
    with _closing_lock:
        closed = _closing.get(path)
    if closed is not None:
        await trio.to_thread.run_sync(closed.wait, _CLOSING_WAIT, abandon_on_cancel=True)


def connect_read_only(path: pathlib.Path) -> sqlite3.Connection:
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


def not_a_store(directory: str, exc: sqlite3.Error) -> PersistenceError | None:
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
