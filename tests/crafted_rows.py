"""Hostile rows for a `DiskCacheStore` directory, and ways to see what reading them did.

diskcache honours a row's ``mode`` and ``filename`` columns: a row may say "my value is
in this file". trio-pgs must treat such a row as data it cannot read, and never open,
stat or delete the file it names. These helpers write such rows straight into the
Cache table (as anybody able to write the directory could), and watch the file system.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import diskcache.core

SEPARATOR = "\x1f"


def craft_row(
    directory: Path,
    kind: str,
    key: str,
    *,
    mode: int = diskcache.core.MODE_BINARY,
    filename: str | None = None,
    value: Any = None,
) -> None:
    """Write a row for kind/key with the given columns, over any row already there."""
    now = time.time()
    with contextlib.closing(sqlite3.connect(directory / diskcache.core.DBNAME)) as con:
        with con:
            con.execute(
                "INSERT OR REPLACE INTO Cache (key, raw, store_time, expire_time, access_time,"
                " access_count, tag, size, mode, filename, value)"
                " VALUES (?, 1, ?, NULL, ?, 0, NULL, 0, ?, ?, ?)",
                (kind + SEPARATOR + key, now, now, mode, filename, value),
            )


def row_exists(directory: Path, kind: str, key: str) -> bool:
    with contextlib.closing(sqlite3.connect(directory / diskcache.core.DBNAME)) as con:
        found = con.execute(
            "SELECT 1 FROM Cache WHERE key = ? AND raw = 1", (kind + SEPARATOR + key,)
        ).fetchone()
    return found is not None


def unblock_fifo(fifo: Path) -> None:
    """Let a reader stuck opening *fifo* go on (it then reads an empty stream)."""
    try:
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:
        return  # nobody is reading it
    os.close(fd)


@contextlib.contextmanager
def unblocking(fifo: Path, after: float = 5.0) -> Iterator[None]:
    """From *after* seconds on, keep unblocking readers of *fifo* in the background until
    the block ends: a regression (a store thread stuck opening the FIFO) then fails its
    test, under a shorter deadline, instead of wedging that thread for good."""
    done = threading.Event()
    start = time.monotonic()

    def work() -> None:
        while not done.wait(0.05):
            if time.monotonic() - start >= after:
                unblock_fifo(fifo)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


# -- a guard on the file system, from every thread of this process -----------------------

_EVENTS = frozenset({"open", "os.remove", "os.rmdir", "os.rename", "os.truncate"})
_watched: set[str] = set()
_touched: list[tuple[str, str]] = []
_installed = False


def _hook(event: str, args: tuple[Any, ...]) -> None:
    if event not in _EVENTS or not _watched or not args:
        return
    path = args[0]
    if not isinstance(path, (str, bytes, os.PathLike)):
        return  # a file descriptor
    full = os.path.abspath(os.fsdecode(path))
    if full in _watched:
        _touched.append((event, full))
        raise PermissionError(f"the test's guard refused {event} of {full}")


@contextlib.contextmanager
def guarded(*paths: Path | str) -> Iterator[list[tuple[str, str]]]:
    """Refuse (PermissionError) and record every open, removal or rename of *paths*
    while the block runs: a regression that would read ``/dev/zero`` until memory runs
    out fails instead. Yields the list of what was attempted."""
    global _installed
    if not _installed:
        sys.addaudithook(_hook)  # cannot be removed: it does nothing once unwatched
        _installed = True
    names = {os.path.abspath(os.fspath(path)) for path in paths}
    _watched.update(names)
    _touched.clear()
    try:
        yield _touched
    finally:
        _watched.difference_update(names)


@contextlib.contextmanager
def immutable_directory(path: Path) -> Iterator[None]:
    """*path* made read-only for everyone, root included (``chattr +i``: plain modes
    do not stop root). Fails, rather than skips, where that cannot be done: the
    read-only cases must run wherever the suite runs."""
    chattr = shutil.which("chattr")
    if chattr is None or subprocess.run([chattr, "+i", str(path)]).returncode:
        raise AssertionError(f"cannot make {path} read-only (chattr +i); the read-only "
                             "store tests need it (install e2fsprogs; a file system "
                             "with attributes)")
    try:
        yield
    finally:
        subprocess.run([chattr, "-i", str(path)], check=True)
