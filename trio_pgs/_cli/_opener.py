"""From the store named on the command line to an open store.

Every command names its store with a spec: a directory, or a store URL. `store_from_spec`
is the one place that reads a spec; a new kind of store is a row of `_SCHEMES` (and a
function that makes it), and every command takes it at once.
"""

from __future__ import annotations

import re
import sqlite3
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Protocol, TypeVar

import trio

from .._diskcache_store import DiskCacheStore
from .._errors import ConflictError, PersistenceError
from .._postgres_conn import without_password
from .._postgres_rows import check_ident
from .._postgres_store import PostgresStore
from .._store import Operation, Record
from ._exit import EXIT_FAILED, EXIT_NOT_STARTED, CommandError

T = TypeVar("T")
_DATABASE = "cache.db"  # the SQLite file of a diskcache directory
_SQLITE_MAGIC = b"SQLite format 3\x00"  # how every SQLite database file begins
#: A URL's scheme; two characters at least, so that ``C:\store`` stays a path.
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]+):")


class CommandStore(Protocol):
    """What the commands use of a store: the `Store` protocol, the kinds, and scans
    that report the rows they cannot read."""

    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def load(self, kind: str, key: str) -> Record | None: ...
    async def commit(self, operations: Sequence[Operation]) -> None: ...
    async def kinds(self) -> set[str]: ...

    def scan(
        self, kind: str, *, on_skip: Callable[[str, Exception], None] | None = None
    ) -> AsyncIterator[Record]: ...


#: Makes the store a spec names: (spec, the location after the scheme, write, create).
_Maker = Callable[[str, str, bool, bool], CommandStore]


def store_from_spec(spec: str, *, write: bool, create: bool = False) -> CommandStore:
    """The store *spec* names, checked but not opened. *write*: the command writes
    (else the store is opened read-only, and a read-only store never writes).
    *create*: a new store may be made (only import does, in a new or empty directory).

    Raises `CommandError` (exit status 2) saying what is wrong with *spec*.
    """
    scheme = _SCHEME.match(spec)
    if scheme is None:
        return _diskcache(spec, spec, write, create)
    maker = _SCHEMES.get(scheme.group(1).lower())
    if maker is None:
        raise CommandError(
            f"{_shown(spec)}: unknown store scheme {scheme.group(1)!r}. Give a directory, "
            f"diskcache:PATH or diskcache:///absolute/path (a directory whose name holds a "
            "colon: ./NAME)",
            EXIT_NOT_STARTED,
        )
    return maker(spec, spec[scheme.end() :], write, create)


def session(store: CommandStore, work: Callable[[CommandStore], Awaitable[T]]) -> T:
    """Open *store*, run *work* on it under `trio.run`, close it. A store that cannot
    be opened exits with status 2; a conflict or a failed operation with status 1."""

    async def run() -> T:
        try:
            await store.open()
        except PersistenceError as exc:
            raise CommandError(_not_opened(store, exc), EXIT_NOT_STARTED) from None
        try:
            return await work(store)
        finally:
            await store.close()

    try:
        return trio.run(run)
    except (ValueError, UnicodeError) as exc:  # a kind or key this store cannot hold
        raise CommandError(str(exc), EXIT_NOT_STARTED) from None
    except ConflictError as exc:
        raise CommandError(f"{exc}. That change was not made; look again, then retry.") from None
    except PersistenceError as exc:
        raise CommandError(str(exc), EXIT_FAILED) from None


def check_storable(store: CommandStore, records: Sequence[Record], source: str) -> None:
    """Refuse (exit status 2) records that *store* cannot hold, before it is opened:
    opening may create it (a PostgreSQL schema and its tables), and a refusal must
    leave nothing behind. A diskcache store holds every kind and key that import
    reads; PostgreSQL's text holds no NUL, and its index bounds a kind and key."""
    if not isinstance(store, PostgresStore):
        return
    for record in records:
        try:
            check_ident(record.kind, record.key)
        except ValueError as exc:
            raise CommandError(f"{source}: {exc}; nothing was imported",
                               EXIT_NOT_STARTED) from None


def _shown(spec: str) -> str:
    """*spec* fit for a message: a URL's password hidden (in its user information, or
    as a ``password`` parameter), as the store hides it."""
    return without_password(spec)


#: The name for messages of the store a command names: its password hidden.
shown = _shown


# -- diskcache directories ----------------------------------------------------------------


def _diskcache_url(spec: str, location: str, write: bool, create: bool) -> CommandStore:
    """``diskcache:PATH`` (PATH as written, relative or absolute) or
    ``diskcache://[localhost]/absolute/path``."""
    if location.startswith("//"):
        host, slash, path = location[2:].partition("/")
        if host not in ("", "localhost"):
            raise CommandError(
                f"{spec} names a host ({host}); a diskcache store is a local directory: "
                f"diskcache:///absolute/path or diskcache:relative/path",
                EXIT_NOT_STARTED,
            )
        location = slash + path
    if not location:
        raise CommandError(f"{spec} names no directory", EXIT_NOT_STARTED)
    return _diskcache(spec, location, write, create)


def _diskcache(spec: str, directory: str, write: bool, create: bool) -> CommandStore:
    """The store in *directory*, checked before opening: opening creates a store, which
    only import may do (in a new or empty directory)."""
    path = Path(directory)
    if path.is_dir():
        database = path / _DATABASE
        if database.is_file():
            _check_database(spec, database)
        elif not (create and not any(path.iterdir())):
            where = "; import into a new or empty directory" if create else ""
            raise CommandError(
                f"{spec} is not a trio-pgs store (it has no {_DATABASE}){where}", EXIT_NOT_STARTED
            )
    elif path.exists():
        raise CommandError(f"{spec} is not a directory", EXIT_NOT_STARTED)
    elif not create:
        raise CommandError(f"{spec}: no such directory", EXIT_NOT_STARTED)
    if not write:
        return DiskCacheStore(path, read_only=True)
    # Writes are few and a user was told they happened: make them survive a power cut.
    return DiskCacheStore(path, durable=True)


def _check_database(spec: str, database: Path) -> None:
    """Refuse a database file that SQLite would take for an empty database (and a
    writable opening would turn into a store) or that is no database at all."""
    try:
        with database.open("rb") as file:
            header = file.read(len(_SQLITE_MAGIC))
    except OSError as exc:
        raise CommandError(
            f"{spec}: cannot read its {_DATABASE}: {exc}", EXIT_NOT_STARTED
        ) from None
    if not header:
        reason = "its database file is empty"
    elif header != _SQLITE_MAGIC:
        reason = "its database file is not an SQLite database"
    else:
        return
    raise CommandError(
        f"{spec} is not a valid trio-pgs store: {reason} ({database})", EXIT_NOT_STARTED
    )


def _not_opened(store: CommandStore, error: PersistenceError) -> str:
    """Why *store* could not be opened. SQLite's own verdict on a damaged database
    file (diskcache raises it as `sqlite3.DatabaseError` itself, not a subclass) is not
    a matter of permissions, whatever the store's message suggests."""
    cause = error.__cause__
    if isinstance(store, DiskCacheStore) and type(cause) is sqlite3.DatabaseError:
        return (
            f"{store.directory} is not a valid trio-pgs store: its database file is damaged "
            f"(SQLite says: {cause})"
        )
    return str(error)


# -- PostgreSQL ----------------------------------------------------------------------------


def _postgres(spec: str, location: str, write: bool, create: bool) -> CommandStore:
    """``postgresql://[user[:password]@][host][:port]/database[?schema=NAME&...]``: the
    store in schema NAME (``trio_pgs`` by default) of that database; the other query
    parameters are libpq's. Only import creates a store there."""
    dsn, schema = _schema_parameter(spec)
    try:
        return PostgresStore(
            dsn, schema=schema or "trio_pgs", read_only=not write, create=create
        )
    except ImportError as exc:
        raise CommandError(str(exc), EXIT_NOT_STARTED) from None
    except ValueError as exc:
        raise CommandError(f"{_shown(spec)}: {exc}", EXIT_NOT_STARTED) from None


def _schema_parameter(url: str) -> tuple[str, str | None]:
    """*url* without its ``schema`` query parameter (libpq knows no such parameter),
    and that parameter's value. The rest of the URL is left as written; the scheme is
    lower-cased, as libpq wants it."""
    scheme, colon, rest = url.partition(":")
    base, question, query = rest.partition("?")
    kept, schemas = [], []
    for parameter in query.split("&") if question else []:
        name, _, value = parameter.partition("=")
        if name == "schema":
            schemas.append(urllib.parse.unquote(value))
        elif parameter:
            kept.append(parameter)
    dsn = scheme.lower() + colon + base + ("?" + "&".join(kept) if kept else "")
    if schemas and not schemas[-1]:
        raise CommandError(f"{_shown(url)}: the schema parameter is empty", EXIT_NOT_STARTED)
    return dsn, (schemas[-1] if schemas else None)


_SCHEMES: dict[str, _Maker] = {
    "diskcache": _diskcache_url,
    "postgresql": _postgres,
    "postgres": _postgres,
}
