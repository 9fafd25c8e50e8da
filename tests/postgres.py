"""A real PostgreSQL for the tests: the server named by TRIO_PGS_POSTGRES_DSN, or else a
throwaway one started with pgserver (PostgreSQL binaries in a wheel) in a temporary
directory. Each store the tests make gets a schema of its own."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import uuid
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from trio_pgs import PostgresStore
from trio_pgs._store import Claim, Operation

from .clocked import Clocked, _clock_held

DSN_VARIABLE = "TRIO_PGS_POSTGRES_DSN"

#: Stops the session's throwaway server when the session dies without stopping it
#: (killed by a timeout, kill -9, a CI job cancelled): otherwise it runs for ever.
_WATCHDOG = """
import os, shutil, signal, sys, time
session, directory = int(sys.argv[1]), sys.argv[2]
while True:
    try:
        os.kill(session, 0)
    except ProcessLookupError:
        break
    time.sleep(1)
try:
    with open(os.path.join(directory, "postmaster.pid")) as f:
        postmaster = int(f.readline())
    os.kill(postmaster, signal.SIGQUIT)  # immediate shutdown: nothing to keep
    for _ in range(100):
        os.kill(postmaster, 0)
        time.sleep(0.1)
except (OSError, ValueError):
    pass
shutil.rmtree(directory, ignore_errors=True)
"""


class Server:
    """One PostgreSQL server for the whole test session."""

    def __init__(self) -> None:
        self._stop: Callable[[], None] | None = None
        dsn = os.environ.get(DSN_VARIABLE)
        if not dsn:
            dsn = self._start()
        self.dsn = dsn
        self.schemas: list[str] = []

    def _start(self) -> str:
        directory = tempfile.mkdtemp(prefix="trio-pgs-postgres-")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # platformdirs: XDG_RUNTIME_DIR is not set
            try:
                import pgserver
            except ImportError:
                raise RuntimeError(
                    "the PostgreSQL tests need a server: install pgserver (it has wheels "
                    f"for Python 3.10 to 3.12) or set {DSN_VARIABLE} to a database's DSN"
                ) from None
            server = pgserver.get_server(directory, cleanup_mode="delete")
        watchdog = subprocess.Popen(
            [sys.executable, "-c", _WATCHDOG, str(os.getpid()), directory],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,  # outlives a killed session, to stop its server
        )

        def stop() -> None:
            watchdog.kill()
            watchdog.wait()
            server.cleanup()

        self._stop = stop
        return str(server.get_uri())

    def schema(self) -> str:
        name = "test_" + uuid.uuid4().hex[:20]
        self.schemas.append(name)
        return name

    def store(self, **options: Any) -> PostgresStore:
        """A new, empty store in a schema of its own; autojump clocks wait for it."""
        options.setdefault("schema", self.schema())
        return ClockedPostgresStore(self.dsn, **options)

    def close(self) -> None:
        if self._stop is not None:
            self._stop()
            return
        import psycopg

        with psycopg.connect(self.dsn, autocommit=True) as connection:  # not ours: tidy
            for name in self.schemas:
                connection.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


class ClockedPostgresStore(Clocked, PostgresStore):
    """A PostgresStore for tests written against a MemoryStore (see `Clocked`)."""

    def _is_open(self) -> bool:
        return self._pool is not None

    async def _commit(self, operations: Sequence[Operation], *, atomic: bool) -> list[Any]:
        # The writes wait for PostgreSQL on the trio thread (`_postgres_writes`), not
        # through _run.
        with _clock_held():
            return await super()._commit(operations, atomic=atomic)

    async def claim(self, kind: str, key: str) -> Claim:
        # So do the claims, one at a time (`_postgres_claims`); the others go through
        # _run, which holds the clock already.
        with _clock_held():
            return await super().claim(kind, key)
