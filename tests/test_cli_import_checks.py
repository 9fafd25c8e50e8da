"""What ``trio-pgs import`` refuses before writing anything: a line nested too deeply,
a line that an export could not write back, an import with no records; and the other
side, what ``export`` writes so that every export imports back."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest

from trio_pgs import Record
from trio_pgs._cli import main

from .cli_support import filled_store, put, records, rows


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    return filled_store(tmp_path / "store")


def write_lines(path: Path, *lines: str) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


# -- what it refuses ---------------------------------------------------------------

GOOD_LINE = '{"kind": "tally", "key": "first", "data": {"items": []}}'


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("depth", [100_000, 1000])
def test_a_deeply_nested_import_line_is_a_clear_error(
    depth: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    backup = write_lines(
        tmp_path / "backup.jsonl", GOOD_LINE,
        '{"kind": "tally", "key": "deep", "data": ' + nested(depth) + "}",
    )
    assert main(["import", str(tmp_path / "copy"), str(backup)]) == 2
    err = capsys.readouterr().err
    assert f"{backup}, line 2: nested deeper than" in err
    assert "Traceback" not in err and "Recursion" not in err
    assert not (tmp_path / "copy").exists()


BAD_LINES = {
    "nan-time": ('{"kind": "tally", "key": "b", "data": {}, "updated_at": NaN}',
                 "NaN is not JSON"),
    "infinite-crash": ('{"kind": "tally", "key": "b", "data": {}, "crashes": [-Infinity]}',
                       "-Infinity is not JSON"),
    "overflowing-time": ('{"kind": "tally", "key": "b", "data": {}, "updated_at": 1e999}',
                         "1e999 is not a finite number"),
    "huge-version": ('{"kind": "tally", "key": "b", "data": {}, "version": 9223372036854775808}',
                     "version must be an int from 1 to 9223372032559808512"),
    "version-without-room": (
        '{"kind": "tally", "key": "b", "data": {}, "version": 9223372036854775797}',
        "version must be an int from 1 to 9223372032559808512",
    ),
    "huge-epoch": ('{"kind": "tally", "key": "b", "data": {}, "epoch": 99999999999999999999}',
                   "epoch must be an int from 0 to 9223372032559808512"),
    "repeated-field": ('{"kind": "tally", "key": "b", "data": {}, "key": "c"}',
                       'the name "key" appears twice in one object'),
    "repeated-name-in-data": ('{"kind": "tally", "key": "b", "data": {"x": 1, "x": 2}}',
                              'the name "x" appears twice in one object'),
    "surrogate-key": ('{"kind": "tally", "key": "b\\udc80", "data": {}}',
                      "a server key must be encodable as UTF-8 (no lone surrogate)"),
    "state-too-deep": ('{"kind": "tally", "key": "b", "data": ' + nested(250) + "}",
                       "nested deeper than"),
    "missing-kind": ('{"key": "b", "data": {}}', "kind is missing"),
    "reminder-due-too-late": (
        '{"kind": "tally", "key": "b", "data": {}, "reminders": [{"name": "r", "due": 1e300}]}',
        "tally/b: reminder 1 ('r'): due must be a time a datetime can name"),
    "reminder-due-too-early": (
        '{"kind": "tally", "key": "b", "data": {}, "reminders": [{"name": "r", "due": -1e300}]}',
        "tally/b: reminder 1 ('r'): due must be a time a datetime can name"),
    "reminder-every-too-long": (
        '{"kind": "tally", "key": "b", "data": {}, "reminders":'
        ' [{"name": "r", "due": 0, "every": 1e300}]}',
        "tally/b: reminder 1 ('r'): every must be null or from 0.001 s to a century"),
}


@pytest.mark.parametrize(("line", "reason"), BAD_LINES.values(), ids=BAD_LINES.keys())
def test_import_refuses_a_line_that_export_could_not_write_back(
    line: str, reason: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    backup = write_lines(tmp_path / "backup.jsonl", GOOD_LINE, line)
    assert main(["import", str(tmp_path / "copy"), str(backup)]) == 2
    err = capsys.readouterr().err
    assert f"{backup}, line 2: {reason}" in err
    assert not (tmp_path / "copy").exists()  # nothing imported, nothing created


def test_a_record_with_a_time_json_cannot_hold_is_left_out_of_an_export(
    store_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    odd = Record(kind="tally", key="nan", data=b"{}", updated_at=float("nan"))
    put(store_dir, odd, 0)
    backup = tmp_path / "backup.jsonl"
    assert main(["export", str(store_dir), "-o", str(backup)]) == 1
    err = capsys.readouterr().err
    assert "tally/nan" in err and "the export is incomplete" in err
    lines = backup.read_text().splitlines()
    assert len(lines) == 3 and "NaN" not in backup.read_text()


def test_an_export_imports_back_whatever_the_depth_of_its_states(
    store_dir: Path, tmp_path: Path
) -> None:
    for key, depth in (("deep", 250), ("deeper", 300), ("flat", 200)):
        put(store_dir, Record(kind="tally", key=key, data=nested(depth).encode()), 0)
    backup = tmp_path / "backup.jsonl"
    assert main(["export", str(store_dir), "-o", str(backup)]) == 0
    assert main(["import", str(tmp_path / "copy"), str(backup)]) == 0
    assert records(tmp_path / "copy") == records(store_dir)
    exported = {line["key"]: line for line in map(json.loads, backup.read_text().splitlines())}
    assert "data" in exported["flat"] and "data_base64" in exported["deep"]


# -- an empty import --------------------------------------------------------------------


@pytest.mark.parametrize("content", ["", "\n  \n"], ids=["empty", "blank-lines"])
def test_an_empty_import_says_so_and_exits_1(
    content: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    backup = tmp_path / "backup.jsonl"
    backup.write_text(content)
    assert main(["import", str(tmp_path / "copy"), str(backup)]) == 1
    err = capsys.readouterr().err
    assert f"{backup} holds no records; nothing was imported" in err and "--allow-empty" in err
    assert not (tmp_path / "copy").exists()


def test_an_empty_import_from_stdin_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert main(["import", str(tmp_path / "copy")]) == 1
    assert "<stdin> holds no records" in capsys.readouterr().err


def test_an_empty_import_with_allow_empty_creates_an_empty_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    backup = tmp_path / "backup.jsonl"
    backup.write_text("")
    assert main(["import", str(tmp_path / "copy"), str(backup), "--allow-empty"]) == 0
    assert "imported 0 record(s)" in capsys.readouterr().out
    assert main(["list", str(tmp_path / "copy")]) == 0
    assert rows(capsys.readouterr().out)[1:] == []
