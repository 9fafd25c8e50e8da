"""What is particular to `PostgresStore`, against a real PostgreSQL (the `postgres`
fixture): its schema, conflicts that fail one server only, fencing between store objects
(processes) sharing a schema, cancellation that reaches the server, lost connections,
rows that are not records, and scans. The store contract itself is checked by the
conformance kit (test_store_contract.py).

The tests that wait for PostgreSQL to do something (a query to block on a lock, a
cancelled query to end) use trio's real clock, polling the server with a bound: what
they wait for happens in another process.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import socket
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import attrs
import psycopg
import psycopg.conninfo
import pytest
import trio
import trio.testing

import trio_pgs
from trio_pgs import (
    ActivationFailed,
    ConflictError,
    Delete,
    OutcomeUnknown,
    PersistenceError,
    PersistentSupervisor,
    PostgresStore,
    Put,
    Record,
)
from trio_pgs import _postgres_sql as sql
from trio_pgs._postgres_conn import Secret, without_password

from .postgres import ClockedPostgresStore, Server
from .servers import TallyServer

#: How long a test waits for PostgreSQL to show an effect (a lock wait, a query gone):
#: it shows in milliseconds; only a machine under heavy load comes near.
BOUND = 10.0
KIND = "tally"


# -- helpers ---------------------------------------------------------------------------


@contextlib.contextmanager
def connect(postgres: Server, *, autocommit: bool = True) -> Iterator[psycopg.Connection[Any]]:
    """A connection of the test's own, as an administrator (or another program) has."""
    with psycopg.connect(postgres.dsn, autocommit=autocommit) as connection:
        yield connection


def named_store(postgres: Server, **options: Any) -> tuple[PostgresStore, str]:
    """A store in a new schema whose connections carry an application_name of their
    own, so that the test finds its backends in pg_stat_activity."""
    name = "trio-pgs-test-" + uuid.uuid4().hex[:12]
    dsn = psycopg.conninfo.make_conninfo(postgres.dsn, application_name=name)
    options.setdefault("schema", postgres.schema())
    return ClockedPostgresStore(dsn, **options), name


@contextlib.asynccontextmanager
async def opened(store: PostgresStore) -> AsyncIterator[PostgresStore]:
    await store.open()
    try:
        yield store
    finally:
        await store.close()


def record(key: str, data: bytes = b"{}", *, kind: str = KIND, version: int = 1,
           epoch: int = 1) -> Record:
    return Record(kind=kind, key=key, data=data, version=version, epoch=epoch,
                  updated_at=1.0)


def tally(*items: str) -> bytes:
    return json.dumps({"items": list(items)}).encode()


def items(stored: Record | None) -> list[str]:
    assert stored is not None
    found: list[str] = json.loads(stored.data)["items"]
    return found


def schema_exists(postgres: Server, schema: str) -> bool:
    with connect(postgres) as connection:
        row = connection.execute(
            "SELECT 1 FROM pg_namespace WHERE nspname = %s", (schema,)
        ).fetchone()
    return row is not None


def snapshot(postgres: Server, schema: str) -> dict[str, Any]:
    """Everything the store keeps in *schema*: its tables, meta rows and records."""
    with connect(postgres) as connection:
        tables = connection.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = %s"
            " ORDER BY table_name", (schema,)
        ).fetchall()
        meta = connection.execute(f'SELECT * FROM "{schema}".meta ORDER BY name').fetchall()
        records = connection.execute(
            f'SELECT * FROM "{schema}".records ORDER BY kind, key'
        ).fetchall()
    return {"tables": tables, "meta": meta, "records": records}


def schema_version(postgres: Server, schema: str) -> list[tuple[Any, ...]]:
    with connect(postgres) as connection:
        return connection.execute(f'SELECT name, value FROM "{schema}".meta').fetchall()


def backends(postgres: Server, application_name: str, where: str = "true") -> list[int]:
    """The pids of the store's backends (those whose application_name is its)."""
    with connect(postgres) as connection:
        rows = connection.execute(
            f"SELECT pid FROM pg_stat_activity WHERE application_name = %s AND ({where})",
            (application_name,),
        ).fetchall()
    return [pid for (pid,) in rows]


def waiting_on_a_lock(postgres: Server, application_name: str) -> list[int]:
    return backends(postgres, application_name,
                    "state = 'active' AND wait_event_type = 'Lock'")


def terminate(postgres: Server, pids: list[int]) -> None:
    with connect(postgres) as connection:
        for pid in pids:
            connection.execute("SELECT pg_terminate_backend(%s)", (pid,))


async def eventually(check: Any, what: str) -> Any:
    """Poll *check* (a real effect in the server) until it returns something true."""
    with trio.move_on_after(BOUND):
        while True:
            found = check()
            if found:
                return found
            await trio.sleep(0.01)
    raise AssertionError(f"not within {BOUND} s: {what}")


@contextlib.contextmanager
def row_locked(postgres: Server, schema: str, key: str) -> Iterator[psycopg.Connection[Any]]:
    """Hold the row lock of KIND/*key* in an open transaction (as a long transaction of
    another program would) until the block ends."""
    with connect(postgres, autocommit=False) as connection:
        locked = connection.execute(
            f'SELECT 1 FROM "{schema}".records WHERE kind = %s AND key = %s FOR UPDATE',
            (KIND, key),
        ).fetchone()
        assert locked is not None
        try:
            yield connection
        finally:
            connection.rollback()


class Blocked:
    """A store call run in the background, and its outcome."""

    def __init__(self) -> None:
        self.scope = trio.CancelScope()
        self.done = trio.Event()
        self.error: BaseException | None = None
        self.cancelled = False

    async def run(self, call: Any) -> None:
        try:
            with self.scope:
                await call()
        except Exception as exc:
            self.error = exc
        finally:
            self.cancelled = self.scope.cancelled_caught
            self.done.set()


# -- the schema ------------------------------------------------------------------------


async def test_opening_a_store_creates_its_schema_and_tables(postgres: Server):
    schema = postgres.schema()
    assert not schema_exists(postgres, schema)
    async with opened(postgres.store(schema=schema)) as store:
        await store.commit([Put(record("a", b"1"), 0)])
        assert await store.load(KIND, "a") == record("a", b"1")
    assert schema_exists(postgres, schema)
    found = snapshot(postgres, schema)
    assert found["tables"] == [("meta",), ("nodes",), ("records",), ("supervisors",)]
    assert found["meta"] == [("schema_version", sql.SCHEMA_VERSION)]
    async with opened(postgres.store(schema=schema)) as again:  # opening it again
        assert await again.load(KIND, "a") == record("a", b"1")
    assert schema_version(postgres, schema) == [("schema_version", sql.SCHEMA_VERSION)]


def open_at_once(postgres: Server, schema: str, count: int) -> list[BaseException]:
    """Open *count* stores on *schema*, each in a thread (and trio loop) of its own,
    released together, and commit a record in each; return what they raised."""
    barrier = threading.Barrier(count)
    errors: list[BaseException] = []

    async def open_and_write(i: int) -> None:
        store = PostgresStore(postgres.dsn, schema=schema)
        await trio.to_thread.run_sync(barrier.wait, BOUND)
        async with opened(store):
            await store.commit([Put(record(f"k{i}"), 0)])

    def thread(i: int) -> None:
        try:
            trio.run(open_and_write, i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=thread, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(3 * BOUND)
        assert not t.is_alive(), "a store is still opening"
    return errors


def test_stores_opening_one_new_schema_at_once_all_succeed(postgres: Server):
    """Several processes starting at once on an empty database."""
    for _ in range(3):
        schema = postgres.schema()
        count = 8
        assert open_at_once(postgres, schema, count) == []
        assert schema_version(postgres, schema) == [("schema_version", sql.SCHEMA_VERSION)]
        assert sorted(key for _, key, *_ in snapshot(postgres, schema)["records"]) == sorted(
            f"k{i}" for i in range(count)
        )


async def test_stores_opened_together_in_one_nursery_all_succeed(postgres: Server):
    schema = postgres.schema()
    stores = [PostgresStore(postgres.dsn, schema=schema) for _ in range(6)]
    async with trio.open_nursery() as nursery:
        for store in stores:
            nursery.start_soon(store.open)
    try:
        for i, store in enumerate(stores):
            await store.commit([Put(record(f"k{i}"), 0)])
        assert [r.key async for r in stores[0].scan(KIND)] == [f"k{i}" for i in range(6)]
    finally:
        for store in stores:
            await store.close()
    assert schema_version(postgres, schema) == [("schema_version", sql.SCHEMA_VERSION)]


async def test_a_schema_of_version_1_is_upgraded_keeping_its_records(postgres: Server):
    """A store written before membership existed (schema version 1)."""
    schema = postgres.schema()
    with connect(postgres) as connection:
        connection.execute(f'CREATE SCHEMA "{schema}"')
        connection.execute(f'CREATE TABLE "{schema}".meta (name text PRIMARY KEY,'
                           " value bigint NOT NULL)")
        connection.execute(f"INSERT INTO \"{schema}\".meta VALUES ('schema_version', 1)")
        for statement in sql.MIGRATIONS[0]:
            connection.execute(statement.format(schema=f'"{schema}"'))
    async with opened(postgres.store(schema=schema)) as store:
        await store.commit([Put(record("a", b"1"), 0)])
    async with PersistentSupervisor(store=postgres.store(schema=schema)):
        pass  # it joins the members: the new tables work
    found = snapshot(postgres, schema)
    assert found["tables"] == [("meta",), ("nodes",), ("records",), ("supervisors",)]
    assert found["meta"] == [("schema_version", sql.SCHEMA_VERSION)]
    assert [key for _, key, *_ in found["records"]] == ["a"]


@pytest.mark.parametrize("read_only", [False, True], ids=["writable", "read-only"])
async def test_a_schema_of_a_newer_version_is_refused_and_left_as_it_is(
    postgres: Server, read_only: bool
):
    schema = postgres.schema()
    async with opened(postgres.store(schema=schema)) as store:
        await store.commit([Put(record("a", b"1"), 0)])
    with connect(postgres) as connection:  # a newer trio-pgs upgraded the tables
        connection.execute(f'UPDATE "{schema}".meta SET value = 7')
    before = snapshot(postgres, schema)
    newer = postgres.store(schema=schema, read_only=read_only)
    with pytest.raises(PersistenceError) as caught:
        await newer.open()
    message = str(caught.value).replace(schema, "<schema>")
    assert re.search(r"\b7\b", message), message
    assert re.search(rf"\b{sql.SCHEMA_VERSION}\b", message), message
    assert "upgrade trio-pgs" in message
    assert snapshot(postgres, schema) == before


async def test_a_read_only_store_on_a_missing_schema_is_refused_and_creates_nothing(
    postgres: Server,
):
    schema = postgres.schema()
    with pytest.raises(PersistenceError, match="no trio-pgs store"):
        await postgres.store(schema=schema, read_only=True).open()
    assert not schema_exists(postgres, schema)


async def test_a_read_only_store_reads_and_refuses_every_write(postgres: Server):
    schema = postgres.schema()
    async with opened(postgres.store(schema=schema)) as store:
        await store.commit([Put(record("a", b"1"), 0), Put(record("b", b"2"), 0)])
    before = snapshot(postgres, schema)
    async with opened(postgres.store(schema=schema, read_only=True)) as reader:
        assert await reader.load(KIND, "a") == record("a", b"1")
        assert [r.key async for r in reader.scan(KIND)] == ["a", "b"]
        assert await reader.kinds() == {KIND}
        writes = [
            lambda: reader.commit([Put(record("a", b"new", version=2), 1)]),
            lambda: reader.commit([Put(record("c"), 0)]),
            lambda: reader.commit([Delete(KIND, "b")]),
            lambda: reader.commit_each([Put(record("a", b"new", version=2), 1)]),
            lambda: reader.claim(KIND, "a"),
            lambda: reader.claim(KIND, "never"),
        ]
        for write in writes:
            with pytest.raises(PersistenceError, match="read-only"):
                await write()
    assert snapshot(postgres, schema) == before


def free_port() -> int:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        return int(listener.getsockname()[1])


@pytest.mark.parametrize("form", ["keywords", "url", "url-query", "socket-directory"])
async def test_an_unreachable_database_is_refused_at_once_without_its_password(
    form: str, tmp_path: Path
):
    password = "pw-" + uuid.uuid4().hex
    dsn = {
        "keywords": f"host=127.0.0.1 port={free_port()} user=app password={password}"
                    " dbname=games",
        "url": f"postgresql://app:{password}@127.0.0.1:{free_port()}/games",
        "url-query": f"postgresql://app@127.0.0.1:{free_port()}/games?password={password}"
                     "&sslmode=disable",
        "socket-directory": f"host={tmp_path} user=app password='{password}' dbname=games",
    }[form]
    store = PostgresStore(dsn, schema="trio_pgs")
    with trio.fail_after(5), pytest.raises(PersistenceError) as caught:
        await store.open()
    chain: list[BaseException] = []
    error: BaseException | None = caught.value
    while error is not None:
        chain.append(error)
        error = error.__cause__ or error.__context__
    for error in chain:
        assert password not in str(error), f"{type(error).__name__}: {error}"
    assert password not in repr(store)
    assert "could not be opened" in str(caught.value)


@pytest.mark.parametrize("dsn", [
    "host=h user=u password=ab://cdSecret9 dbname=d",
    "host=/tmp application_name=svc://x password=Secret9 dbname=d",
    "host=h user=u sslpassword=Secret9 dbname=d",
    "postgres://u@h/d?password=Secret9#frag",
    "postgresql://u:pa?Secret9@h/d",
    "postgresql://u@h/d?pass%77ord=Secret9",
    "postgresql://u@h/d?sslpassword=Sec%72et9",
])
def test_every_secret_of_a_dsn_is_hidden_as_libpq_reads_it(dsn: str):
    """Whatever libpq would read as a password or sslpassword, in any form of DSN,
    shows neither in the DSN as trio-pgs shows it nor in a message quoting it."""
    secret = psycopg.conninfo.conninfo_to_dict(dsn).get("password") or (
        psycopg.conninfo.conninfo_to_dict(dsn)["sslpassword"])
    assert "Secret9" in secret
    for shown in (without_password(dsn), Secret(dsn).scrub(f"could not connect: {dsn}")):
        assert "Secret9" not in shown and "et9" not in shown, shown
        parsed = psycopg.conninfo.conninfo_to_dict(shown.removeprefix("could not connect: "))
        assert parsed.get("password") in (None, "***") and parsed.get("sslpassword") in (
            None, "***"), shown


@pytest.mark.parametrize("password", [
    "Xy7&Secret9", r"Xy7\ Secret9", r"'Xy7 Secret9\'s'", r"'Xy7&Sec\\ret9 x'",
])
async def test_a_password_libpq_reads_with_a_separator_or_escape_is_hidden_whole(
    password: str, tmp_path: Path
):
    """In a key=value DSN, ``&`` is part of a password (it separates parameters only
    in a URL), and libpq reads backslash escapes and quotes: none of the password may
    show in the store's repr or in its errors."""
    dsn = f"host={tmp_path} user=app password={password} dbname=games"
    parsed = psycopg.conninfo.conninfo_to_dict(dsn)["password"]
    store = PostgresStore(dsn, schema="trio_pgs", connect_timeout=1)
    with trio.fail_after(5), pytest.raises(PersistenceError) as caught:
        await store.open()
    for shown in (repr(store), str(caught.value), without_password(dsn)):
        for part in ("Secret9", "Sec", parsed):
            assert part not in shown, shown


@pytest.mark.parametrize(
    "schema",
    ["", "1abc", "a-b", 'a"b', "a b", "a;drop", "x" * 64, "sch\u00e9ma", "a\x00", None, 5],
)
def test_a_schema_name_that_is_not_a_plain_sql_name_is_refused(schema: Any):
    with pytest.raises(ValueError, match="schema must be a plain SQL name"):
        PostgresStore("postgresql://app@localhost/games", schema=schema)


# -- conflicts -------------------------------------------------------------------------


async def test_a_batch_commits_every_operation_whose_condition_holds(postgres: Server):
    async with opened(postgres.store()) as store:
        await store.commit([Put(record(key, b"v1"), 0) for key in "abcd"])
        outcomes = await store.commit_each([
            Put(record("a", b"v2", version=2), 1),
            Put(record("b", b"v6", version=6), 5),  # stale: b is at 1
            Put(record("b", b"v7", version=7), 6),  # follows the refused one
            Put(record("c", b"again"), 0),  # c exists
            Put(record("d", b"v2", version=2, epoch=0), 1),  # fenced off: epoch 0 < 1
            Put(record("e", b"v1"), 0),
            Delete(KIND, "never"),
            Put(record("a", b"v3", version=3), 2),  # follows the applied one
        ])
        refused = [i for i, outcome in enumerate(outcomes) if outcome is not None]
        assert refused == [1, 2, 3, 4], outcomes
        assert all(isinstance(outcomes[i], ConflictError) for i in refused)
        assert await store.load(KIND, "a") == record("a", b"v3", version=3)
        for key in "bcd":
            assert await store.load(KIND, key) == record(key, b"v1")
        assert await store.load(KIND, "e") == record("e", b"v1")


@pytest.mark.parametrize("how", ["claimed", "overwritten"])
async def test_a_server_whose_record_changed_behind_its_back_fails_alone(
    postgres: Server, how: str
):
    """A second store on the schema (another process) claims the victim, or commits a
    newer record of it with a higher epoch; then the victim and 20 other servers write
    in one batch: only the victim's caller is refused; the others' writes are
    acknowledged and stored."""
    others = [f"s{i}" for i in range(20)]
    store, name = named_store(postgres)
    commits: list[int] = []

    def on_event(event: trio_pgs.ServerEvent) -> None:
        if event.type is trio_pgs.EventType.COMMITTED:
            commits.append(event.records)

    async with PersistentSupervisor(store=store, servers=[TallyServer],
                                    on_event=on_event) as sup:
        refs = {key: await sup.start(TallyServer, key=key) for key in [*others, "victim"]}
        for ref in refs.values():
            assert await ref.call(("add", "first")) == 1
        async with opened(postgres.store(schema=store.schema)) as other:
            if how == "claimed":
                await other.claim(KIND, "victim")
                expected_victim = ["first"]
            else:
                stored = await other.load(KIND, "victim")
                assert stored is not None
                await other.commit([Put(attrs.evolve(
                    stored, version=stored.version + 1, epoch=stored.epoch + 1,
                    data=tally("behind"),
                ), stored.version)])
                expected_victim = ["behind"]

            results: dict[str, Any] = {}

            async def add(key: str) -> None:
                try:
                    results[key] = await refs[key].call(("add", "second"))
                except Exception as exc:
                    results[key] = exc

            # s0's write holds the writer (its row is locked) while the 19 other
            # servers and the victim hand theirs over: the next batch has all 20.
            with row_locked(postgres, store.schema, "s0") as locker:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(add, "s0")
                    await eventually(lambda: waiting_on_a_lock(postgres, name),
                                     "the commit of s0 waits for its row lock")
                    for key in ["victim", *others[1:]]:
                        nursery.start_soon(add, key)
                    await trio.testing.wait_all_tasks_blocked()
                    del commits[:]
                    locker.rollback()
            assert commits == [1, 19]  # s0's batch, then the 19 of the batch of 20
            assert isinstance(results["victim"], PersistenceError), results["victim"]
            assert {key: results[key] for key in others} == dict.fromkeys(others, 2)
            for key in others:
                assert items(await other.load(KIND, key)) == ["first", "second"]
            assert items(await other.load(KIND, "victim")) == expected_victim
        # The next call activates the victim again, from the stored record.
        assert await refs["victim"].call("get") == expected_victim
        assert await refs["victim"].call(("add", "third")) == len(expected_victim) + 1


# -- fencing across store objects --------------------------------------------------------


async def test_a_claim_by_another_store_fences_off_the_writes_of_the_first(postgres: Server):
    schema = postgres.schema()
    async with (
        opened(postgres.store(schema=schema)) as a,
        opened(postgres.store(schema=schema)) as b,
    ):
        claim_a = await a.claim(KIND, "k")
        assert (claim_a.record, claim_a.version) == (None, 0)
        first = record("k", b"a1", epoch=claim_a.epoch)
        await a.commit([Put(first, 0)])
        second = attrs.evolve(first, data=b"a2", version=2)
        await a.commit([Put(second, 1)])

        claim_b = await b.claim(KIND, "k")  # another process activates the server
        assert claim_b.epoch > claim_a.epoch
        assert claim_b.record == attrs.evolve(second, epoch=claim_b.epoch)

        late = attrs.evolve(second, data=b"a3", version=3)
        with pytest.raises(ConflictError, match="epoch"):
            await a.commit([Put(late, 2)])
        outcomes = await a.commit_each([Put(late, 2)])
        assert isinstance(outcomes[0], ConflictError)
        with pytest.raises(ConflictError):
            await a.commit([Delete(KIND, "k", 2, claim_a.epoch)])

        for version in (3, 4):
            await b.commit([Put(record("k", b"b%d" % version, version=version,
                                       epoch=claim_b.epoch), version - 1)])
        expected = record("k", b"b4", version=4, epoch=claim_b.epoch)
        assert await a.load(KIND, "k") == expected
        assert await b.load(KIND, "k") == expected


async def test_two_supervisors_on_one_schema_fence_each_other_off(postgres: Server):
    """Two processes serve the same server in turn: whichever activated it last owns
    it; the other's activation is refused at its next write, and its next message
    activates the server again from what the other committed."""
    schema = postgres.schema()
    async with (
        PersistentSupervisor(store=postgres.store(schema=schema), name="one") as one,
        PersistentSupervisor(store=postgres.store(schema=schema), name="two") as two,
    ):
        ref_one = await one.start(TallyServer, key="shared")
        ref_two = two.ref(TallyServer, "shared")
        assert await ref_one.call(("add", "a")) == 1
        assert await ref_two.call(("add", "b")) == 2  # claims it: one is fenced off
        with pytest.raises(PersistenceError):
            await ref_one.call(("add", "lost"))
        assert await ref_two.call(("add", "c")) == 3
        assert await ref_one.call("get") == ["a", "b", "c"]  # activated again: owns it
        with pytest.raises(PersistenceError):
            await ref_two.call(("add", "lost too"))
        assert await ref_one.call(("add", "d")) == 4
    async with opened(postgres.store(schema=schema)) as store:
        assert items(await store.load(KIND, "shared")) == ["a", "b", "c", "d"]


# -- cancellation and lost connections ---------------------------------------------------


async def test_a_statement_timeout_is_a_failed_commit_not_an_unknown_outcome(
    postgres: Server,
):
    """A batch that runs into the database's ``statement_timeout`` (here, waiting for a
    row lock another program holds) was cancelled by the server, so rolled back: its
    writes fail with `PersistenceError`, not `OutcomeUnknown` (it was taken for a lost
    connection), and the store goes on once the lock is gone."""
    schema = postgres.schema()
    dsn = psycopg.conninfo.make_conninfo(postgres.dsn, options="-c statement_timeout=200")
    async with opened(ClockedPostgresStore(dsn, schema=schema)) as store:
        await store.commit([Put(record("k", b"v1"), 0)])
        with row_locked(postgres, schema, "k"):
            with pytest.raises(PersistenceError) as failed:
                await store.commit_each([Put(record("k", b"v2", version=2), 1)])
        assert not isinstance(failed.value, OutcomeUnknown), failed.value
        assert "statement timeout" in str(failed.value)
        assert await store.load(KIND, "k") == record("k", b"v1")
        assert await store.commit_each([Put(record("k", b"v2", version=2), 1)]) == [None]


async def test_cancelling_a_commit_cancels_its_query_in_the_server(postgres: Server):
    store, name = named_store(postgres)
    async with opened(store):
        await store.commit([Put(record("k", b"v1"), 0)])
        blocked = Blocked()
        with row_locked(postgres, store.schema, "k"):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(blocked.run, lambda: store.commit(
                    [Put(record("k", b"v2", version=2), 1)]
                ))
                (pid,) = await eventually(lambda: waiting_on_a_lock(postgres, name),
                                          "the commit waits for the row lock")
                blocked.scope.cancel()
                with trio.fail_after(5):
                    await blocked.done.wait()
            assert blocked.cancelled and blocked.error is None
            # The query is cancelled in the server, not left waiting for the lock.
            await eventually(
                lambda: not backends(postgres, name, f"pid = {pid} AND state = 'active'"),
                "the cancelled query ended in the server",
            )
        assert await store.load(KIND, "k") == record("k", b"v1")  # not applied
        await store.commit([Put(record("k", b"v2", version=2), 1)])
        assert await store.load(KIND, "k") == record("k", b"v2", version=2)


async def test_a_cancelled_open_leaves_no_connection_behind(postgres: Server):
    """The open of a supervisor's store is cancelled while PostgreSQL keeps it waiting
    (another program holds a lock on the store's tables): the caller gets out at
    once, and once the lock is gone the store holds no connection to the server (a
    store left half-open would hold its pool's connections, and threads, for ever)."""
    store, name = named_store(postgres)
    async with opened(store):  # the tables exist
        pass
    with connect(postgres, autocommit=False) as locker:
        locker.execute(f'LOCK TABLE "{store.schema}".meta IN ACCESS EXCLUSIVE MODE')
        with trio.fail_after(5):
            with trio.move_on_after(0.5) as scope:
                await store.open()
        assert scope.cancelled_caught
        waiting = waiting_on_a_lock(postgres, name)
        locker.rollback()
    # The abandoned open goes on once the lock is gone (its first connection ends);
    # what it opened after that must not stay.
    await eventually(lambda: not set(waiting) & set(backends(postgres, name)),
                     "the connection the open waited on ended")
    await trio.sleep(0.5)
    await eventually(lambda: not backends(postgres, name),
                     "no connection of the cancelled open remains")
    async with opened(store):  # and the store opens again
        assert await store.load(KIND, "k") is None


async def test_a_store_whose_connections_were_killed_works_again(postgres: Server):
    """Every connection of the store is terminated between two commits (a database
    restart, a failover, an administrator): the next commit fails cleanly or works,
    and the one after works."""
    store, name = named_store(postgres, pool_size=4)
    async with opened(store):
        await store.commit([Put(record("k", b"v1"), 0)])
        epochs: list[int] = []

        async def racing_claim() -> None:
            epochs.append((await store.claim(KIND, "k")).epoch)

        # Three claims at once, so that the pool holds several connections (the
        # writes have a connection of their own).
        with row_locked(postgres, store.schema, "k") as locker:
            async with trio.open_nursery() as nursery:
                for _ in range(3):
                    nursery.start_soon(racing_claim)
                await eventually(lambda: len(waiting_on_a_lock(postgres, name)) == 3,
                                 "three claims wait for the row lock")
                locker.rollback()
        assert sorted(epochs) == [2, 3, 4], epochs
        pids = backends(postgres, name)
        assert len(pids) >= 3
        terminate(postgres, pids)
        await eventually(lambda: not backends(postgres, name), "the backends are gone")
        version = 1
        with trio.fail_after(BOUND):
            try:
                await store.commit([Put(record("k", b"v2", version=2, epoch=4), 1)])
                version = 2
            except PersistenceError as exc:
                assert not isinstance(exc, OutcomeUnknown), exc
            await store.commit([Put(record("k", b"v%d" % (version + 1),
                                           version=version + 1, epoch=4), version)])
            assert await store.load(KIND, "k") == record(
                "k", b"v%d" % (version + 1), version=version + 1, epoch=4
            )


async def test_a_commit_whose_connection_is_killed_before_it_commits_fails_cleanly(
    postgres: Server,
):
    """Terminated while its UPDATE waits for a row lock (COMMIT not sent yet): the
    caller gets a PersistenceError saying nothing was written (not OutcomeUnknown),
    nothing was, and the next commit works."""
    store, name = named_store(postgres)
    async with opened(store):
        await store.commit([Put(record("k", b"v1"), 0)])
        blocked = Blocked()
        with row_locked(postgres, store.schema, "k"):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(blocked.run, lambda: store.commit(
                    [Put(record("k", b"v2", version=2), 1)]
                ))
                pids = await eventually(lambda: waiting_on_a_lock(postgres, name),
                                        "the commit waits for the row lock")
                terminate(postgres, pids)
                with trio.move_on_after(5):
                    await blocked.done.wait()
                assert blocked.done.is_set(), (
                    "the commit goes on 5 s after its backend was terminated (run again on "
                    "another connection, it waits for the same lock): its caller is never "
                    "told, and terminating a stuck query does not unstick it"
                )
        assert isinstance(blocked.error, PersistenceError), blocked.error
        assert not isinstance(blocked.error, OutcomeUnknown), blocked.error
        assert await store.load(KIND, "k") == record("k", b"v1")
        with trio.fail_after(BOUND):
            await store.commit([Put(record("k", b"v2", version=2), 1)])
        assert await store.load(KIND, "k") == record("k", b"v2", version=2)


async def test_a_commit_whose_connection_is_killed_while_committing_is_outcome_unknown(
    postgres: Server,
):
    """Terminated once COMMIT was sent (here COMMIT waits in a deferred trigger, as it
    waits for a synchronous standby in production, where the transaction may well be
    committed already): nobody knows whether it was stored, and the caller must be
    told so (OutcomeUnknown), not that retrying is safe. The next commit works."""
    store, name = named_store(postgres)
    schema = store.schema
    lock_id = 424242
    async with opened(store):
        await store.commit([Put(record("k", b"v1"), 0)])
        with connect(postgres) as admin:
            admin.execute(
                f'CREATE FUNCTION "{schema}".slow_commit() RETURNS trigger LANGUAGE plpgsql'
                f" AS $$ BEGIN PERFORM pg_advisory_xact_lock({lock_id}); RETURN NULL; END $$"
            )
            admin.execute(
                f'CREATE CONSTRAINT TRIGGER slow_commit AFTER UPDATE ON "{schema}".records'
                " DEFERRABLE INITIALLY DEFERRED FOR EACH ROW"
                f' EXECUTE FUNCTION "{schema}".slow_commit()'
            )
        blocked = Blocked()
        with connect(postgres) as holder:
            holder.execute("SELECT pg_advisory_lock(%s)", (lock_id,))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(blocked.run, lambda: store.commit(
                    [Put(record("k", b"v2", version=2), 1)]
                ))
                pids = await eventually(
                    lambda: backends(postgres, name, "state = 'active' AND query = 'COMMIT'"
                                     " AND wait_event_type = 'Lock'"),
                    "the COMMIT waits in the trigger",
                )
                terminate(postgres, pids)
                with trio.fail_after(5):
                    await blocked.done.wait()
            holder.execute("SELECT pg_advisory_unlock(%s)", (lock_id,))
        assert isinstance(blocked.error, OutcomeUnknown), repr(blocked.error)
        with trio.fail_after(BOUND):
            assert await store.load(KIND, "k") == record("k", b"v1")
            await store.commit([Put(record("k", b"v2", version=2), 1)])
        assert await store.load(KIND, "k") == record("k", b"v2", version=2)


# -- the writer's usual batch: one statement from the trio thread -------------------------
#
# A batch of plain puts of distinct records (what the group-commit writer hands over
# most of the time) is one prepared statement that commits by itself, sent through
# libpq from the trio thread on a connection the writes hold from one batch to the
# next. These are that path's own ways to be interrupted.


def updates(keys: str, version: int) -> list[Put]:
    """Plain puts of *keys* at *version*, each expecting the one before."""
    return [Put(record(key, b"v%d" % version, version=version), version - 1) for key in keys]


async def test_cancelling_a_batch_cancels_its_statement_in_the_server(postgres: Server):
    store, name = named_store(postgres)
    async with opened(store):
        await store.commit([Put(record(key, b"v1"), 0) for key in "ab"])
        blocked = Blocked()
        with row_locked(postgres, store.schema, "b"):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(blocked.run, lambda: store.commit_each(updates("ab", 2)))
                (pid,) = await eventually(lambda: waiting_on_a_lock(postgres, name),
                                          "the batch waits for the row lock of b")
                blocked.scope.cancel()
                with trio.fail_after(5):
                    await blocked.done.wait()
            assert blocked.cancelled and blocked.error is None
            await eventually(
                lambda: not backends(postgres, name, f"pid = {pid} AND state = 'active'"),
                "the cancelled statement ended in the server",
            )
        for key in "ab":  # one statement: neither was written
            assert await store.load(KIND, key) == record(key, b"v1")
        with trio.fail_after(BOUND):  # on another connection
            assert await store.commit_each(updates("ab", 2)) == [None, None]
        for key in "ab":
            assert await store.load(KIND, key) == record(key, b"v2", version=2)


async def test_a_batch_whose_connection_is_killed_is_outcome_unknown(postgres: Server):
    """The statement commits by itself: once sent, a lost connection leaves its outcome
    unknown (here it waited for a row lock, and was not written). The next batch runs
    on another connection."""
    store, name = named_store(postgres)
    async with opened(store):
        await store.commit([Put(record(key, b"v1"), 0) for key in "ab"])
        blocked = Blocked()
        with row_locked(postgres, store.schema, "b"):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(blocked.run, lambda: store.commit_each(updates("ab", 2)))
                pids = await eventually(lambda: waiting_on_a_lock(postgres, name),
                                        "the batch waits for the row lock of b")
                terminate(postgres, pids)
                with trio.fail_after(5):
                    await blocked.done.wait()
        assert isinstance(blocked.error, OutcomeUnknown), repr(blocked.error)
        for key in "ab":
            assert await store.load(KIND, key) == record(key, b"v1")
        with trio.fail_after(BOUND):
            assert await store.commit_each(updates("ab", 2)) == [None, None]
        for key in "ab":
            assert await store.load(KIND, key) == record(key, b"v2", version=2)


async def test_a_write_connection_the_database_dropped_while_idle_is_replaced(
    postgres: Server,
):
    """The connection the writes hold between batches is terminated while idle (a
    restart, an idle timeout): the next batch notices before sending anything, and runs
    on a new connection, as if nothing had happened."""
    store, name = named_store(postgres)
    async with opened(store):
        assert await store.commit_each([Put(record(key, b"v1"), 0) for key in "ab"]) == [
            None, None]
        first = backends(postgres, name)
        terminate(postgres, first)
        await eventually(lambda: not set(first) & set(backends(postgres, name)),
                         "the backends are gone")
        for version in (2, 3):
            with trio.fail_after(BOUND):
                assert await store.commit_each(updates("ab", version)) == [None, None]
        for key in "ab":
            assert await store.load(KIND, key) == record(key, b"v3", version=3)


@contextlib.contextmanager
def descriptors_above(number: int) -> Iterator[None]:
    """Hold open files until the next descriptor the process opens is above *number*
    (as a server with many sockets does), raising the soft limit if needed."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = number + 256
    if hard != resource.RLIM_INFINITY and hard < wanted:
        pytest.skip(f"the hard limit of open files ({hard}) is below {wanted}")
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    held: list[int] = []
    try:
        while not held or held[-1] <= number:
            held.append(os.open(os.devnull, os.O_RDONLY))
        yield
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_a_store_works_with_descriptors_above_select_s_limit(postgres: Server):
    """A process holding more than 1,024 open files (FD_SETSIZE, select's limit) gets
    connections whose descriptors are above it: checking them before use must not
    refuse every one of them (each load and write then waited for connect_timeout and
    failed, "is the database up?")."""
    with descriptors_above(1100):
        store = postgres.store(connect_timeout=3)
        async with opened(store):
            with trio.fail_after(2):
                assert await store.commit_each([Put(record("a", b"v1"), 0)]) == [None]
                assert await store.commit_each(updates("a", 2)) == [None]
                assert await store.load(KIND, "a") == record("a", b"v2", version=2)


async def test_a_batch_prepares_its_statement_again_when_it_is_gone(postgres: Server):
    """The batch's prepared statement was deallocated on its connection (DISCARD ALL,
    as a connection pooler may send): the batch prepares it again and is written."""
    async with opened(postgres.store()) as store:
        await store.commit_each([Put(record(key, b"v1"), 0) for key in "ab"])
        assert await store.commit_each(updates("ab", 2)) == [None, None]
        held = store._writes._held
        assert held is not None
        held.connection.execute("DEALLOCATE ALL")
        assert await store.commit_each(updates("ab", 3)) == [None, None]
        assert store._writes._held is held  # the same connection
        for key in "ab":
            assert await store.load(KIND, key) == record(key, b"v3", version=3)


async def test_the_writes_give_their_connection_back_to_its_pool_from_time_to_time(
    postgres: Server, monkeypatch: pytest.MonkeyPatch
):
    """The connection the writes hold goes back to its pool after a while (so that the
    pool can replace it past its max_lifetime) and is taken again: with no while at
    all, every batch gives it back and takes it again, and the pool of one connection
    never runs dry."""
    from trio_pgs import _postgres_writes

    monkeypatch.setattr(_postgres_writes, "_HOLD", 0.0)
    async with opened(postgres.store()) as store:
        await store.commit_each([Put(record(key, b"v1"), 0) for key in "ab"])
        for version in range(2, 6):
            with trio.fail_after(BOUND):
                assert await store.commit_each(updates("ab", version)) == [None, None]
        await store.commit([Put(record("a", b"v6", version=6), 5)])
        assert await store.load(KIND, "a") == record("a", b"v6", version=6)


async def test_a_store_closed_while_a_batch_runs_leaves_no_connection_behind(
    postgres: Server,
):
    """close() while a batch waits for a row lock: the batch ends when the lock goes
    (written: nobody cancelled it), and then its connection is closed too."""
    store, name = named_store(postgres)
    await store.open()
    await store.commit([Put(record(key, b"v1"), 0) for key in "ab"])
    blocked = Blocked()
    with row_locked(postgres, store.schema, "b") as locker:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(blocked.run, lambda: store.commit_each(updates("ab", 2)))
            await eventually(lambda: waiting_on_a_lock(postgres, name),
                             "the batch waits for the row lock of b")
            await store.close()
            locker.rollback()
            with trio.fail_after(BOUND):
                await blocked.done.wait()
    assert blocked.error is None, blocked.error
    await eventually(lambda: not backends(postgres, name), "no connection remains")
    async with opened(postgres.store(schema=store.schema)) as other:
        for key in "ab":
            assert await other.load(KIND, key) == record(key, b"v2", version=2)


async def test_a_batch_refused_in_part_writes_the_rest_and_says_why(postgres: Server):
    """One statement writes what it can; the refused are found by what it did not
    write, each with its own conflict."""
    async with opened(postgres.store()) as store:
        await store.commit([Put(record(key, b"v1"), 0) for key in "abc"])
        outcomes = await store.commit_each([
            Put(record("a", b"v2", version=2), 1),
            Put(record("b", b"v6", version=6), 5),  # stale: b is at 1
            Put(record("c", b"v2", version=2, epoch=0), 1),  # fenced off: epoch 0 < 1
        ])
        assert outcomes[0] is None
        assert isinstance(outcomes[1], ConflictError) and not outcomes[1].fenced
        assert isinstance(outcomes[2], ConflictError) and outcomes[2].fenced
        assert await store.load(KIND, "a") == record("a", b"v2", version=2)
        for key in "bc":
            assert await store.load(KIND, key) == record(key, b"v1")
        outcomes = await store.commit_each([  # creating: one statement too
            Put(record("a", b"again"), 0),  # a exists
            Put(record("d", b"v1"), 0),
        ])
        assert isinstance(outcomes[0], ConflictError) and outcomes[1] is None
        assert await store.load(KIND, "d") == record("d", b"v1")


async def test_a_batch_writes_any_key_data_and_number_exactly(postgres: Server):
    """The batch's parameters are array literals and binary arrays the store writes
    itself: keys that need escaping, every byte value, floats whose text is long or odd,
    versions near the limit of bigint all come back as they were."""
    keys = ['a"b', "c\\d", "e,f", "{g}", "h i", "NULL", "ü🎲", "'j'", "k\\"]
    floats = [5e-324, 1e300, -0.0, 0.1 + 0.2, 1.0, 1_700_000_000.123456]
    made = [
        Record(kind=KIND, key=key, data=bytes(range(i, 256)) + bytes(range(i)),
               version=2**62 + i, epoch=2**40 + i, state_version=2**31 + i,
               updated_at=floats[i % len(floats)], quarantined=i % 2 == 0)
        for i, key in enumerate(keys)
    ]
    async with opened(postgres.store()) as store:
        assert await store.commit_each([Put(r, 0) for r in made]) == [None] * len(made)
        for r in made:
            assert await store.load(KIND, r.key) == r
        beyond = attrs.evolve(made[0], version=2**63)  # no bigint holds it
        with pytest.raises(PersistenceError) as caught:
            await store.commit_each([Put(beyond, made[0].version)])
        assert not isinstance(caught.value, OutcomeUnknown)
        assert await store.load(KIND, made[0].key) == made[0]


# -- rows are data ---------------------------------------------------------------------

#: Rows written by hand that the table's types allow and that are no valid record: the
#: columns to set, as SQL.
BAD_ROWS = {
    "data-null": {"data": "NULL"},
    "crash-null": {"crashes": "ARRAY[1.0, NULL]::float8[]"},
    "crash-nan": {"crashes": "ARRAY['NaN']::float8[]"},
    "crash-infinite": {"crashes": "ARRAY['Infinity']::float8[]"},
    "history-null": {"history": "ARRAY[NULL]::bytea[]"},
    "updated-at-nan": {"updated_at": "'NaN'"},
    # No room for the next write: PostgreSQL would refuse the version after it, and
    # with it the whole batch of the other servers' writes.
    "version-at-the-top": {"version": "9223372036854775807"},
    "epoch-at-the-top": {"epoch": "9223372036854775807"},
}


def write_bad_rows(postgres: Server, schema: str, kind: str) -> None:
    with connect(postgres) as connection:
        for key, columns in BAD_ROWS.items():
            values = {"data": "%(data)s", "crashes": "'{}'", "history": "'{}'",
                      "updated_at": "1.0", "version": "1", "epoch": "1", **columns}
            connection.execute(
                f'INSERT INTO "{schema}".records (kind, key, version, epoch, state_version,'
                " data, crashes, history, updated_at) VALUES (%(kind)s, %(key)s, "
                f"{values['version']}, {values['epoch']}, 1, "
                f"{values['data']}, {values['crashes']}, {values['history']},"
                f" {values['updated_at']})",
                {"kind": kind, "key": key, "data": tally("x")},
            )


async def test_rows_that_are_not_records_are_refused_by_load_and_skipped_by_scan(
    postgres: Server,
):
    store = postgres.store()
    async with opened(store):
        await store.commit([Put(record("good-1", tally("g")), 0),
                            Put(record("zz-good-2", tally("g")), 0)])
        write_bad_rows(postgres, store.schema, KIND)
        for key in BAD_ROWS:
            with pytest.raises(PersistenceError, match=f"{KIND}/{key}"):
                await store.load(KIND, key)
        skipped: list[tuple[str, Exception]] = []
        scanned = [r.key async for r in store.scan(
            KIND, on_skip=lambda key, error: skipped.append((key, error))
        )]
        assert scanned == ["good-1", "zz-good-2"]
        assert sorted(key for key, _ in skipped) == sorted(BAD_ROWS)
        for key, error in skipped:
            assert isinstance(error, PersistenceError) and f"{KIND}/{key}" in str(error)
        assert await store.kinds() == {KIND}


async def test_a_supervisor_fails_the_activation_of_a_row_that_is_no_record_only(
    postgres: Server,
):
    schema = postgres.schema()
    store = postgres.store(schema=schema)
    async with PersistentSupervisor(store=store, servers=[TallyServer]) as sup:
        good = await sup.start(TallyServer, "g")
        write_bad_rows(postgres, schema, KIND)
        before = {row[1]: row for row in snapshot(postgres, schema)["records"]}
        for key in BAD_ROWS:
            with pytest.raises(ActivationFailed, match=f"{KIND}/{key}"):
                await sup.ref(TallyServer, key).call("get")
        assert await good.call(("add", "h")) == 2
        other = await sup.start(TallyServer, key="new")
        assert await other.call("get") == []
        after = {row[1]: row for row in snapshot(postgres, schema)["records"]}
    for key in BAD_ROWS:  # never overwritten (a claim may raise the epoch: column 3)
        assert repr(after[key][:3] + after[key][4:]) == repr(
            before[key][:3] + before[key][4:]
        ), key


async def test_a_live_row_at_version_0_is_refused_or_written_over(postgres: Server):
    """Versions start at 1; 0 means "never stored" to a write. A row written by hand
    with version 0 must not leave its server activated yet unable to commit anything,
    for ever, each write refused as if another writer had changed it: either it is no
    record (the activation fails, saying so) or the server works."""
    schema = postgres.schema()
    async with PersistentSupervisor(store=postgres.store(schema=schema),
                                    servers=[TallyServer]) as sup:
        await sup.start(TallyServer, "g")
        with connect(postgres) as connection:
            connection.execute(
                f'INSERT INTO "{schema}".records (kind, key, version, epoch, state_version,'
                " data, updated_at) VALUES (%s, 'zero', 0, 1, 1, %s, 1.0)",
                (KIND, tally("x")),
            )
        ref = sup.ref(TallyServer, "zero")
        try:
            added = await ref.call(("add", "y"))
        except ActivationFailed as exc:
            assert f"{KIND}/zero" in str(exc)
        else:
            assert added == 2
            assert await ref.call("get") == ["x", "y"]


# -- scans and kinds -------------------------------------------------------------------


async def test_scans_go_by_kind_in_key_order_across_pages_without_deleted_records(
    postgres: Server,
):
    """More records of a kind than a page holds (1000), other kinds sorting before,
    between and after it (some sharing its prefix), deleted records among them."""
    count = 2345
    keys = [f"{i:05d}" for i in range(count)]
    shuffled = keys[::7] + [key for i, key in enumerate(keys) if i % 7]
    deleted = {key for i, key in enumerate(keys) if i % 10 == 3 or i in (999, 1000, 1001)}
    async with opened(postgres.store()) as store:
        await store.commit([Put(record(key, key.encode(), kind="k"), 0) for key in shuffled])
        others = [
            Put(record(key, b"other", kind=kind), 0)
            for kind in ("j", "k2", "ka", "kk", "l", "K")
            for key in ("00000", "00999", "01000", "99999")
        ]
        await store.commit(others)
        await store.commit([Put(record("x", kind="gone"), 0)])
        await store.commit([Delete("k", key) for key in sorted(deleted)])
        await store.commit([Delete("gone", "x")])

        scanned = [r async for r in store.scan("k")]
        assert [r.key for r in scanned] == [key for key in keys if key not in deleted]
        assert scanned[0] == record("00000", b"00000", kind="k")
        assert all(r.kind == "k" and r.data == r.key.encode() for r in scanned)
        assert [r.key async for r in store.scan("ka")] == ["00000", "00999", "01000", "99999"]
        assert [r.key async for r in store.scan("gone")] == []
        assert [r.key async for r in store.scan("nothing")] == []
        assert await store.load("k", "01000") is None
        assert await store.kinds() == {"j", "k", "k2", "ka", "kk", "l", "K"}


async def test_a_record_with_an_empty_key_is_refused_or_found_by_scans(postgres: Server):
    """load finds what commit accepted; so must a scan (trio-pgs list and export
    see a store through scans)."""
    async with opened(postgres.store()) as store:
        try:
            await store.commit([Put(record(""), 0)])
        except ValueError:
            return
        assert await store.load(KIND, "") == record("")
        assert [r.key async for r in store.scan(KIND)] == [""]


async def test_a_store_refuses_a_kind_or_key_holding_a_nul_character(postgres: Server):
    async with opened(postgres.store()) as store:
        for kind, key in ((KIND, "a\x00b"), ("k\x00", "a")):
            with pytest.raises(ValueError, match="NUL"):
                await store.commit([Put(record(key, kind=kind), 0)])
            with pytest.raises(ValueError, match="NUL"):
                await store.load(kind, key)
        assert await store.kinds() == set()


def test_the_postgres_store_is_part_of_the_public_api():
    assert trio_pgs.PostgresStore is PostgresStore
    assert isinstance(PostgresStore("postgresql://app@localhost/games"),
                      trio_pgs.SupportsCommitEach)


# -- claims from the trio thread (_postgres_claims) ------------------------------------------


async def test_a_claim_returns_the_record_with_its_epoch_raised(postgres: Server):
    store, _ = named_store(postgres)
    async with opened(store):
        stored = Record(kind=KIND, key="ключ é", data=b'{"x": [1, 2]}', version=3, epoch=2,
                        updated_at=5.5, crashes=(1.5, 2.5), history=(b"{}", b"[]"))
        await store.commit([Put(stored, 0)])
        for epoch in (3, 4):  # the first from the trio thread; so is the next
            claim = await store.claim(KIND, "ключ é")
            assert claim.record == attrs.evolve(stored, epoch=epoch)
            assert (claim.epoch, claim.version) == (epoch, 3)
        missing = await store.claim(KIND, "nobody")
        assert (missing.record, missing.epoch, missing.version) == (None, 1, 0)


async def test_cancelling_a_claim_cancels_its_query_in_the_server(postgres: Server):
    store, name = named_store(postgres)
    async with opened(store):
        await store.commit([Put(record(key), 0) for key in "ab"])
        blocked = Blocked()
        with row_locked(postgres, store.schema, "b"):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(blocked.run, lambda: store.claim(KIND, "b"))
                (pid,) = await eventually(lambda: waiting_on_a_lock(postgres, name),
                                          "the claim waits for the row lock of b")
                with trio.fail_after(BOUND):  # another claim meanwhile: on the pool
                    assert (await store.claim(KIND, "a")).epoch == 2
                blocked.scope.cancel()
                with trio.fail_after(5):
                    await blocked.done.wait()
            assert blocked.cancelled and blocked.error is None
            await eventually(
                lambda: not backends(postgres, name, f"pid = {pid} AND state = 'active'"),
                "the cancelled claim ended in the server",
            )
        with trio.fail_after(BOUND):  # rolled back: the next claim is the second
            assert (await store.claim(KIND, "b")).epoch == 2


async def test_a_claim_whose_connection_is_killed_fails_and_the_next_one_works(
    postgres: Server,
):
    store, name = named_store(postgres)
    async with opened(store):
        await store.commit([Put(record("b"), 0)])
        blocked = Blocked()
        with row_locked(postgres, store.schema, "b"):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(blocked.run, lambda: store.claim(KIND, "b"))
                pids = await eventually(lambda: waiting_on_a_lock(postgres, name),
                                        "the claim waits for the row lock of b")
                terminate(postgres, pids)
                with trio.fail_after(5):
                    await blocked.done.wait()
        assert isinstance(blocked.error, PersistenceError), repr(blocked.error)
        assert str(blocked.error).startswith(f"{KIND}/b: PostgreSQL failed")
        with trio.fail_after(BOUND):
            assert (await store.claim(KIND, "b")).epoch == 2


async def test_a_claim_reads_its_row_whatever_the_sessions_output_settings(postgres: Server):
    """Settings that change the text form of values (bytea's escape format, fewer
    float digits) change nothing: a claim reads its row in binary, as loads do."""
    schema = postgres.schema()
    dsn = psycopg.conninfo.make_conninfo(
        postgres.dsn, options="-c bytea_output=escape -c extra_float_digits=0"
    )
    async with opened(PostgresStore(dsn, schema=schema)) as store:
        stored = Record(kind=KIND, key="k", data=b"3", version=4, epoch=1,
                        updated_at=1712345678.1234567, crashes=(0.1 + 0.2, 2e9 + 0.5),
                        history=(b"2", b"[]", b'{"a": 1}', b"x}"))
        await store.commit([Put(stored, 0)])
        claimed = await store.claim(KIND, "k")
        assert claimed.record == attrs.evolve(stored, epoch=2)
        assert claimed.record == await store.load(KIND, "k")


async def test_a_failed_claim_says_what_postgresql_said(postgres: Server):
    schema = postgres.schema()
    dsn = psycopg.conninfo.make_conninfo(postgres.dsn, options="-c statement_timeout=200")
    async with opened(PostgresStore(dsn, schema=schema)) as store:
        await store.commit([Put(record("k"), 0), Put(record("bad"), 0)])
        with row_locked(postgres, schema, "k"):
            with pytest.raises(PersistenceError) as failed:
                await store.claim(KIND, "k")
        assert str(failed.value) == (
            f"{KIND}/k: PostgreSQL failed: canceling statement due to statement timeout"
        )
        with connect(postgres) as connection:
            connection.execute(
                f'UPDATE "{schema}".records SET data = NULL WHERE key = %s', ("bad",)
            )
        with pytest.raises(PersistenceError) as loaded:
            await store.load(KIND, "bad")
        with pytest.raises(PersistenceError) as claimed:
            await store.claim(KIND, "bad")
        assert str(claimed.value) == str(loaded.value)  # the row's fault, said once
