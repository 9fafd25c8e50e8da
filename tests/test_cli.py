"""The trio-pgs command, run in-process on stores filled by a real supervisor."""

from __future__ import annotations

import contextlib
import io
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import diskcache
import pytest
import trio

from trio_pgs import (
    DiskCacheStore,
    PersistentSupervisor,
    Record,
    ServerNotFound,
    ServerQuarantined,
)
from trio_pgs._cli import main
from trio_pgs._diskcache_rows import SEPARATOR
from trio_pgs._store import next_version

from .cli_support import FragileServer, call, filled_store, put, records, rows
from .servers import TallyServer


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    return filled_store(tmp_path / "store")


# -- the command ------------------------------------------------------------------------


def test_python_m_trio_pgs_prints_the_help() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "trio_pgs", "--help"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0
    assert done.stdout.startswith("usage: trio-pgs")
    for command in ("list", "show", "stats", "release", "purge", "export", "import"):
        assert command in done.stdout


def test_a_usage_error_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["frobnicate"]) == 2
    assert "invalid choice" in capsys.readouterr().err


# -- list, show, stats ------------------------------------------------------------------


def test_list_prints_one_tab_separated_row_per_server_when_piped(
    store_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["list", str(store_dir)]) == 0
    header, *table = rows(capsys.readouterr().out)
    assert header == ["KIND", "KEY", "STATUS", "VERSION", "STATE_VERSION", "UPDATED", "SIZE"]
    assert [row[:5] for row in table] == [
        ["fragile", "bad", "quarantined", "3", "1"],
        ["tally", "alice", "ok", "2", "1"],
        ["tally", "bob", "ok", "1", "1"],
    ]
    assert table[1][6] == str(len(b'{"items":["apple","pear"]}'))
    assert table[1][5].endswith("Z") and "T" in table[1][5]


def test_list_aligns_columns_on_a_terminal(
    store_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert main(["list", str(store_dir)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "\t" not in "".join(lines)
    assert lines[0].split() == ["KIND", "KEY", "STATUS", "VERSION", "STATE_VERSION",
                                "UPDATED", "SIZE"]
    status = lines[0].index("STATUS")
    assert [line[status:].split()[0] for line in lines] == ["STATUS", "quarantined", "ok", "ok"]


def test_list_kind_shows_only_that_kind(
    store_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["list", str(store_dir), "--kind", "fragile"]) == 0
    assert [row[:2] for row in rows(capsys.readouterr().out)[1:]] == [["fragile", "bad"]]


def test_show_prints_the_state_as_json_and_the_metadata_on_stderr(
    store_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["show", str(store_dir), "tally", "alice"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out) == {"items": ["apple", "pear"]}
    assert out.startswith("{\n  ")  # indented
    assert "version:       2" in err and "status:        ok" in err


def test_show_meta_prints_the_whole_record_on_stdout(
    store_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["show", str(store_dir), "fragile", "bad", "--meta"]) == 0
    out, err = capsys.readouterr()
    shown = json.loads(out)
    assert shown["data"] == {"items": ["one"]}
    assert shown["quarantined"] is True and len(shown["crashes"]) == 1
    assert shown["version"] == 3 and shown["history"] == ["eyJpdGVtcyI6W119"]  # {"items":[]}
    assert err == ""


def test_show_of_a_missing_key_exits_1(
    store_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["show", str(store_dir), "tally", "nobody"]) == 1
    assert "tally/nobody: no such record" in capsys.readouterr().err


def test_stats_counts_records_quarantined_and_bytes_per_kind(
    store_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stored = records(store_dir)
    assert main(["stats", str(store_dir)]) == 0
    table = rows(capsys.readouterr().out)
    size = sum(len(r.data) + sum(map(len, r.history)) for r in stored.values())
    assert table[0] == ["KIND", "RECORDS", "QUARANTINED", "BYTES"]
    assert table[1][:3] == ["fragile", "1", "1"]
    assert table[2][:3] == ["tally", "2", "0"]
    assert table[3] == ["(total)", "3", "1", str(size)]


# -- release and purge ------------------------------------------------------------------


def test_release_lifts_the_quarantine_and_the_server_answers_again(
    store_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["release", str(store_dir), "fragile", "bad"]) == 0
    assert "released fragile/bad (now at version 4)" in capsys.readouterr().out
    record = records(store_dir)["fragile", "bad"]
    assert (record.quarantined, record.crashes, record.version) == (False, (), 4)
    assert call(store_dir, "bad", "get", FragileServer) == ["one"]


def test_release_of_a_server_not_quarantined_changes_nothing(
    store_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = records(store_dir)
    assert main(["release", str(store_dir), "tally", "alice"]) == 0
    assert "not quarantined; nothing changed" in capsys.readouterr().err
    assert records(store_dir) == before


def test_release_of_a_missing_key_exits_1(store_dir: Path) -> None:
    assert main(["release", str(store_dir), "fragile", "nobody"]) == 1


def test_purge_yes_deletes_the_record(
    store_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["purge", str(store_dir), "tally", "alice", "--yes"]) == 0
    assert "purged tally/alice" in capsys.readouterr().out
    assert ("tally", "alice") not in records(store_dir)
    with pytest.raises(ServerNotFound):
        call(store_dir, "alice", "get")


def test_purge_asks_first_and_keeps_the_record_unless_confirmed(
    store_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("n\n"))
    assert main(["purge", str(store_dir), "tally", "alice"]) == 1
    assert "Delete tally/alice (ok, version 2" in capsys.readouterr().err
    assert ("tally", "alice") in records(store_dir)
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n"))
    assert main(["purge", str(store_dir), "tally", "alice"]) == 0
    assert ("tally", "alice") not in records(store_dir)


def test_purge_of_a_record_changed_after_the_question_is_a_conflict(
    store_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    class AnotherWriterMeanwhile(io.StringIO):
        def readline(self, *args: Any) -> str:
            current = records(store_dir)["tally", "alice"]
            put(store_dir, next_version(current, data=b'{"items":[]}'), current.version)
            return "y\n"

    monkeypatch.setattr(sys, "stdin", AnotherWriterMeanwhile())
    assert main(["purge", str(store_dir), "tally", "alice"]) == 1
    assert "expected stored version 2, found 3" in capsys.readouterr().err
    assert records(store_dir)["tally", "alice"].version == 3


# -- export and import ------------------------------------------------------------------


def test_export_then_import_into_a_new_directory_restores_every_record(
    store_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    odd = Record(
        kind="raw", key="bytes", data=b"\xff not json", version=7, state_version=2, epoch=1,
        updated_at=12.5, crashes=(1.0, 2.5), quarantined=True, history=(b"\x00",),
    )
    put(store_dir, odd, 0)
    exported = tmp_path / "backup.jsonl"
    assert main(["export", str(store_dir), "--output", str(exported)]) == 0
    lines = [json.loads(line) for line in exported.read_text().splitlines()]
    assert [line["kind"] for line in lines] == ["fragile", "raw", "tally", "tally"]
    assert lines[1]["data_base64"] == "/yBub3QganNvbg==" and "data" not in lines[1]
    copy = tmp_path / "copy"
    assert main(["import", str(copy), str(exported)]) == 0
    assert "imported 4 record(s)" in capsys.readouterr().out
    assert records(copy) == records(store_dir)
    assert call(copy, "alice", "get") == ["apple", "pear"]


def test_export_writes_json_lines_to_stdout(
    store_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["export", str(store_dir)]) == 0
    out, err = capsys.readouterr()
    exported = [json.loads(line) for line in out.splitlines()]
    assert [(r["kind"], r["key"]) for r in exported] == [
        ("fragile", "bad"), ("tally", "alice"), ("tally", "bob")
    ]
    assert exported[1]["data"] == {"items": ["apple", "pear"]}
    assert "exported 3 record(s)" in err


def test_import_reads_stdin(
    store_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert main(["export", str(store_dir)]) == 0
    monkeypatch.setattr(sys, "stdin", io.StringIO(capsys.readouterr().out))
    assert main(["import", str(tmp_path / "copy")]) == 0
    assert records(tmp_path / "copy") == records(store_dir)


def test_import_refuses_existing_keys_without_replace_and_writes_nothing(
    store_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    exported = tmp_path / "backup.jsonl"
    assert main(["export", str(store_dir), "-o", str(exported)]) == 0
    assert main(["purge", str(store_dir), "tally", "bob", "--yes"]) == 0
    before = records(store_dir)
    capsys.readouterr()
    assert main(["import", str(store_dir), str(exported)]) == 1
    err = capsys.readouterr().err
    assert "2 record(s) already in" in err and "--replace" in err
    assert records(store_dir) == before  # bob was not imported either


def test_import_after_a_purge_restores_the_record_above_the_purged_version(
    store_dir: Path, tmp_path: Path
) -> None:
    backup = tmp_path / "backup.jsonl"
    assert main(["export", str(store_dir), "-o", str(backup)]) == 0
    assert main(["purge", str(store_dir), "tally", "alice", "--yes"]) == 0
    assert main(["import", str(store_dir), str(backup), "--replace"]) == 0
    alice = records(store_dir)["tally", "alice"]
    assert alice.data == b'{"items":["apple","pear"]}'
    assert alice.version == 3  # versions never repeat: the purged record was at 2
    assert call(store_dir, "alice", ("add", "plum")) == 3  # items: the server goes on
    assert records(store_dir)["tally", "alice"].version == 4


def test_import_replace_overwrites_above_the_stored_version(
    store_dir: Path, tmp_path: Path
) -> None:
    exported = tmp_path / "backup.jsonl"
    assert main(["export", str(store_dir), "-o", str(exported)]) == 0
    assert call(store_dir, "alice", ("add", "plum")) == 3  # now at version 3
    assert main(["import", str(store_dir), str(exported), "--replace"]) == 0
    alice = records(store_dir)["tally", "alice"]
    assert alice.data == b'{"items":["apple","pear"]}'
    assert alice.version == 4  # a running server holding version 3 cannot overwrite it


def test_import_of_a_malformed_line_exits_2_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    exported = tmp_path / "bad.jsonl"
    exported.write_text(
        '{"kind": "tally", "key": "a", "data": {"items": []}}\n'
        '{"kind": "tally", "key": "b", "data": {}, "version": 0}\n'
    )
    assert main(["import", str(tmp_path / "copy"), str(exported)]) == 2
    assert "line 2: version must be an int from 1 to 9223372032559808512, not 0" in (
        capsys.readouterr().err
    )
    assert not (tmp_path / "copy").exists()


# -- directories that are not stores ----------------------------------------------------


def test_a_diskcache_directory_that_is_not_a_store_is_refused_without_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = diskcache.Cache(tmp_path / "other")
    cache["unrelated"] = b"data"
    cache.close()
    assert main(["list", str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err
    assert "not a trio-pgs store" in err and "Traceback" not in err


def test_a_missing_directory_is_refused_and_not_created(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for argv in (["list"], ["stats"], ["export"], ["show", "tally", "a"],
                 ["release", "tally", "a"], ["purge", "tally", "a", "--yes"]):
        assert main([argv[0], str(tmp_path / "missing"), *argv[1:]]) == 2, argv
        assert "missing: no such directory" in capsys.readouterr().err
    assert not (tmp_path / "missing").exists()


def test_an_empty_directory_is_not_a_store_and_stays_empty(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["list", str(tmp_path)]) == 2
    assert "is not a trio-pgs store" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


async def test_while_an_application_holds_the_store_reads_work_and_writes_are_refused(
    store_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    backup = tmp_path / "backup.jsonl"
    export = ["export", str(store_dir), "-o", str(backup)]
    assert await trio.to_thread.run_sync(main, export) == 0
    async with PersistentSupervisor(
        store=DiskCacheStore(store_dir), servers=[TallyServer, FragileServer]
    ) as sup:
        assert await sup.ref(TallyServer, "alice").call("get") == ["apple", "pear"]
        before = await trio.to_thread.run_sync(records, store_dir)
        capsys.readouterr()
        for argv in (["list"], ["stats"], ["show", "tally", "alice"], ["export"]):
            assert await trio.to_thread.run_sync(main, [argv[0], str(store_dir), *argv[1:]]) == 0
        assert "alice" in capsys.readouterr().out
        for argv in (["release", "fragile", "bad"], ["purge", "tally", "alice", "--yes"],
                     ["import", str(backup), "--replace"]):
            assert await trio.to_thread.run_sync(main, [argv[0], str(store_dir), *argv[1:]]) == 2
            assert f"pid {os.getpid()}" in capsys.readouterr().err  # who holds it
        monkeypatch.setattr(sys, "stdin", io.StringIO("y\n"))
        purge = ["purge", str(store_dir), "tally", "alice"]
        assert await trio.to_thread.run_sync(main, purge) == 2
        assert "Delete" not in capsys.readouterr().err  # refused before the question
        assert await trio.to_thread.run_sync(records, store_dir) == before
        with pytest.raises(ServerQuarantined):
            await sup.ref(FragileServer, "bad").call("get")


def test_release_takes_effect_when_the_application_starts_again(store_dir: Path) -> None:
    assert main(["release", str(store_dir), "fragile", "bad"]) == 0
    assert call(store_dir, "bad", "get", FragileServer) == ["one"]


def test_an_unreadable_row_is_reported_and_makes_an_export_incomplete(
    store_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = diskcache.Cache(store_dir)
    cache.set("tally" + SEPARATOR + "junk", b"not a record")
    cache.close()
    assert main(["list", str(store_dir)]) == 0
    out, err = capsys.readouterr()
    assert "junk" not in out and "tally/junk: the stored row is not a valid" in err
    assert main(["show", str(store_dir), "tally", "junk"]) == 1
    assert "inspect or purge it" in capsys.readouterr().err
    exported = tmp_path / "backup.jsonl"
    assert main(["export", str(store_dir), "-o", str(exported)]) == 1
    assert "the export is incomplete: 1 unreadable row(s)" in capsys.readouterr().err
    assert main(["purge", str(store_dir), "tally", "junk", "--yes"]) == 0
    assert "purged the unreadable row tally/junk" in capsys.readouterr().out
    assert main(["export", str(store_dir), "-o", str(exported)]) == 0
    assert len(exported.read_text().splitlines()) == 3


@pytest.mark.parametrize(
    ("kind", "key"),
    [("", "tombstone" + SEPARATOR + "tally" + SEPARATOR + "alice"), ("", "trio-pgs-format"),
     ("tal\x1fly", "alice"), ("tally", "")],
    ids=["a-tombstone", "the-format-marker", "separator-in-kind", "empty-key"],
)
def test_purge_names_only_a_servers_record_never_a_row_of_the_store_itself(
    kind: str, key: str, store_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An empty or unprintable KIND could spell the key of a tombstone or of the format
    marker: purging it restarted a key's versions, or left the store unopenable."""
    assert main(["purge", str(store_dir), "tally", "bob", "--yes"]) == 0  # a tombstone
    before = _all_rows(store_dir)
    assert main(["purge", str(store_dir), kind, key, "--yes"]) == 2
    assert "error: argument" in capsys.readouterr().err
    assert _all_rows(store_dir) == before


def _all_rows(store_dir: Path) -> list[tuple[Any, ...]]:
    with contextlib.closing(sqlite3.connect(store_dir / "cache.db")) as db:
        return db.execute("SELECT key, value FROM Cache ORDER BY key").fetchall()
