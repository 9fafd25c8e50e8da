"""Every exit status of the ``trio-pgs`` command, case by case as docs/cli.md lists them."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import diskcache
import pytest
import trio

from trio_pgs import DiskCacheStore, PersistentSupervisor, Record
from trio_pgs._cli import main
from trio_pgs._diskcache_rows import FORMAT_KEY, SEPARATOR
from trio_pgs._store import next_version

from .cli_support import filled_store, put, records
from .servers import TallyServer

DOCS = Path(__file__).parent.parent / "docs" / "cli.md"

#: How a case sets itself up: given the store's directory (filled) and a scratch
#: directory, return the arguments of the command.
Setup = Callable[[Path, Path, pytest.MonkeyPatch], list[str]]


def _answer(text: str, argv: list[str]) -> Setup:
    def setup(store: Path, scratch: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
        monkeypatch.setattr(sys, "stdin", io.StringIO(text))
        return [arg.format(store=store, scratch=scratch) for arg in argv]

    return setup


def _args(*argv: str) -> Setup:
    return _answer("", list(argv))


def _export_to(scratch: Path, *lines: str) -> Path:
    backup = scratch / "backup.jsonl"
    backup.write_text("".join(line + "\n" for line in lines))
    return backup


def _existing_keys(store: Path, scratch: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    backup = _export_to(scratch, '{"kind": "tally", "key": "alice", "data": {}}')
    return ["import", str(store), str(backup)]


def _empty_import(store: Path, scratch: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    return ["import", str(scratch / "new"), str(_export_to(scratch))]


def _bad_line(store: Path, scratch: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    return ["import", str(scratch / "new"), str(_export_to(scratch, '{"kind": 1}'))]


def _unreadable_row(store: Path, scratch: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    cache = diskcache.Cache(store)
    cache.set("tally" + SEPARATOR + "junk", b"not a record")
    cache.close()
    return ["export", str(store), "-o", str(scratch / "backup.jsonl")]


def _newer_format(store: Path, scratch: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    cache = diskcache.Cache(store)
    cache.set(FORMAT_KEY, "2")
    cache.close()
    return ["list", str(store)]


def _conflict(store: Path, scratch: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    class AnotherWriterMeanwhile(io.StringIO):
        def readline(self, *args: object) -> str:
            put(store, next_version(records(store)["tally", "alice"], data=b"{}"), 2)
            return "y\n"

    monkeypatch.setattr(sys, "stdin", AnotherWriterMeanwhile())
    return ["purge", str(store), "tally", "alice"]


def _nan_time(store: Path, scratch: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    put(store, Record(kind="tally", key="nan", data=b"{}", updated_at=float("nan")), 0)
    return ["show", str(store), "tally", "nan", "--meta"]


def _interrupted(store: Path, scratch: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    class CtrlC(io.StringIO):
        def readline(self, *args: object) -> str:
            raise KeyboardInterrupt

    monkeypatch.setattr(sys, "stdin", CtrlC())
    return ["purge", str(store), "tally", "alice"]


CASES: dict[str, tuple[Setup, int]] = {
    "success": (_args("list", "{store}"), 0),
    "release-of-a-server-not-quarantined": (_args("release", "{store}", "tally", "alice"), 0),
    "no-such-record": (_args("show", "{store}", "tally", "nobody"), 1),
    "purge-not-confirmed": (_answer("n\n", ["purge", "{store}", "tally", "alice"]), 1),
    "import-of-existing-keys": (_existing_keys, 1),
    "empty-import": (_empty_import, 1),
    "conflict-with-another-writer": (_conflict, 1),
    "incomplete-export": (_unreadable_row, 1),
    "show-meta-of-a-time-json-cannot-hold": (_nan_time, 1),
    "export-file-not-writable": (_args("export", "{store}", "-o", "{scratch}/no/such/dir"), 1),
    "bad-usage": (_args("list"), 2),
    "unknown-command": (_args("frobnicate"), 2),
    "missing-directory": (_args("list", "{scratch}/missing"), 2),
    "not-a-directory": (_args("list", "{store}/cache.db"), 2),
    "not-a-store": (_args("list", "{scratch}"), 2),
    "newer-format": (_newer_format, 2),
    "unknown-store-scheme": (_args("list", "redis://localhost"), 2),
    "store-unreachable": (_args("list", "postgresql://127.0.0.1:1/games"), 2),
    "import-file-unreadable": (_args("import", "{scratch}/new", "{scratch}/missing.jsonl"), 2),
    "import-line-malformed": (_bad_line, 2),
    "interrupted": (_interrupted, 130),
}


@pytest.mark.parametrize(("setup", "status"), CASES.values(), ids=CASES.keys())
def test_each_case_exits_with_its_documented_status(
    setup: Setup, status: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    store = filled_store(tmp_path / "store")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    argv = setup(store, scratch, monkeypatch)
    capsys.readouterr()  # the log of the supervisor that filled the store
    assert main(argv) == status
    assert "Traceback" not in capsys.readouterr().err


def test_an_output_cut_short_exits_1(tmp_path: Path) -> None:
    store = filled_store(tmp_path / "store")
    big = Record(kind="tally", key="big", data=b'{"items":["%s"]}' % (b"x" * 200_000))
    put(store, big, 0)
    reader, writer = os.pipe()
    os.close(reader)  # like `trio-pgs export STORE | head -c 0`
    try:
        done = subprocess.run(
            [sys.executable, "-m", "trio_pgs", "export", str(store)],
            stdout=writer, stderr=subprocess.PIPE, text=True, check=False,
        )
    finally:
        os.close(writer)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr


def test_the_docs_list_every_exit_status_in_one_table() -> None:
    section = DOCS.read_text().split("\n## Exit status\n", 1)[1].split("\n## ", 1)[0]
    statuses = re.findall(r"^\| \*\*(\d+)\*\* \|", section, flags=re.MULTILINE)
    assert statuses == ["0", "1", "2", "130"]


async def test_a_write_command_on_a_store_in_use_exits_2(tmp_path: Path) -> None:
    store = await trio.to_thread.run_sync(filled_store, tmp_path / "store")
    async with PersistentSupervisor(store=DiskCacheStore(store), servers=[TallyServer]):
        argv = ["release", str(store), "tally", "alice"]
        assert await trio.to_thread.run_sync(main, argv) == 2
