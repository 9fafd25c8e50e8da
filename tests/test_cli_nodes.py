"""``trio-pgs nodes``: the members of every supervisor name open on a PostgreSQL store,
read from the store's membership table, read-only."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

import trio_pgs
from trio_pgs import PersistentSupervisor, PostgresStore
from trio_pgs._cli import _commands, main

from .cli_support import filled_store, rows
from .servers import TallyServer

HEADER = ["SUPERVISOR", "NODE", "INCARNATION", "ADDRESS", "HOST", "PID", "LEASE", "LEAVING",
          "ACTIVE"]
SECRET = b"a secret of 16 bytes or more"


def _url(postgres: Any, schema: str) -> str:
    return f"{postgres.dsn}{'&' if '?' in postgres.dsn else '?'}schema={schema}"


@pytest.fixture
def schema(postgres: Any) -> str:
    """A schema holding an empty store."""
    name: str = postgres.schema()

    async def create() -> None:
        store = PostgresStore(postgres.dsn, schema=name)
        await store.open()
        await store.close()

    trio.run(create)
    return name


def _join(postgres: Any, schema: str, *members: dict[str, Any]) -> None:
    """Add *members* to the store's membership table, as supervisors joining do."""

    async def join() -> None:
        store = PostgresStore(postgres.dsn, schema=schema)
        await store.open()
        try:
            for member in members:
                options = {"address": "", "clustered": False, "lease": 60.0,
                           "host": "db-host", "pid": 4242, **member}
                await store.join(options.pop("supervisor"), options.pop("node"), **options)
        finally:
            await store.close()

    trio.run(join)


def test_nodes_lists_the_nodes_of_a_cluster_and_a_supervisor_without_one(
    postgres: Any, schema: str
) -> None:
    async def run() -> str:
        url = _url(postgres, schema)
        cluster = trio_pgs.Cluster(secret=SECRET, lease=3)
        async with (
            PersistentSupervisor(store=PostgresStore(postgres.dsn, schema=schema), name="bank",
                                 servers=[TallyServer], cluster=cluster) as bank,
            PersistentSupervisor(store=PostgresStore(postgres.dsn, schema=schema), name="shop",
                                 servers=[TallyServer]),
        ):
            for key in ("a", "b"):
                await bank.start(TallyServer, key=key)
            await trio.sleep(1.5)  # a renewal reports the active servers
            done = await trio.run_process(
                [sys.executable, "-m", "trio_pgs", "nodes", url], capture_stdout=True
            )
        return done.stdout.decode()

    header, bank, shop = rows(trio.run(run))
    assert header == HEADER
    assert bank[0] == "bank" and shop[0] == "shop"
    assert bank[3].startswith("127.0.0.1:") and int(bank[3].split(":")[1]) > 0
    assert shop[3] == "(no cluster)"
    for row, lease in ((bank, 3), (shop, 10)):  # a supervisor without a cluster: 10 s
        assert row[4] == socket.gethostname()
        assert row[5] == str(os.getpid())
        assert 0 < float(row[6]) <= lease
        assert row[7] == "no"
    assert bank[8] == "2" and shop[8] == "0"
    assert bank[2] == shop[2] == "1"  # the first join of each name


def test_nodes_shows_a_lease_that_ran_out_as_expired(
    postgres: Any, schema: str, capsys: pytest.CaptureFixture[str]
) -> None:
    _join(postgres, schema, {"supervisor": "bank", "node": "dead", "clustered": True,
                             "address": "10.0.0.7:7000", "lease": 0.1})
    trio.run(trio.sleep, 0.3)
    assert main(["nodes", _url(postgres, schema)]) == 0
    _, dead = rows(capsys.readouterr().out)
    assert dead == ["bank", "dead", "1", "10.0.0.7:7000", "db-host", "4242", "expired", "no",
                    "0"]


def test_nodes_of_one_supervisor_name(
    postgres: Any, schema: str, capsys: pytest.CaptureFixture[str]
) -> None:
    _join(postgres, schema, {"supervisor": "bank", "node": "n1"},
          {"supervisor": "shop", "node": "n2"})
    assert main(["nodes", _url(postgres, schema), "--supervisor", "shop"]) == 0
    _, only = rows(capsys.readouterr().out)
    assert only[:2] == ["shop", "n2"]

    assert main(["nodes", _url(postgres, schema), "--supervisor", "games"]) == 0
    out, err = capsys.readouterr()
    assert rows(out) == [HEADER]
    assert "supervisor 'games' has no node open on" in err


def test_nodes_on_a_store_with_no_supervisor_open_prints_the_header_only(
    postgres: Any, schema: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["nodes", _url(postgres, schema)]) == 0
    out, err = capsys.readouterr()
    assert rows(out) == [HEADER]
    assert "no supervisor is open on" in err


def test_nodes_escapes_the_stored_strings(
    postgres: Any, schema: str, capsys: pytest.CaptureFixture[str]
) -> None:
    _join(postgres, schema, {"supervisor": "bank\x1b[2J", "node": "n\u202e1",
                             "host": "evil\nhost", "clustered": True,
                             "address": "h\t:1"})
    assert main(["nodes", _url(postgres, schema)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2  # the row is one line, its cells one cell each
    assert lines[1].split("\t")[:5] == [
        "bank\\x1b[2J", "n\\u202e1", "1", "h\\t:1", "evil\\nhost"
    ]


def test_nodes_opens_the_store_read_only(
    postgres: Any, schema: str, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    opened: list[Any] = []

    def recorded(spec: str, **options: Any) -> Any:
        store = store_from_spec(spec, **options)
        opened.append(store)
        return store

    store_from_spec = _commands.store_from_spec
    monkeypatch.setattr(_commands, "store_from_spec", recorded)
    assert main(["nodes", _url(postgres, schema)]) == 0
    [store] = opened
    assert isinstance(store, PostgresStore) and store.read_only


def test_nodes_refuses_a_schema_without_a_store_and_creates_none(
    postgres: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    import psycopg

    name = postgres.schema()
    assert main(["nodes", _url(postgres, name)]) == 2
    assert "trio-pgs:" in capsys.readouterr().err
    with psycopg.connect(postgres.dsn) as connection:
        found = connection.execute(
            "SELECT 1 FROM information_schema.schemata WHERE schema_name = %s", (name,)
        ).fetchone()
    assert found is None


def test_a_diskcache_store_has_no_nodes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = filled_store(tmp_path / "store")
    assert main(["nodes", str(store)]) == 0
    out, err = capsys.readouterr()
    assert out == ""
    assert "has no nodes" in err and "DiskCacheStore" in err


def test_a_directory_that_is_no_store_is_refused_by_nodes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["nodes", str(tmp_path)]) == 2
    assert "is not a trio-pgs store" in capsys.readouterr().err


def test_the_help_lists_nodes() -> None:
    done = subprocess.run([sys.executable, "-m", "trio_pgs", "--help"], capture_output=True,
                          text=True, check=True)
    assert "nodes" in done.stdout
