"""Stored strings that would drive the terminal (a key that clears the screen, forges a
table row, reverses text) are printed escaped by every ``trio-pgs`` command."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import diskcache
import pytest

from trio_pgs import Record
from trio_pgs._cli import main
from trio_pgs._diskcache_rows import SEPARATOR, encode_record

from .cli_support import filled_store, put, rows

#: Characters that must never reach a terminal raw: C0 (newline and tab included),
#: DEL, C1, the bidi controls, and the line and paragraph separators.
UNSAFE = (
    {chr(c) for c in range(0x20)} | {"\x7f"} | {chr(c) for c in range(0x80, 0xA0)}
    | set("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f\u061c")
    | {"\u2028", "\u2029"}
)
#: A key that clears the screen, paints in red, forges a row and reverses text.
HOSTILE_KEY = "\x1b[2J\x1b[31mok\trow\nfake\r\u202eevil\u2028\u2066\x9b0m\x7f\\"
#: How the command prints it: Python's escapes, backslash doubled.
ESCAPED_KEY = r"\x1b[2J\x1b[31mok\trow\nfake\r\u202eevil\u2028\u2066\x9b0m\x7f\\"
HOSTILE_STATE = {"items": ["\x1b[2J", "\u202e", "\x9b", "\u2029", "caf\u00e9"]}


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    return filled_store(tmp_path / "store")


@pytest.fixture
def hostile(store_dir: Path) -> Path:
    """The store, plus tally/HOSTILE_KEY holding HOSTILE_STATE."""
    data = json.dumps(HOSTILE_STATE, separators=(",", ":"), ensure_ascii=False).encode()
    put(store_dir, Record(kind="tally", key=HOSTILE_KEY, data=data, quarantined=True), 0)
    return store_dir


def assert_safe(text: str, *, lines: bool = True) -> None:
    """*text* holds no unsafe character (but the newlines ending its lines)."""
    for line in text.splitlines() if lines else [text]:
        assert not set(line) & UNSAFE, repr(line)


def write_lines(path: Path, *lines: str) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


# -- stored strings are printed escaped ----------------------------------------------------


def test_list_prints_a_hostile_key_escaped_in_one_cell(
    hostile: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["list", str(hostile)]) == 0
    out = capsys.readouterr().out
    assert_safe(out.replace("\t", " "))
    table = rows(out)
    assert len(table) == 5 and {len(row) for row in table} == {7}
    assert ["tally", ESCAPED_KEY, "quarantined"] in [row[:3] for row in table]


def test_list_on_a_terminal_prints_a_hostile_key_escaped(
    hostile: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert main(["list", str(hostile)]) == 0
    out = capsys.readouterr().out
    assert_safe(out)
    assert len(out.splitlines()) == 5 and ESCAPED_KEY in out


def test_a_hostile_kind_written_behind_the_store_is_printed_escaped(
    store_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    kind = "k\x1b]0;owned\x07\u202e"  # not printable: no server class could have it
    cache = diskcache.Cache(store_dir)
    cache.set(kind + SEPARATOR + "k", encode_record(Record(kind=kind, key="k", data=b"{}")))
    cache.close()
    for command in ("list", "stats"):
        assert main([command, str(store_dir)]) == 0
        out, err = capsys.readouterr()
        assert_safe(out.replace("\t", " ") + err)
        assert r"k\x1b]0;owned\x07\u202e" in out


def test_show_prints_the_metadata_and_the_state_escaped_and_says_how_to_get_the_raw_key(
    hostile: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["show", str(hostile), "tally", HOSTILE_KEY]) == 0
    out, err = capsys.readouterr()
    assert_safe(out)
    assert_safe(err)
    assert f"tally/{ESCAPED_KEY}" in err
    assert "--meta" in err  # the way to the raw key
    assert json.loads(out) == HOSTILE_STATE  # JSON escapes: the same state
    assert "caf\u00e9" in out  # printable text stays as it is


def test_show_of_a_plain_key_says_nothing_of_escapes(
    store_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["show", str(store_dir), "tally", "alice"]) == 0
    assert "escaped" not in capsys.readouterr().err


def test_show_meta_gives_the_raw_key_as_json(
    hostile: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["show", str(hostile), "tally", HOSTILE_KEY, "--meta"]) == 0
    out = capsys.readouterr().out
    assert_safe(out)
    shown = json.loads(out)
    assert shown["key"] == HOSTILE_KEY and shown["data"] == HOSTILE_STATE


def test_messages_naming_a_hostile_key_print_it_escaped(
    hostile: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = HOSTILE_KEY + "2"
    assert main(["show", str(hostile), "tally", missing]) == 1
    assert main(["release", str(hostile), "tally", missing]) == 1
    assert main(["release", str(hostile), "tally", HOSTILE_KEY]) == 0
    assert main(["release", str(hostile), "tally", HOSTILE_KEY]) == 0  # not quarantined now
    monkeypatch.setattr(sys, "stdin", io.StringIO("n\n"))
    assert main(["purge", str(hostile), "tally", HOSTILE_KEY]) == 1
    assert main(["purge", str(hostile), "tally", HOSTILE_KEY, "--yes"]) == 0
    out, err = capsys.readouterr()
    assert_safe(out)
    assert_safe(err)
    assert out.count(ESCAPED_KEY) == 2 and err.count(ESCAPED_KEY) >= 4


def test_an_unreadable_row_with_a_hostile_key_is_reported_escaped(
    store_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = diskcache.Cache(store_dir)
    cache.set("tally" + SEPARATOR + HOSTILE_KEY, b"not a record")
    cache.close()
    assert main(["list", str(store_dir)]) == 0
    assert main(["export", str(store_dir), "-o", str(tmp_path / "backup.jsonl")]) == 1
    assert main(["purge", str(store_dir), "tally", HOSTILE_KEY, "--yes"]) == 0
    out, err = capsys.readouterr()
    assert_safe(out.replace("\t", " "))
    assert_safe(err)
    assert ESCAPED_KEY in err and ESCAPED_KEY in out
