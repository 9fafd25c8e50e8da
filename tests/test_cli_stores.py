"""What the ``trio-pgs`` command opens: store specs (a directory or a store URL), read-only
opening for the commands that only read, and database files that are not stores."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from trio_pgs._cli import main

from .cli_support import filled_store, records, rows
from .crafted_rows import immutable_directory

#: One invocation of each command, given the store spec first.
EVERY_COMMAND = [
    ["list"], ["stats"], ["export"], ["show", "tally", "alice"],
    ["release", "tally", "alice"], ["purge", "tally", "alice", "--yes"], ["import"],
]
READ_COMMANDS = [["list"], ["stats"], ["show", "tally", "alice"],
                 ["show", "tally", "alice", "--meta"], ["export"]]


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    return filled_store(tmp_path / "store")


def files(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


# -- store specs ------------------------------------------------------------------------


def test_a_diskcache_url_names_the_same_store_as_its_directory(
    store_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert main(["list", str(store_dir)]) == 0
    by_path = capsys.readouterr().out
    monkeypatch.chdir(store_dir.parent)
    assert store_dir.is_absolute()
    for spec in (f"diskcache://{store_dir}", f"diskcache:{store_dir}", "diskcache:store"):
        assert main(["list", spec]) == 0, spec
        assert capsys.readouterr().out == by_path, spec


def test_a_write_command_takes_a_diskcache_url(
    store_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["purge", f"diskcache://{store_dir}", "tally", "bob", "--yes"]) == 0
    assert "purged tally/bob" in capsys.readouterr().out
    assert ("tally", "bob") not in records(store_dir)


def _in_schema(dsn: str, schema: str) -> str:
    return f"{dsn}{'&' if '?' in dsn else '?'}schema={schema}"


def test_every_command_works_on_a_postgresql_url(
    store_dir: Path, postgres: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = _in_schema(postgres.dsn, postgres.schema())
    backup = tmp_path / "backup.jsonl"
    assert main(["export", str(store_dir), "--output", str(backup)]) == 0
    assert main(["import", url, str(backup)]) == 0
    capsys.readouterr()
    for argv in READ_COMMANDS:
        assert main([argv[0], str(store_dir), *argv[1:]]) == 0, argv
        from_directory = capsys.readouterr().out
        assert main([argv[0], url, *argv[1:]]) == 0, argv
        assert capsys.readouterr().out == from_directory, argv
    assert main(["purge", url, "tally", "bob", "--yes"]) == 0
    assert "purged tally/bob" in capsys.readouterr().out
    assert main(["show", url, "tally", "bob"]) == 1


@pytest.mark.parametrize("argv", EVERY_COMMAND[:-1], ids=lambda argv: argv[0])
def test_a_postgresql_schema_without_a_store_is_refused_and_left_without_one(
    argv: list[str], postgres: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    import psycopg

    schema = postgres.schema()
    assert main([argv[0], _in_schema(postgres.dsn, schema), *argv[1:]]) == 2
    assert "there is no trio-pgs store in schema" in capsys.readouterr().err
    with psycopg.connect(postgres.dsn) as connection:
        found = connection.execute(
            "SELECT count(*) FROM pg_namespace WHERE nspname = %s", (schema,)
        ).fetchone()
    assert found == (0,)


@pytest.mark.parametrize("key", ["nul\x00key", "\U0001f600" * 700], ids=["nul", "index-size"])
def test_an_import_postgresql_cannot_hold_is_refused_before_the_schema_is_made(
    store_dir: Path, postgres: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    key: str,
) -> None:
    """A record whose kind and key PostgreSQL cannot hold (a NUL; over the index's
    size together) is refused with exit status 2, which says nothing was changed:
    the new schema is not made either (it was, empty, when the refusal came from
    the first write)."""
    import json

    import psycopg

    backup = tmp_path / "backup.jsonl"
    assert main(["export", str(store_dir), "--output", str(backup)]) == 0
    lines = backup.read_text().splitlines()
    bad = json.loads(lines[0])
    bad["key"] = key
    backup.write_text("\n".join([*lines[1:], json.dumps(bad)]) + "\n")
    schema = postgres.schema()
    capsys.readouterr()
    assert main(["import", _in_schema(postgres.dsn, schema), str(backup)]) == 2
    err = capsys.readouterr().err
    assert f"{backup}: " in err and "PostgreSQL" in err and "nothing was imported" in err, err
    with psycopg.connect(postgres.dsn) as connection:
        found = connection.execute(
            "SELECT count(*) FROM pg_namespace WHERE nspname = %s", (schema,)
        ).fetchone()
    assert found == (0,)

def test_an_unreachable_postgresql_server_is_refused_without_showing_the_password(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["list", "postgresql://app:s3cret@127.0.0.1:1/games?connect_timeout=2"]) == 2
    err = capsys.readouterr().err
    assert "could not be opened" in err and "s3cret" not in err


@pytest.mark.parametrize("spec", ["redis://cache/0", "sqlite:store.db"])
def test_an_unknown_store_scheme_is_refused_and_names_the_known_ones(
    spec: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["import", spec]) == 2
    err = capsys.readouterr().err
    scheme = spec.partition(":")[0]
    assert f"unknown store scheme {scheme!r}" in err
    assert "diskcache:" in err and "./" in err  # the known schemes, and the way to a path
    assert list(tmp_path.iterdir()) == []  # nothing created


def test_a_diskcache_url_naming_a_host_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list", "diskcache://fileserver/srv/store"]) == 2
    assert "names a host" in capsys.readouterr().err


def test_a_directory_whose_name_has_a_colon_is_reached_as_a_relative_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    filled_store(tmp_path / "games:2026")
    monkeypatch.chdir(tmp_path)
    assert main(["list", "./games:2026"]) == 0
    assert len(rows(capsys.readouterr().out)) == 4


# -- read-only ---------------------------------------------------------------------------


def test_the_read_commands_never_write_to_the_store(
    store_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = files(store_dir)
    for argv in READ_COMMANDS:
        assert main([argv[0], str(store_dir), *argv[1:]]) == 0, argv
    assert main(["export", str(store_dir), "--output", str(tmp_path / "backup.jsonl")]) == 0
    after = files(store_dir)
    assert {name: after[name] for name in before} == before


def test_the_read_commands_work_on_a_read_only_store(
    store_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with immutable_directory(store_dir):  # read-only for root too
        for argv in READ_COMMANDS:
            assert main([argv[0], str(store_dir), *argv[1:]]) == 0, argv


# -- database files that are not stores ----------------------------------------------------


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "its database file is empty"),
        (b"just some text, not a database\n" * 200, "its database file is not an SQLite database"),
    ],
    ids=["empty", "not-sqlite"],
)
@pytest.mark.parametrize("argv", EVERY_COMMAND, ids=lambda argv: argv[0])
def test_an_empty_or_foreign_database_file_is_reported_as_such_and_left_alone(
    content: bytes, reason: str, argv: list[str], tmp_path: Path,
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    store = tmp_path / "store"
    store.mkdir()
    (store / "cache.db").write_bytes(content)
    backup = tmp_path / "backup.jsonl"
    backup.write_text('{"kind": "tally", "key": "a", "data": {}}\n')
    extra = [str(backup)] if argv[0] == "import" else []
    assert main([argv[0], str(store), *argv[1:], *extra]) == 2
    err = capsys.readouterr().err
    assert f"{store} is not a valid trio-pgs store: {reason}" in err
    assert "writable directory" not in err
    assert files(store) == {"cache.db": content}


def test_a_damaged_database_file_is_reported_as_such(
    store_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    database = store_dir / "cache.db"
    header = database.read_bytes()[:100]
    database.write_bytes(header[:16] + b"\xff" * (len(header) - 16) + b"\x00" * 4096)
    assert main(["list", str(store_dir)]) == 2
    err = capsys.readouterr().err
    assert f"{store_dir} is not a valid trio-pgs store: its database file is damaged" in err
    assert "writable directory" not in err
