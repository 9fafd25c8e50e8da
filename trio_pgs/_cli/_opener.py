"""From the store named on the command line to an open store."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import trio

from .._diskcache_store import DiskCacheStore
from .._errors import ConflictError, PersistenceError
from ._exit import EXIT_USAGE, CommandError

T = TypeVar("T")
_DATABASE = "cache.db"  # the SQLite file of a diskcache directory


def store_at(directory: str, *, create: bool = False, write: bool = False) -> DiskCacheStore:
    """The store in *directory*, checked before opening: opening creates a store, which
    only import may do (in a new or empty directory)."""
    path = Path(directory)
    if path.is_dir():
        if not (path / _DATABASE).is_file() and not (create and not any(path.iterdir())):
            where = "; import into a new or empty directory" if create else ""
            raise CommandError(
                f"{directory} is not a trio-pgs store (it has no {_DATABASE}){where}", EXIT_USAGE
            )
    elif path.exists():
        raise CommandError(f"{directory} is not a directory", EXIT_USAGE)
    elif not create:
        raise CommandError(f"{directory}: no such directory", EXIT_USAGE)
    # Writes are few and a user was told they happened: make them survive a power cut.
    return DiskCacheStore(path, durable=write)


def session(store: DiskCacheStore, work: Callable[[DiskCacheStore], Awaitable[T]]) -> T:
    """Open *store*, run *work* on it under `trio.run`, close it."""

    async def run() -> T:
        try:
            await store.open()
        except PersistenceError as exc:
            raise CommandError(str(exc), EXIT_USAGE) from None
        try:
            return await work(store)
        finally:
            await store.close()

    try:
        return trio.run(run)
    except ConflictError as exc:
        raise CommandError(f"{exc}. That change was not made; look again, then retry.") from None
    except PersistenceError as exc:
        raise CommandError(str(exc)) from None
