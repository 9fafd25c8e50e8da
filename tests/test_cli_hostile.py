"""What a hostile review of the ``trio-pgs`` command found: a password printed, tracebacks
instead of one line, an interrupted import's count, an export that replaced what was
not its file. Each test failed on the code before its fix."""

from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

import trio_pgs
from trio_pgs._cli import _commands as commands
from trio_pgs._cli import main

from .cli_support import filled_store

SECRET = "S3cretPW"


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    return filled_store(tmp_path / "store")


def with_password(dsn: str, schema: str) -> str:
    """The test server's URL with a password (which its trust authentication ignores)."""
    assert dsn.startswith("postgresql://postgres:@"), dsn
    url = dsn.replace("postgresql://postgres:@", f"postgresql://postgres:{SECRET}@", 1)
    return f"{url}{'&' if '?' in url else '?'}schema={schema}"


def one_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line]
    assert len(lines) == 1, err
    return lines[0]



def empty_store(postgres: Any, capsys: pytest.CaptureFixture[str]) -> str:
    """The URL, password included, of a new empty store in a fresh schema."""
    url = with_password(postgres.dsn, postgres.schema())
    assert main(["import", url, os.devnull, "--allow-empty"]) == 0
    capsys.readouterr()
    return url

def test_show_of_a_missing_record_hides_the_password(
    postgres: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    url = empty_store(postgres, capsys)
    assert main(["show", url, "player", "nosuch"]) == 1
    line = one_line(capsys.readouterr().err)
    assert "no such record" in line and SECRET not in line and "***" in line


@pytest.mark.parametrize("argv", [
    [f"postgresql://u:{SECRET}@h/db", "list"],  # the command forgotten: argparse quotes it
    ["list", f"diskcache://u:{SECRET}@h/db"],
    ["list", f"host=/nonexistent password={SECRET} dbname=d"],
])
def test_no_message_quotes_a_password_given_in_an_argument(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert SECRET not in err and "Traceback" not in err, err


@pytest.mark.parametrize("argv", [
    ["list", "STORE", "--kind", ""],
    ["list", "STORE", "--kind", "a\x1fb"],
    ["show", "STORE", "tally", "\udcff"],
    ["purge", "STORE", "tally\udcff", "alice", "--yes"],
])
def test_a_kind_or_key_no_store_holds_is_bad_usage_in_one_line(
    argv: list[str], store_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([str(store_dir) if arg == "STORE" else arg for arg in argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "error:" in err, err


def test_a_key_postgresql_cannot_index_is_bad_usage_in_one_line(
    postgres: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    url = empty_store(postgres, capsys)
    assert main(["show", url, "tally", "\U0001f3b2" * 700]) == 2
    assert "do not fit" in one_line(capsys.readouterr().err)


def test_an_import_postgresql_cannot_hold_is_refused_before_writing(
    postgres: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    schema = postgres.schema()
    url = with_password(postgres.dsn, schema)
    export = tmp_path / "nul.jsonl"
    export.write_text(
        json.dumps({"kind": "tally", "key": "fine", "data": {"items": []}}) + "\n"
        + json.dumps({"kind": "tally", "key": "z\x00", "data": {"items": []}}) + "\n"
    )
    assert main(["import", url, str(export)]) == 2
    assert "NUL" in one_line(capsys.readouterr().err)
    assert main(["list", url]) == 2  # nothing was imported, nor the store made
    assert "there is no trio-pgs store in schema" in capsys.readouterr().err


def test_a_failing_output_is_one_line_and_status_1(
    store_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    class Full(io.StringIO):
        def write(self, text: str) -> int:
            raise OSError(28, "No space left on device")

        def isatty(self) -> bool:
            return False

    monkeypatch.setattr(sys, "stdout", Full())
    assert main(["export", str(store_dir)]) == 1
    assert "No space left on device" in one_line(capsys.readouterr().err)


def test_a_closed_standard_output_is_said_in_one_line(
    store_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "stdout", None)
    assert main(["list", str(store_dir)]) == 2
    assert "standard output is closed" in one_line(capsys.readouterr().err)


def test_an_import_from_stdin_that_is_not_utf8_is_refused_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    stdin = io.TextIOWrapper(io.BytesIO(b'{"kind": "tally", "key": "\xff"}\n'),
                             encoding="utf-8", errors="strict")
    monkeypatch.setattr(sys, "stdin", stdin)
    assert main(["import", str(tmp_path / "new")]) == 2
    assert "cannot read <stdin>" in one_line(capsys.readouterr().err)
    assert not (tmp_path / "new").exists()


def test_an_interrupted_import_says_the_batch_under_way_may_be_written(
    tmp_path: Path, store_dir: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Ctrl-C while a batch commits: it may land whole (the store commits it anyway),
    so the count said is of the batches known written, plus that one as a maybe."""
    export = tmp_path / "all.jsonl"
    assert main(["export", str(store_dir), "-o", str(export)]) == 0
    monkeypatch.setattr(commands, "IMPORT_BATCH", 1)
    commit = trio_pgs.DiskCacheStore.commit
    calls = 0

    async def interrupted_commit(self: Any, operations: Any) -> None:
        nonlocal calls
        calls += 1
        await commit(self, operations)
        if calls == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(trio_pgs.DiskCacheStore, "commit", interrupted_commit)
    capsys.readouterr()
    assert main(["import", str(tmp_path / "copy"), str(export)]) == 130
    assert "1 of 3 record(s) were imported before that, and the 1 of the batch" in (
        capsys.readouterr().err
    )


@pytest.mark.parametrize("what", ["symlink", "fifo", "directory"])
def test_export_never_replaces_what_is_not_a_regular_file(
    what: str, store_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "out.jsonl"
    real = tmp_path / "real.jsonl"
    real.write_text("old\n")
    if what == "symlink":
        target.symlink_to(real)
    elif what == "fifo":
        os.mkfifo(target)
    else:
        target.mkdir()
    assert main(["export", str(store_dir), "-o", str(target)]) == 2
    assert "not a regular file" in one_line(capsys.readouterr().err)
    assert real.read_text() == "old\n"
    assert target.is_symlink() if what == "symlink" else (
        target.is_fifo() if what == "fifo" else target.is_dir())


def test_export_leaves_a_file_named_like_its_part_file_alone(
    store_dir: Path, tmp_path: Path
) -> None:
    notes = tmp_path / "backup.jsonl.part"
    notes.write_text("mine\n")
    assert main(["export", str(store_dir), "-o", str(tmp_path / "backup.jsonl")]) == 0
    assert notes.read_text() == "mine\n"
    assert (tmp_path / "backup.jsonl").read_text().count("\n") == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "backup.jsonl", "backup.jsonl.part", "store"]
