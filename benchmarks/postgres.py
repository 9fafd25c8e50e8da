"""PostgresStore: persisted calls and activation on PostgreSQL, against hand-written psycopg.

Section ``postgres`` of ``benchmarks/run.py``. One PostgreSQL server for the section:
the one named by ``TRIO_PGS_POSTGRES_DSN`` if set, else a throwaway one started with
pgserver in a temporary directory (deleted after). Every store and every baseline
works in a fresh schema of its own, dropped after it.

- Persisted calls (``EACH_MESSAGE``, the `Counter`'s ``call("incr")``: every call
  changes the state, so every call commits) with 1, 100 and 1,000 servers, one
  closed-loop caller each, on a fresh `PostgresStore`, against three hand-written
  baselines on a table of the store's row shape, each data a state's bytes:

  (a) per call: one conditional ``UPDATE ... SET data = %s, version = version + 1
      WHERE kind = %s AND key = %s AND version = %s``, autocommit, one caller at a
      time on one connection (calls/s);
  (b) 100 such UPDATEs per transaction through ``cursor.executemany`` (psycopg sends
      them in pipeline mode) (rows/s);
  (c) one ``UPDATE ... FROM unnest(%s::text[], %s::bigint[], %s::bytea[])`` of 100
      rows, autocommit (one statement, one transaction) (rows/s).

- Activation: a call to a dormant server (the store claims it, an ``UPDATE ...
  RETURNING`` of the row, then the call), one at a time over dormant servers, against
  one SELECT of such a row; the raw claim UPDATE's round trip is shown too.

Every hand-written baseline runs its SQL with ``trio.to_thread.run_sync`` (trio's
cached worker threads: how a trio program uses psycopg, whose async API is
asyncio-only; the store does so for loads and claims) on one autocommit connection
opened for it (no pool). The store sends the writer's usual batch from the trio thread
itself, through libpq's non-blocking calls. The rounds interleave: each round measures
every scenario once.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import trio
from activation import WARMUP_ACTIVATIONS, pgs_activations
from calls import pgs_persisted, rate_cell, servers_name
from common import (
    Counter,
    Figure,
    Latencies,
    Row,
    Section,
    drive,
    median_figure,
    random_keys,
    report,
)

import trio_pgs
from trio_pgs import Put, Record, _postgres_sql

DSN_VARIABLE = "TRIO_PGS_POSTGRES_DSN"
#: Rows per hand-written batch, and rows of the baselines' tables.
BATCH = 100
#: The columns of the store's records table, and the statements of its migrations that
#: make that table (the baselines' tables have the same row shape and indexes).
COLUMNS = _postgres_sql.COLUMNS
TABLE = [
    statement.replace("{schema}", "{s}")
    for statements in _postgres_sql.MIGRATIONS for statement in statements
    if "{schema}.records " in statement
]
#: Rows as a started (or dormant) Counter's: version 1, epoch 1, its state 0 as data.
FILL = (
    "INSERT INTO {s}.records (kind, key, version, epoch, data, state_version, updated_at)"
    " SELECT %s, 'c' || i, 1, 1, '\\x30'::bytea, 1, extract(epoch FROM now())"
    " FROM generate_series(0, %s - 1) AS i"
)
UPDATE = ("UPDATE {s}.records SET data = %s, version = version + 1"
          " WHERE kind = %s AND key = %s AND version = %s")
UNNEST = (
    "UPDATE {s}.records AS r SET data = u.data, version = r.version + 1"
    " FROM unnest(%s::text[], %s::bigint[], %s::bytea[]) AS u(key, version, data)"
    " WHERE r.kind = %s AND r.key = u.key AND r.version = u.version"
)
SELECT = f"SELECT {COLUMNS} FROM {{s}}.records WHERE kind = %s AND key = %s AND NOT deleted"
CLAIM = (f"UPDATE {{s}}.records SET epoch = epoch + 1 WHERE kind = %s AND key = %s"
         f" RETURNING {COLUMNS}")


# -- the server -----------------------------------------------------------------------------


class Database:
    """The section's PostgreSQL server, and fresh schemas in it."""

    def __init__(self, dsn: str, stop: Callable[[], None] | None, origin: str) -> None:
        self.dsn, self._stop, self.origin = dsn, stop, origin

    @classmethod
    def from_argv(cls, usage: str) -> Database:
        """The server a script names as its first argument (else by
        ``TRIO_PGS_POSTGRES_DSN``); exits with *usage* if neither does."""
        dsn = sys.argv[1] if len(sys.argv) > 1 else os.environ.get(DSN_VARIABLE)
        if not dsn:
            sys.exit(f"usage: {usage} (or set {DSN_VARIABLE})")
        return cls(dsn, None, "argument")

    @classmethod
    def open(cls) -> Database | str:
        """The server, or why there is none (the section is then skipped)."""
        try:
            import psycopg  # noqa: F401
            import psycopg_pool  # noqa: F401
        except ImportError as exc:
            return f"psycopg and psycopg_pool are not installed ({exc})"
        dsn = os.environ.get(DSN_VARIABLE)
        if dsn:
            return cls(dsn, None, f"the server of {DSN_VARIABLE}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # platformdirs: XDG_RUNTIME_DIR is not set
            try:
                import pgserver
            except ImportError:
                return (f"pgserver is not installed (wheels for Python 3.10 to 3.12); set "
                        f"{DSN_VARIABLE} to a database's DSN")
            server = pgserver.get_server(tempfile.mkdtemp(prefix="trio-pgs-bench-pg-"),
                                         cleanup_mode="delete")
        return cls(str(server.get_uri()), server.cleanup, "a throwaway pgserver server")

    def connect(self) -> Any:
        import psycopg

        return psycopg.connect(self.dsn, autocommit=True)

    @contextlib.contextmanager
    def schema(self) -> Iterator[str]:
        """A fresh schema name (created by whoever uses it), dropped after."""
        name = "bench_" + uuid.uuid4().hex[:16]
        try:
            yield name
        finally:
            with self.connect() as connection:
                connection.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')

    def describe(self) -> str:
        import psycopg

        names = ("server_version", "fsync", "synchronous_commit", "wal_sync_method",
                 "shared_buffers")
        with self.connect() as connection:
            values = [connection.execute(f"SHOW {name}").fetchone()[0] for name in names]
            unix = connection.info.host.startswith("/")
        settings = ", ".join(f"{n} {v}" for n, v in zip(names[1:], values[1:], strict=True))
        return (f"PostgreSQL {values[0]} ({self.origin}, over a "
                f"{'Unix socket' if unix else 'TCP connection'}; {settings}), "
                f"psycopg {psycopg.__version__} ({psycopg.pq.__impl__} libpq wrapper).")

    def close(self) -> None:
        if self._stop is not None:
            self._stop()


# -- trio-pgs -------------------------------------------------------------------------------


async def pgs_calls(db: Database, servers: int, seconds: float) -> Figure:
    """`calls.pgs_persisted` on a fresh PostgresStore (read back through a new store)."""
    with db.schema() as schema:
        return await pgs_persisted(
            schema, servers, seconds,
            store=lambda: trio_pgs.PostgresStore(db.dsn, schema=schema),
        )


async def write_dormant(db: Database, schema: str, records: int) -> None:
    """Dormant counters c0... through the store's commit API, as its writer would."""
    store = trio_pgs.PostgresStore(db.dsn, schema=schema)
    await store.open()
    try:
        now = time.time()
        for first in range(0, records, 10_000):
            await store.commit([
                Put(Record(kind=Counter.kind, key=f"c{i}", data=b"0", updated_at=now), 0)
                for i in range(first, min(records, first + 10_000))
            ])
    finally:
        await store.close()


async def pgs_activation(db: Database, keys: list[str]) -> list[float]:
    with db.schema() as schema:
        await write_dormant(db, schema, len(keys))
        return await pgs_activations(
            schema, keys, lambda s: trio_pgs.PostgresStore(db.dsn, schema=s))


# -- hand-written baselines ---------------------------------------------------------------


class Table:
    """A baselines' table of *rows* counters in a fresh schema, on one autocommit
    connection used from worker threads (one at a time), and the stored version of
    each row as the code that writes it remembers it."""

    def __init__(self, connection: Any, schema: str, rows: int) -> None:
        self.connection, self.rows = connection, rows
        self.s = f'"{schema}"'
        self.versions = [1] * rows
        self.update, self.unnest = UPDATE.format(s=self.s), UNNEST.format(s=self.s)
        connection.execute(f"CREATE SCHEMA {self.s}")
        for statement in TABLE:
            connection.execute(statement.format(s=self.s))
        connection.execute(FILL.format(s=self.s), (Counter.kind, rows))

    @classmethod
    @contextlib.asynccontextmanager
    async def fresh(cls, db: Database, rows: int) -> Any:
        with db.schema() as schema:
            connection = await trio.to_thread.run_sync(db.connect)
            try:
                yield await trio.to_thread.run_sync(cls, connection, schema, rows)
            finally:
                await trio.to_thread.run_sync(connection.close)

    def params(self, i: int) -> tuple[bytes, str, str, int]:
        """An UPDATE's parameters: the counter's new state as data (the old version,
        as a Counter's state is its calls so far), the row, its expected version."""
        version = self.versions[i]
        return str(version).encode(), Counter.kind, f"c{i}", version

    def check(self, writes: int) -> None:
        """Every completed write raised one row's version by one."""
        (found,) = self.connection.execute(
            f"SELECT sum(version - 1) FROM {self.s}.records").fetchone()
        if found != writes or sum(self.versions) - self.rows != writes:
            raise AssertionError(f"{writes} writes completed, but the versions say {found}")


def update_one(table: Table, i: int) -> None:
    cursor = table.connection.execute(table.update, table.params(i))
    if cursor.rowcount != 1:
        raise AssertionError(f"c{i}: the conditional UPDATE matched {cursor.rowcount} rows")
    table.versions[i] += 1


def update_many(table: Table) -> None:
    connection = table.connection
    with connection.transaction():
        cursor = connection.cursor()
        cursor.executemany(table.update, [table.params(i) for i in range(BATCH)])
        if cursor.rowcount != BATCH:
            raise AssertionError(f"executemany updated {cursor.rowcount} rows of {BATCH}")
    for i in range(BATCH):
        table.versions[i] += 1


def update_unnest(table: Table) -> None:
    keys, versions, data = [], [], []
    for i in range(BATCH):
        datum, _, key, version = table.params(i)
        keys.append(key)
        versions.append(version)
        data.append(datum)
    cursor = table.connection.execute(table.unnest, (keys, versions, data, Counter.kind))
    if cursor.rowcount != BATCH:
        raise AssertionError(f"UPDATE ... FROM unnest updated {cursor.rowcount} of {BATCH}")
    for i in range(BATCH):
        table.versions[i] += 1


async def per_call(db: Database, seconds: float) -> Figure:
    """(a): one conditional UPDATE per call, one caller, the rows in turn."""
    async with Table.fresh(db, BATCH) as table:
        calls = 0

        async def call(_: int) -> None:
            nonlocal calls
            i = calls % BATCH
            calls += 1
            await trio.to_thread.run_sync(update_one, table, i)

        result = await drive(1, seconds, call)
        await trio.to_thread.run_sync(table.check, result.total)
    return Figure(result.rate, 1.0)


async def batches(db: Database, seconds: float, batch: Callable[[Table], None]) -> Figure:
    """(b), (c): one batch of BATCH rows after the other; rows per second."""
    async with Table.fresh(db, BATCH) as table:
        result = await drive(1, seconds, lambda _: trio.to_thread.run_sync(batch, table))
        await trio.to_thread.run_sync(table.check, result.total * BATCH)
    return Figure(result.rate * BATCH, float(BATCH))


async def round_trips(db: Database, keys: list[str], query: str) -> list[float]:
    """*query* for each of *keys*, one at a time, from trio through a worker thread;
    the latencies of all but the warm-up ones."""
    async with Table.fresh(db, len(keys)) as table:
        sql = query.format(s=table.s)

        def run(key: str) -> None:
            if table.connection.execute(sql, (Counter.kind, key), binary=True).fetchone() is None:
                raise AssertionError(f"{key} has no row")

        latencies = []
        for key in keys:
            began = time.perf_counter()
            await trio.to_thread.run_sync(run, key)
            latencies.append(time.perf_counter() - began)
    return latencies[WARMUP_ACTIVATIONS:]


# -- the section ----------------------------------------------------------------------------

SERVERS = (100, 1, 1000)
CALL_BASELINES = {
    "a": "(a) conditional UPDATE per call, autocommit, 1 caller",
    "b": f"(b) executemany of {BATCH} conditional UPDATEs per transaction",
    "c": f"(c) UPDATE ... FROM unnest, {BATCH} rows per statement",
}


@dataclass
class Results:
    calls: dict[Any, list[Figure]]
    latencies: dict[str, list[Latencies]]


def run_rounds(db: Database, seconds: float, rounds: int, activations: int,
               short: float) -> Results:
    """*rounds* rounds, each measuring every scenario once (interleaved, so that a
    noisy spell of the machine spreads over all of them; the baselines run right
    after the 100-server scenario, which the targets compare them with)."""
    results = Results({}, {})
    total = activations + WARMUP_ACTIVATIONS
    baselines: list[tuple[Any, Callable[[Database, float], Any]]] = [
        ("a", per_call),
        ("b", lambda d, s: batches(d, s, update_many)),
        ("c", lambda d, s: batches(d, s, update_unnest)),
    ]
    for n in range(rounds):
        for key, fn in [(100, None), *baselines, (1, None), (1000, None)]:
            if fn is None:
                figure = trio.run(pgs_calls, db, key, seconds if key == 100 else short)
                who, text = f"persisted, {servers_name(key)}", rate_cell(figure)
            else:
                figure = trio.run(fn, db, short)
                unit = "calls/s" if key == "a" else "rows/s"
                who, text = CALL_BASELINES[key], f"{figure.rate:,.0f} {unit}"
            results.calls.setdefault(key, []).append(figure)
            report(f"round {n + 1}", who, text)
        keys = random_keys(total, total, seed=n)
        for name, fn, args in (("activation", pgs_activation, ()),
                               ("select", round_trips, (SELECT,)),
                               ("claim", round_trips, (CLAIM,))):
            latencies = Latencies.of(trio.run(fn, db, keys, *args))
            results.latencies.setdefault(name, []).append(latencies)
            report(f"round {n + 1}, latency over {activations:,} rows", name, latencies.text())
    return results


def call_rows(results: Results) -> list[Row]:
    baselines = {key: median_figure(results.calls[key]) for key in CALL_BASELINES}
    cells = {
        "a": f"{baselines['a'].rate:,.0f} calls/s",
        "b": f"{baselines['b'].rate:,.0f} rows/s",
        "c": f"{baselines['c'].rate:,.0f} rows/s",
    }
    targets: dict[tuple[int, str], tuple[str, Callable[[float], bool]]] = {
        (100, "a"): (">= 5x", lambda ratio: ratio >= 5),
        (100, "b"): (">= 0.6x", lambda ratio: ratio >= 0.6),
    }
    rows = []
    for servers in SERVERS:
        ours = median_figure(results.calls[servers])
        for key, label in CALL_BASELINES.items():
            ratio = ours.rate / baselines[key].rate
            goal = targets.get((servers, key))
            rows.append(Row(
                f"PostgresStore persisted, {servers_name(servers)}", rate_cell(ours), label,
                cells[key], ratio, "" if goal is None else goal[0],
                None if goal is None else goal[1](ratio),
            ))
    return rows


def latency_rows(results: Results, activations: int) -> list[Row]:
    ours, select, claim = (Latencies.median(results.latencies[name])
                           for name in ("activation", "select", "claim"))
    name = f"PostgresStore activation, dormant -> first reply, {activations:,} dormant"
    ratio = ours.p50 / select.p50
    return [
        Row(name, ours.text(), "one SELECT of the row, to_thread", select.text(), ratio,
            "p50 <= 2x", ratio <= 2),
        Row(name, ours.text(), "the raw claim UPDATE ... RETURNING, to_thread", claim.text(),
            ours.p50 / claim.p50),
        Row(f"{name}, p99", f"p99 {ours.p99 * 1e6:,.0f} us", "one SELECT of the row",
            f"p99 {select.p99 * 1e6:,.0f} us", ours.p99 / select.p99),
    ]


def round_ratios(results: Results) -> str:
    """The targets' ratios round by round (each from figures of one round): how much
    the machine's noise moves them."""
    def listed(ratios: list[float]) -> str:
        return " / ".join(f"{ratio:.2f}" for ratio in ratios)

    ours = [figure.rate for figure in results.calls[100]]
    parts = [
        f"vs ({key}) " + listed([o / t.rate for o, t in zip(ours, results.calls[key],
                                                            strict=True)])
        for key in CALL_BASELINES
    ]
    latencies = results.latencies
    for name in ("select", "claim"):
        parts.append(f"activation p50 / {name} p50 " + listed([
            a.p50 / b.p50 for a, b in zip(latencies["activation"], latencies[name],
                                          strict=True)]))
    return "Ratios of each round (the figures of that round): 100 servers " + "; ".join(parts)


def postgres_section(seconds: float, rounds: int, quick: bool, full: bool) -> Section | None:
    db = Database.open()
    if isinstance(db, str):
        print(f"  skipped: {db}", flush=True)
        return None
    try:
        description = db.describe()
        print(f"  {description}", flush=True)
        activations = 10_000 if full else (200 if quick else 1000)
        short = seconds if full else seconds / 2
        results = run_rounds(db, seconds, rounds, activations, short)
    finally:
        db.close()
    rows = call_rows(results) + latency_rows(results, activations)
    batch = statistics.median(f.batch for f in results.calls[100] if f.batch is not None)
    notes = [
        description,
        "Calls: one closed-loop caller per server doing `call(\"incr\")` (EACH_MESSAGE: "
        "every call commits), on a fresh PostgresStore (default pool_size 8); batch = "
        "records per store transaction (the writer's group commit; 100 servers: "
        f"{batch:.1f}). After each round the counters are read back through a new store "
        "and must add up to the calls made.",
        "Baselines (same run, same server), hand-written psycopg on a table of the "
        "store's row shape in a schema of its own, data the bytes of the counter's state, "
        "through `trio.to_thread.run_sync` (trio's worker threads) on one autocommit "
        "connection, one statement or batch at a time: (a) `UPDATE ... SET data = %s, "
        "version = version + 1 WHERE kind = %s AND key = %s AND version = %s`, one "
        f"transaction per call; (b) {BATCH} of them per transaction through "
        f"`cursor.executemany` (pipelined by psycopg); (c) `UPDATE ... FROM "
        f"unnest(keys, versions, data)` of {BATCH} rows, one statement. Every write's "
        "rowcount is checked; (b) and (c) are rows/s, compared with calls/s: one call "
        "commits one row.",
        "The store writes the whole record (version, epoch, data, state_version, "
        "updated_at, crashes, quarantined, history, reminders and their due time), a "
        "batch of plain records as one "
        "prepared `UPDATE ... FROM unnest(...) RETURNING kind, key` that commits by "
        "itself, sent from the trio thread through libpq (no worker thread) on a "
        "connection it holds from batch to batch; the baselines write data and version "
        "only.",
        f"100 servers: {seconds:g} s measured per round; 1 and 1,000 servers and the "
        f"baselines: {short:g} s. Rounds interleave the scenarios; figures are medians "
        f"of {rounds} round(s).",
        f"Activation: {activations:,} dormant counters written through the store, then "
        "called one at a time in random order by a new supervisor (`call(\"peek\")`, "
        "which does not commit): the store claims each with `UPDATE ... SET epoch = "
        "epoch + 1 ... RETURNING` sent from the trio thread on the claims' connection "
        f"(decision 57); the first {WARMUP_ACTIVATIONS} "
        "are a warm-up. Baselines: the same keys, one at a time, `SELECT` of the row by "
        "its key (binary results, as the store reads) and the claim's `UPDATE ... "
        "RETURNING` by hand, each `await trio.to_thread.run_sync(...)` on one autocommit "
        "connection. Ratio = trio-pgs p50 / baseline p50 (lower is better).",
    ]
    notes.append(round_ratios(results) + ".")
    return Section("PostgreSQL (PostgresStore)", rows, notes)
