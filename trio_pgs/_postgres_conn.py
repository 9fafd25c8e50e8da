"""Connections to PostgreSQL for a trio program: psycopg's sync API on worker threads.

Rule of this module: a connection that a cancellation may have interrupted in the
middle of a query never goes back to its pool as it is. Its query is cancelled on the
server (`cancel_safe`) and the connection closed (its pool then discards it), whether
the caller stopped waiting before the work began (`Abandoned`), during it (`Running`)
or while a connection was being taken for it (`Taken`). A connection the database
dropped while it sat idle in a pool is weeded out before use (`check_idle`).

psycopg is imported only when a store is made (`import_psycopg`), so the package
imports without the extra; and no message shows a DSN's password (`Secret`).
"""

from __future__ import annotations

import logging
import os
import re
import select
import threading
import urllib.parse
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from ._errors import PersistenceError

if TYPE_CHECKING:
    import psycopg
    import psycopg_pool

T = TypeVar("T")
logger = logging.getLogger("trio_pgs.store")


def import_psycopg() -> Any:
    """psycopg and psycopg_pool, or an ImportError that says how to install them."""
    try:
        import psycopg
        import psycopg_pool
    except ImportError as exc:
        raise ImportError(
            f"PostgresStore needs psycopg 3 and psycopg_pool ({exc}); install the "
            "extra: pip install 'trio-pgs[postgres]'"
        ) from exc
    return psycopg, psycopg_pool



class Abandoned(Exception):
    """Raised in a worker thread whose caller stopped waiting before it began."""


class Running:
    """One operation on a pooled connection, which trio may cancel: the cancel is sent
    to the server (`cancel_safe`) if a query is running, and the connection, which a
    late cancel could still reach, is closed instead of going back to the pool."""

    __slots__ = ("cancelled", "connection", "finished", "lock")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.connection: psycopg.Connection[Any] | None = None
        self.cancelled = False
        #: Set by an operation that keeps its connection (`Writes._on_thread`)
        #: once it is done with it.
        self.finished = False

    def cancel(self) -> bool:  # on the trio thread
        """Cancel the operation; return whether it had finished already."""
        with self.lock:
            self.cancelled = True
            running = self.connection is not None
            finished = self.finished
        if running:
            threading.Thread(target=self._send_cancel, name="trio-pgs cancel", daemon=True).start()
        return finished

    def _send_cancel(self) -> None:
        with self.lock:  # held: the operation cannot hand the connection on meanwhile
            if self.connection is None:
                return
            try:
                self.connection.cancel_safe(timeout=5.0)
            except Exception as exc:  # the connection is closed after anyway
                logger.debug("cancelling a query failed: %r", exc)


def attempt(
    pool: psycopg_pool.ConnectionPool[Any], running: Running,
    work: Callable[[psycopg.Connection[Any]], T],
) -> T:
    """*work* on one pooled connection (the pool's `check_idle` has weeded out the
    connections the database dropped while they were idle)."""
    pg, pg_pool = import_psycopg()
    try:
        with pool.connection() as connection:
            with running.lock:
                if running.cancelled:  # abandoned before it began: do nothing
                    raise Abandoned
                running.connection = connection
            try:
                return work(connection)
            finally:
                with running.lock:
                    running.connection = None
                    if running.cancelled:
                        CLOSED.add(connection)
                        connection.close()
    except pg_pool.PoolTimeout:
        raise PersistenceError(
            f"no connection to PostgreSQL within {pool.timeout} s (is the database up?)"
        ) from None
    except pg.Error as exc:  # connecting, or giving the connection back
        raise PersistenceError(f"PostgreSQL failed: {first_line(exc)}") from exc


class Held:
    """The connection of the writes, its pool, and until when it is held."""

    __slots__ = ("connection", "pool", "until")

    def __init__(
        self, connection: psycopg.Connection[Any], pool: psycopg_pool.ConnectionPool[Any],
        until: float,
    ) -> None:
        self.connection = connection
        self.pool = pool
        self.until = until


class Taken:
    """A connection taken from a pool on a worker thread, for a trio caller who may
    stop waiting: whichever comes last, the taking or the caller's giving up
    (`abandon`), sees the other; a connection nobody will use goes back at once."""

    __slots__ = ("abandoned", "connection", "lock")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.connection: psycopg.Connection[Any] | None = None
        self.abandoned = False

    def take(self, pool: psycopg_pool.ConnectionPool[Any]) -> None:  # on a worker thread
        pg, pg_pool = import_psycopg()
        try:
            connection = pool.getconn()
        except pg_pool.PoolTimeout:
            raise PersistenceError(
                f"no connection to PostgreSQL within {pool.timeout} s (is the database up?)"
            ) from None
        except pg.Error as exc:
            raise PersistenceError(f"PostgreSQL failed: {first_line(exc)}") from exc
        with self.lock:
            if not self.abandoned:
                self.connection = connection
                return
        give_back(pool, connection)

    def abandon(self) -> psycopg.Connection[Any] | None:  # on the trio thread
        """The connection taken, if it was: the caller's now."""
        with self.lock:
            self.abandoned = True
            return self.connection


def give_back(
    pool: psycopg_pool.ConnectionPool[Any], connection: psycopg.Connection[Any]
) -> None:
    """Return a connection of the writes to its pool, which discards it if it is
    closed (a closed pool closes it)."""
    try:
        pool.putconn(connection)
    except Exception as exc:  # a closed pool, say: the connection goes all the same
        logger.debug("giving a connection back failed: %r", exc)
        connection.close()


def sound(connection: psycopg.Connection[Any]) -> bool:
    """Whether a connection held idle can run a query: open, not in a transaction,
    and not dropped by the database (`check_idle`)."""
    pg, _ = import_psycopg()
    if connection.pgconn.transaction_status != pg.pq.TransactionStatus.IDLE:
        return False
    try:
        check_idle(connection)
    except pg.Error:
        return False
    return True


def given_options(pg: Any, dsn: str) -> str:
    """The ``options`` the DSN (or else PGOPTIONS) gives: the store's own settings go
    after them, never instead."""
    try:
        options = pg.conninfo.conninfo_to_dict(dsn).get("options")
    except pg.Error:
        options = None  # connecting will say what is wrong with the DSN
    return str(options if options is not None else os.environ.get("PGOPTIONS", "")).strip()


def check_idle(connection: psycopg.Connection[Any]) -> None:
    """The pool's check of a connection it hands out, without a round trip: an idle
    connection has nothing to read, unless the database dropped it meanwhile (a
    restart, a failover, a terminated backend, an idle timeout sends an error and
    closes). Such a connection is discarded and another one taken, instead of failing
    the operation that would use it."""
    pg, _ = import_psycopg()
    if connection.closed or connection.broken:
        raise pg.OperationalError("closed")
    if _readable(connection.fileno()):
        connection.close()  # so that the pool discards it, and replaces it
        raise pg.OperationalError("the database dropped this connection while it was idle")


def _readable(fd: int) -> bool:
    """Whether *fd* has something to read, or was hung up, now. Through poll, not
    select: select refuses a descriptor at or above FD_SETSIZE (1,024), which any
    process with many sockets open hands to its new connections."""
    if not hasattr(select, "poll"):  # pragma: no cover - Windows, whose select has no such limit
        return bool(select.select([fd], [], [], 0)[0])
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


def read(
    connection: psycopg.Connection[Any], query: str, params: tuple[Any, ...], what: str
) -> psycopg.Cursor[Any]:
    psycopg, _ = import_psycopg()
    try:
        return connection.execute(query, params, binary=True)
    except psycopg.Error as exc:
        raise PersistenceError(f"{what}: PostgreSQL failed: {first_line(exc)}") from exc


def first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


class Secret:
    """What of a DSN must never be shown: its passwords (``password`` and
    ``sslpassword``), in a URL's user information or query, or as parameters of a
    key=value DSN (quoted or not, with libpq's backslash escapes, ``&`` and ``://``
    being part of a value there). `masked` is the DSN without them; `scrub` takes
    them (and the whole DSN) out of a message, such as libpq's, which may quote them.

    The masking is checked against libpq's own reading of the DSN: if libpq would
    still find a password in `masked` (an encoding the patterns do not know), `masked`
    is rebuilt from libpq's reading instead, every secret replaced."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        parsed = _parsed(dsn)
        passwords = [parsed[name] for name in _SECRETS if parsed and parsed.get(name)]
        masked = dsn
        url = _URL.match(dsn) is not None  # libpq's are postgres(ql)://; any, to be safe
        if url:
            scheme, _, rest = dsn.partition("://")
            # Up to the last @ before the query: what a user means as the password,
            # "/" and "@" in it included (libpq's own reading is among `parsed`).
            userinfo, at, _ = rest.split("?", 1)[0].rpartition("@")
            user, colon, password = userinfo.partition(":")
            if at and colon and password:
                passwords.append(password)
                masked = f"{scheme}://{user}:***@{rest[len(userinfo) + 1:]}"
        parameter = _URL_PASSWORD if url else _KEYWORD_PASSWORD
        for match in parameter.finditer(dsn):
            value = match.group(2)
            if value:
                quoted = len(value) > 1 and value[0] == value[-1] == "'"
                passwords += [value, _BACKSLASHED.sub(r"\1", value[1:-1] if quoted else value)]
        self._passwords = sorted(
            {p for p in passwords if p} | {urllib.parse.unquote(p) for p in passwords if p},
            key=len, reverse=True,
        )
        masked = parameter.sub(r"\1***", masked)
        for password in self._passwords:
            masked = masked.replace(password, "***")
        if parsed is not None and not _hidden(masked):
            masked = _rebuilt(parsed)
        self.masked = masked

    def scrub(self, text: str) -> str:
        text = text.replace(self.dsn, self.masked)
        for password in self._passwords:
            text = text.replace(password, "***")
        return text


#: A DSN shaped as a URL (libpq takes postgresql:// and postgres:// only).
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
#: The parameters of a DSN that hold secrets.
_SECRETS = ("password", "sslpassword")


def _parsed(dsn: str) -> dict[str, str] | None:
    """*dsn*'s parameters as libpq reads them, if psycopg can parse it."""
    try:
        pg, _ = import_psycopg()
        return dict(pg.conninfo.conninfo_to_dict(dsn))
    except Exception:  # a DSN libpq refuses: connecting will say so, scrubbed
        return None


def _hidden(masked: str) -> bool:
    """Whether libpq reads no secret but ``***`` (or none) in *masked*."""
    parsed = _parsed(masked)
    return parsed is not None and all(parsed.get(name) in (None, "", "***") for name in _SECRETS)


def _rebuilt(parsed: dict[str, str]) -> str:
    """A key=value DSN of *parsed*, its secrets replaced by ``***``."""
    pg, _ = import_psycopg()
    shown = {name: ("***" if name in _SECRETS and value else value)
             for name, value in parsed.items()}
    return str(pg.conninfo.make_conninfo("", **shown))


def without_password(dsn: str) -> str:
    """*dsn* fit for a message: its password hidden."""
    return Secret(dsn).masked


#: A password parameter (or sslpassword) and its value: in a URL's query, up to the
#: next parameter (libpq reads a "#" as part of it); in a key=value DSN, quoted or up
#: to a blank, libpq's backslash escapes included.
_URL_PASSWORD = re.compile(r"([?&](?:ssl)?password=)([^&]*)", re.IGNORECASE)
_KEYWORD_PASSWORD = re.compile(
    r"(\b(?:ssl)?password\s*=\s*)('(?:[^'\\]|\\.)*'|(?:[^\s\\]|\\.)+)", re.IGNORECASE
)
_BACKSLASHED = re.compile(r"\\(.)")
#: Connections closed after a cancellation: the pool's warning about each is expected.
CLOSED: weakref.WeakSet[Any] = weakref.WeakSet()


class _ExpectedDiscard(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (
            record.msg == "discarding closed connection: %s"
            and bool(record.args) and isinstance(record.args, tuple)
            and record.args[0] in CLOSED
        )


logging.getLogger("psycopg.pool").addFilter(_ExpectedDiscard())
