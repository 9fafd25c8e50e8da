"""What a hostile review of PostgresStore broke, each fixed and kept fixed: a purge
undone by a running activation, rows that crashed decoding, URLs the CLI rewrote
wrongly, passwords in messages, stale pooled connections, a double open."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import psycopg
import pytest
import trio

from trio_pgs import PersistenceError, PersistentSupervisor, PostgresStore, Put, Record
from trio_pgs._cli import main

from .postgres import Server
from .servers import TallyServer


def _url(postgres: Server, schema: str) -> str:
    return f"{postgres.dsn}{'&' if '?' in postgres.dsn else '?'}schema={schema}"


def _sql(postgres: Server, statement: str, params: tuple[Any, ...] = ()) -> Any:
    with psycopg.connect(postgres.dsn, autocommit=True) as connection:
        cursor = connection.execute(statement, params)
        return cursor.fetchall() if cursor.description else None


async def test_a_purge_while_the_application_runs_is_not_undone_by_its_next_call(postgres):
    store = postgres.store()
    async with PersistentSupervisor(store=store, servers=[TallyServer]) as sup:
        ref = await sup.start(TallyServer, key="k")
        await ref.call(("add", "x"))
        purge = [sys.executable, "-m", "trio_pgs", "purge", "--yes",
                 _url(postgres, store.schema), "tally", "k"]
        done = await trio.to_thread.run_sync(
            lambda: subprocess.run(purge, capture_output=True, text=True, timeout=60)
        )
        assert done.returncode == 0, done.stderr
        with pytest.raises(PersistenceError):
            await ref.call(("add", "y"))  # the activation was fenced off by the purge
    assert await store.load("tally", "k") is None


@pytest.mark.parametrize(("column", "value"), [
    ("crashes", "'{{1,2},{3,4}}'::float8[]"),
    ("history", "ARRAY[ARRAY['\\x01'::bytea], ARRAY['\\x02'::bytea]]"),
    ("version", "0"),
    ("epoch", "-1"),
    ("key", "''"),
])
async def test_a_row_no_store_could_write_is_refused_and_skipped_not_crashed_on(
    postgres, column, value
):
    store = postgres.store()
    await store.open()
    try:
        await store.commit([Put(Record(kind="k", key="bad", data=b"1"), 0)])
        await store.commit([Put(Record(kind="k", key="good", data=b"1"), 0)])
        _sql(postgres, f'UPDATE "{store.schema}".records SET {column} = {value}'
                       " WHERE key = 'bad'")
        key = "" if column == "key" else "bad"
        if key:
            with pytest.raises(PersistenceError, match="not a valid trio-pgs record"):
                await store.load("k", key)
        skipped: list[str] = []
        found = [r.key async for r in store.scan("k", on_skip=lambda k, e: skipped.append(k))]
        assert found == ["good"] and skipped == [key]
    finally:
        await store.close()


def test_the_cli_keeps_a_url_with_an_empty_host_as_written(
    postgres: Server, capsys: pytest.CaptureFixture[str]
) -> None:
    host = postgres.dsn.partition("host=")[2].split("&")[0]
    url = f"postgresql:///postgres?user=postgres&host={host}&schema={postgres.schema()}"
    assert main(["import", url, "/dev/null", "--allow-empty"]) == 0
    assert main(["list", url]) == 0, capsys.readouterr().err


@pytest.mark.parametrize("dsn", [
    "postgresql://app:pw/with/slash@127.0.0.1:1/db",
    "postgresql://app:S3cr@tPW@127.0.0.1:1/db",
    "postgresql://app:50%offPW@127.0.0.1:1/db",
    "postgresql://app@127.0.0.1:1/db?password=S3cretPW&connect_timeout=2",
])
async def test_a_password_is_never_shown(dsn: str):
    store = PostgresStore(dsn, connect_timeout=2)
    secret = {"pw/with/slash", "S3cr@tPW", "50%offPW", "S3cretPW"}
    with pytest.raises(PersistenceError) as caught:
        await store.open()
    for shown in (repr(store), str(caught.value)):
        assert not any(word in shown for word in secret), shown


def test_the_cli_never_shows_a_password_parameter(capsys: pytest.CaptureFixture[str]) -> None:
    url = "POSTGRESQL://app@127.0.0.1:1/db?password=S3cretPW&connect_timeout=2&schema=s"
    assert main(["list", url]) == 2
    assert "S3cretPW" not in capsys.readouterr().err


async def test_connections_the_database_dropped_while_idle_are_replaced_unnoticed(postgres):
    store = postgres.store(pool_size=3)
    await store.open()
    try:
        await store.commit([Put(Record(kind="k", key="a", data=b"1"), 0)])
        async with trio.open_nursery() as nursery:  # warm several connections
            for _ in range(6):
                nursery.start_soon(store.load, "k", "a")
        others = ("FROM pg_stat_activity WHERE datname = current_database()"
                  " AND pid <> pg_backend_pid() AND backend_type = 'client backend'")
        _sql(postgres, f"SELECT pg_terminate_backend(pid) {others}")
        for _ in range(100):  # the backends end a moment after they are told to
            if _sql(postgres, f"SELECT count(*) {others}")[0][0] == 0:
                break
            await trio.sleep(0.02)
        for _ in range(4):
            record = await store.load("k", "a")
            assert record is not None and record.data == b"1"
    finally:
        await store.close()


async def test_a_store_opened_twice_at_once_is_refused_once(postgres):
    store = postgres.store()
    outcomes: list[str] = []

    async def open_it() -> None:
        try:
            await store.open()
            outcomes.append("opened")
        except ValueError:
            outcomes.append("refused")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(open_it)
        nursery.start_soon(open_it)
    await store.close()
    assert sorted(outcomes) == ["opened", "refused"]


ODD_KEYS = ['a"b', "back\\slash", "{braces},commas", " spaced ", "NULL", "ünï©ødé 🎲",
            "\\x41", "'quote'", "tab\tnew\nline"]


async def test_a_batch_of_odd_keys_and_bytes_round_trips_through_the_bulk_statements(postgres):
    """A round of plain puts is one statement whose arrays trio-pgs formats itself:
    every character a key may hold, and any bytes, come back as they went in."""
    store = postgres.store()
    data = [bytes(range(256)), b"", b'{"x":"\\u0000"}', b"\\x41", "é".encode()]
    await store.open()
    try:
        creates = [Put(Record(kind="k,{}", key=key, data=data[i % len(data)],
                              updated_at=1.5 + i), 0) for i, key in enumerate(ODD_KEYS)]
        assert await store.commit_each(creates) == [None] * len(ODD_KEYS)
        updates = [Put(Record(kind="k,{}", key=key, data=data[(i + 1) % len(data)],
                              version=2, quarantined=bool(i % 2)), 1)
                   for i, key in enumerate(ODD_KEYS)]
        assert await store.commit_each(updates) == [None] * len(ODD_KEYS)
        for put in updates:
            assert await store.load("k,{}", put.record.key) == put.record
    finally:
        await store.close()


async def test_a_key_postgresql_cannot_hold_fails_its_own_activation_only(postgres):
    store = postgres.store()
    async with PersistentSupervisor(store=store, servers=[TallyServer]) as sup:
        good = await sup.start(TallyServer, key="good")
        # A NUL is the store's refusal; a lone surrogate every store's (check_key).
        for key, match in (("nul\x00", "PostgreSQL text"),
                           ("surrogate\udc80", "encodable as UTF-8")):
            with pytest.raises(Exception, match=match):
                await sup.start(TallyServer, key=key)
        assert await good.call(("add", "x")) == 1


# -- a second review: the bulk statement, the two pools --------------------------------


async def test_a_failure_after_the_bulk_statement_committed_never_says_not_committed(
    postgres, monkeypatch
):
    """The writer's usual batch is one statement that commits by itself; explaining
    its refusals afterwards may fail (a lock timeout, a serialization failure), and
    then the refused are still refused and the written still written."""
    from trio_pgs import _postgres_sql

    store = postgres.store()
    await store.open()
    try:
        await store.commit([Put(Record(kind="k", key=key, data=b"1"), 0) for key in "ab"])
        calls = []

        def failing_lookup(*args: Any) -> Any:
            calls.append(args)
            raise psycopg.errors.SerializationFailure("injected")

        monkeypatch.setattr(_postgres_sql, "_stored", failing_lookup)
        outcomes = await store.commit_each([
            Put(Record(kind="k", key="a", data=b"2", version=2), 1),
            Put(Record(kind="k", key="b", data=b"2", version=6), 5),  # stale
        ])
        monkeypatch.undo()
        assert outcomes[0] is None and outcomes[1] is not None, outcomes
        assert len(calls) == 1  # the statement was not run again
        assert (await store.load("k", "a")).data == b"2"
        assert (await store.load("k", "b")).data == b"1"
    finally:
        await store.close()


def _backends(postgres: Server, application: str) -> int:
    (count,) = _sql(postgres, "SELECT count(*) FROM pg_stat_activity"
                              " WHERE application_name = %s", (application,))[0]
    return int(count)


async def test_the_options_of_the_dsn_reach_every_connection_and_close_ends_them(postgres):
    application = "trio_pgs_" + postgres.schema()
    dsn = f"{postgres.dsn}&options=-c%20application_name%3D{application}"
    store = PostgresStore(dsn, schema=postgres.schema(), pool_size=2)
    await store.open()
    try:
        await store.commit([Put(Record(kind="k", key="a", data=b"1"), 0)])
        await store.claim("k", "a")
        assert _backends(postgres, application) >= 2  # loads and claims, and writes
    finally:
        with trio.CancelScope() as scope:
            scope.cancel()
            await store.close()  # already cancelled: the pools close all the same
    for _ in range(100):
        if _backends(postgres, application) == 0:
            break
        await trio.sleep(0.05)
    assert _backends(postgres, application) == 0


async def test_a_key_too_long_for_the_index_fails_its_own_activation_only(postgres):
    store = postgres.store()
    async with PersistentSupervisor(store=store, servers=[TallyServer]) as sup:
        good = await sup.start(TallyServer, key="good")
        with pytest.raises(Exception, match="do not fit PostgreSQL's index of records"):
            await sup.start(TallyServer, key="🎲" * 1000)
        assert await good.call(("add", "x")) == 1


async def test_deleting_a_record_never_stored_at_a_version_is_a_conflict(postgres):
    from trio_pgs import ConflictError, Delete

    store = postgres.store()
    await store.open()
    try:
        (outcome,) = await store.commit_each([Delete("k", "never", 3)])
        assert isinstance(outcome, ConflictError)
        with pytest.raises(ConflictError):
            await store.commit([Delete("k", "never", 3)])
        assert await store.commit_each([Delete("k", "never")]) == [None]
    finally:
        await store.close()


@pytest.mark.parametrize("encoding", ["LATIN1", "SQL_ASCII"])
async def test_a_database_not_in_utf8_is_refused_at_open(postgres: Server, encoding: str):
    """Kinds and keys are text: a LATIN1 database stored "café😀" garbled, and a
    SQL_ASCII one made its write a false conflict. Such a database is refused when the
    store opens, with what to do, and nothing is created in it."""
    name = f"enc_{encoding.lower()}"
    with psycopg.connect(postgres.dsn, autocommit=True) as connection:
        connection.execute(f"DROP DATABASE IF EXISTS {name}")
        connection.execute(f"CREATE DATABASE {name} ENCODING '{encoding}' TEMPLATE template0"
                           " LC_COLLATE 'C' LC_CTYPE 'C'")
    dsn = psycopg.conninfo.make_conninfo(postgres.dsn, dbname=name)
    try:
        with pytest.raises(PersistenceError, match=f"encoding is {encoding}, not UTF8"):
            async with PersistentSupervisor(store=PostgresStore(dsn), servers=[TallyServer]):
                pass
        with psycopg.connect(dsn) as connection:
            assert connection.execute(
                "SELECT count(*) FROM pg_namespace WHERE nspname = 'trio_pgs'"
            ).fetchone() == (0,)
    finally:
        with psycopg.connect(postgres.dsn, autocommit=True) as connection:
            connection.execute(f"DROP DATABASE IF EXISTS {name}")


async def test_a_connection_with_another_client_encoding_is_refused_at_open(postgres: Server):
    dsn = psycopg.conninfo.make_conninfo(postgres.dsn, client_encoding="LATIN1")
    with pytest.raises(PersistenceError, match="client_encoding is LATIN1, not UTF8"):
        async with PersistentSupervisor(store=PostgresStore(dsn, schema=postgres.schema()),
                                        servers=[TallyServer]):
            pass
