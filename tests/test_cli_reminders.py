"""Reminders in the ``trio-pgs`` command: ``show`` lists them, ``export`` and ``import``
carry them (and refuse malformed ones before writing anything), and the commands that
rewrite a record keep them.

The tests that read records back from a store run on a DiskCacheStore directory, as
the other CLI tests do, and on a MemoryStore plugged in as the store URL
``memory:NAME`` (the opener's one place for a new store type), so that what the
command does is checked apart from what a store keeps.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from trio_pgs import MemoryStore, Record
from trio_pgs._cli import _opener, main
from trio_pgs._cli._exchange import read_records, record_from_json, record_to_json
from trio_pgs._cli._exit import EXIT_NOT_STARTED, CommandError
from trio_pgs._cli._output import from_now, json_text, span
from trio_pgs._schedule import MAX_NAME, MAX_PAYLOAD, MAX_REMINDERS, StoredReminder
from trio_pgs._store import Put

from . import cli_support

#: A key that clears the screen and reverses text; how the command prints it.
HOSTILE = "\x1b[2J\u202eevil\n"
ESCAPED = r"\x1b[2J\u202eevil\n"


def reminding(key: str = "alice", *reminders: StoredReminder, **fields: Any) -> Record:
    return Record(kind="tally", key=key, data=b'{"items":["apple"]}', version=2,
                  updated_at=1.7e9, reminders=reminders, **fields)


class Stores:
    """The stores of one test, by name: ``spec(name)`` for the command line, and
    ``put`` and ``records`` behind the command's back."""

    def __init__(self, backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.backend, self._tmp = backend, tmp_path
        self._memory: dict[str, MemoryStore] = {}
        if backend == "memory":
            monkeypatch.setitem(_opener._SCHEMES, "memory", self._memory_store)

    def _memory_store(self, spec: str, name: str, write: bool, create: bool) -> MemoryStore:
        if name not in self._memory and not create:
            raise CommandError(f"{spec}: no such store", EXIT_NOT_STARTED)
        return self._memory.setdefault(name, MemoryStore())

    def spec(self, name: str = "store") -> str:
        return f"memory:{name}" if self.backend == "memory" else str(self._tmp / name)

    def exists(self, name: str) -> bool:
        """Whether the store *name* was created (a directory), or holds records."""
        if self.backend == "diskcache":
            return (self._tmp / name).exists()
        return name in self._memory and bool(self.records(name))

    def put(self, record: Record, expected_version: int = 0, name: str = "store") -> None:
        if self.backend == "diskcache":
            cli_support.put(self._tmp / name, record, expected_version)
            return
        store = self._memory.setdefault(name, MemoryStore())

        async def write() -> None:
            await store.open()
            try:
                await store.commit([Put(record, expected_version)])
            finally:
                await store.close()

        trio.run(write)

    def records(self, name: str = "store") -> dict[tuple[str, str], Record]:
        if self.backend == "diskcache":
            return cli_support.records(self._tmp / name)
        store = self._memory[name]

        async def scan() -> dict[tuple[str, str], Record]:
            await store.open()
            try:
                return {(r.kind, r.key): r for kind in await store.kinds()
                        async for r in store.scan(kind)}
            finally:
                await store.close()

        return trio.run(scan)


@pytest.fixture(params=["diskcache", "memory"])
def stores(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Stores]:
    yield Stores(request.param, tmp_path, monkeypatch)


def write_lines(path: Path, *lines: str) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def show_lines(err: str) -> dict[str, str]:
    """The reminder lines of ``show``'s stderr, by reminder name."""
    lines = err.splitlines()
    start = next(n for n, line in enumerate(lines) if line.startswith("reminders:"))
    found = {}
    for line in lines[start + 1 :]:
        if not line.startswith("  "):
            break
        name, _, rest = line.strip().partition(": ")
        found[name] = rest.strip()
    return found


# -- show -------------------------------------------------------------------------------


def test_show_lists_each_reminder_with_its_due_time_period_and_payload(
    stores: Stores, capsys: pytest.CaptureFixture[str]
) -> None:
    now = time.time()
    expire = StoredReminder("expire", now + 3 * 3600 + 2 * 60 + 30, None, '{"cart":7}')
    refill = StoredReminder("refill", now - 5 * 60 - 30, 5400.0, "null")
    stores.put(reminding("alice", expire, refill))
    assert main(["show", stores.spec(), "tally", "alice"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out) == {"items": ["apple"]}  # the state alone on stdout
    assert "reminders:     2\n" in err
    shown = show_lines(err)
    iso_expire = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(expire.due))
    iso_refill = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(refill.due))
    assert shown == {
        "expire": f'next due {iso_expire}, in 3h 2m; payload {{"cart": 7}}',
        "refill": f"next due {iso_refill}, 5m 30s ago (overdue); every 1h 30m; payload null",
    }


def test_show_of_a_record_without_reminders_says_0(
    stores: Stores, capsys: pytest.CaptureFixture[str]
) -> None:
    stores.put(reminding("alice"))
    assert main(["show", stores.spec(), "tally", "alice"]) == 0
    err = capsys.readouterr().err
    assert "reminders:     0\n" in err and show_lines(err) == {}


def test_show_says_a_quarantined_servers_reminders_wait_for_its_release(
    stores: Stores, capsys: pytest.CaptureFixture[str]
) -> None:
    stores.put(reminding("alice", StoredReminder("tick", 1.7e9, 60.0), quarantined=True))
    assert main(["show", stores.spec(), "tally", "alice"]) == 0
    err = capsys.readouterr().err
    assert "reminders:     1 (none is delivered while the server is quarantined)" in err
    assert show_lines(err)["tick"].startswith("next due 2023-11-14T22:13:20Z, ")
    assert "ago (overdue); every 1m; payload null" in show_lines(err)["tick"]


def test_show_prints_a_hostile_reminder_name_escaped_and_its_payload_as_json(
    stores: Stores, capsys: pytest.CaptureFixture[str]
) -> None:
    payload = json.dumps({"note": HOSTILE + "caf\u00e9"})
    stores.put(reminding("alice", StoredReminder(HOSTILE, 2e9, None, payload)))
    assert main(["show", stores.spec(), "tally", "alice"]) == 0
    err = capsys.readouterr().err
    line = next(line for line in err.splitlines() if line.startswith("  "))
    assert line.startswith(f"  {ESCAPED}: next due 2033-05-18T03:33:20Z, in ")
    # JSON's escapes, so the payload shown is the same JSON; printable text as it is
    assert line.endswith(r'payload {"note": "\u001b[2J\u202eevil\ncaf' + '\u00e9"}')
    assert not set(line) & {"\x1b", "\u202e", "\n"}
    assert "a reminder's name is shown escaped: --meta prints it exactly" in err


def test_show_cuts_a_long_payload_short(
    stores: Stores, capsys: pytest.CaptureFixture[str]
) -> None:
    payload = json.dumps(["x" * 1000])
    stores.put(reminding("alice", StoredReminder("big", 2e9, None, payload)))
    assert main(["show", stores.spec(), "tally", "alice"]) == 0
    shown = show_lines(capsys.readouterr().err)["big"]
    assert shown.endswith('... (1004 characters; --meta prints them all)')
    assert len(shown) < 300


def test_show_meta_gives_the_reminders_as_data(
    stores: Stores, capsys: pytest.CaptureFixture[str]
) -> None:
    stores.put(reminding(
        "alice", StoredReminder("expire", 2e9, None, '{"cart":7}'),
        StoredReminder("refill", 1.7e9, 3600.0, "null"),
    ))
    assert main(["show", stores.spec(), "tally", "alice", "--meta"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["reminders"] == [
        {"name": "expire", "due": 2e9, "every": None, "payload": {"cart": 7}},
        {"name": "refill", "due": 1.7e9, "every": 3600.0, "payload": None},
    ]
    assert err == ""


def test_show_meta_of_a_record_without_reminders_has_no_reminders_field(
    stores: Stores, capsys: pytest.CaptureFixture[str]
) -> None:
    stores.put(reminding("alice"))
    assert main(["show", stores.spec(), "tally", "alice", "--meta"]) == 0
    assert "reminders" not in json.loads(capsys.readouterr().out)


@pytest.mark.parametrize(
    ("seconds", "short", "exact"),
    [(0, "0s", "0s"), (0.25, "0s", "0.25s"), (59, "59s", "59s"), (300, "5m", "5m"),
     (330.5, "5m 30s", "5m 30.5s"), (3 * 3600 + 125, "3h 2m", "3h 2m 5s"),
     (2 * 86400 + 7, "2d", "2d 7s"), (0.001, "0s", "0.001s"),
     (119.9999999, "1m 59s", "2m")],
)
def test_spans_of_time(seconds: float, short: str, exact: str) -> None:
    assert span(seconds) == short and span(seconds, exact=True) == exact
    assert from_now(1000 + seconds, 1000) == f"in {short}"
    if seconds:
        assert from_now(1000, 1000 + seconds) == f"{short} ago (overdue)"


# -- export and import ------------------------------------------------------------------


def test_export_then_import_restores_every_reminder(
    stores: Stores, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stores.put(reminding(
        "alice", StoredReminder("expire", 2e9, None, '{"cart":7,"who":"caf\\u00e9"}'),
        StoredReminder("refill", 1.7e9 + 0.125, 0.5, "[1,2.5,null]"),
    ))
    stores.put(reminding("bob"))  # none: no reminders field
    backup = tmp_path / "backup.jsonl"
    assert main(["export", stores.spec(), "-o", str(backup)]) == 0
    lines = [json.loads(line) for line in backup.read_text().splitlines()]
    assert lines[0]["reminders"] == [
        {"name": "expire", "due": 2e9, "every": None,
         "payload": {"cart": 7, "who": "caf\u00e9"}},
        {"name": "refill", "due": 1.7e9 + 0.125, "every": 0.5, "payload": [1, 2.5, None]},
    ]
    assert "reminders" not in lines[1]
    assert main(["import", stores.spec("copy"), str(backup)]) == 0
    assert "imported 2 record(s)" in capsys.readouterr().out
    assert stores.records("copy") == stores.records()
    assert len(stores.records("copy")["tally", "alice"].reminders) == 2


def test_a_payload_not_written_as_trio_pgs_writes_it_is_exported_as_its_text(
    stores: Stores, tmp_path: Path
) -> None:
    """Spaces, a deeply nested payload: exported as payload_text, restored exactly."""
    deep = "[" * 250 + "]" * 250
    stores.put(reminding(
        "alice", StoredReminder("deep", 2e9, None, deep),
        StoredReminder("spaced", 2e9, None, '{"b": 1, "a": 2}'),
    ))
    backup = tmp_path / "backup.jsonl"
    assert main(["export", stores.spec(), "-o", str(backup)]) == 0
    exported = json.loads(backup.read_text())["reminders"]
    assert exported[0] == {"name": "deep", "due": 2e9, "every": None, "payload_text": deep}
    assert exported[1]["payload_text"] == '{"b": 1, "a": 2}'
    assert main(["import", stores.spec("copy"), str(backup)]) == 0
    assert stores.records("copy") == stores.records()


def test_an_export_from_before_reminders_imports_with_none(
    stores: Stores, tmp_path: Path
) -> None:
    backup = write_lines(
        tmp_path / "old.jsonl",
        '{"kind": "tally", "key": "alice", "data": {"items": []}, "version": 3, '
        '"state_version": 1, "epoch": 0, "updated_at": 1795517615.47, "crashes": [], '
        '"quarantined": false, "history": []}',
        '{"kind": "tally", "key": "bob", "data": {"items": []}, "reminders": []}',
    )
    assert main(["import", stores.spec("copy"), str(backup)]) == 0
    imported = stores.records("copy")
    assert imported["tally", "alice"].reminders == () and imported["tally", "alice"].version == 3
    assert imported["tally", "bob"].reminders == ()


def test_import_sorts_the_reminders_by_name_and_defaults_every_and_payload(
    stores: Stores, tmp_path: Path
) -> None:
    backup = write_lines(
        tmp_path / "edited.jsonl",
        '{"kind": "tally", "key": "alice", "data": {"items": []}, "reminders": ['
        '{"name": "b", "due": 2000000000, "every": 60, "payload": {"x": [1, 2]}}, '
        '{"name": "a", "due": 1.5e9}]}',
    )
    assert main(["import", stores.spec("copy"), str(backup)]) == 0
    assert stores.records("copy")["tally", "alice"].reminders == (
        StoredReminder("a", 1.5e9, None, "null"),
        StoredReminder("b", 2e9, 60.0, '{"x":[1,2]}'),
    )


def _line(reminders: str, key: str = "bad") -> str:
    return f'{{"kind": "tally", "key": "{key}", "data": {{}}, "reminders": {reminders}}}'


BAD_REMINDERS = {
    "not-a-list": ('{"name": "a", "due": 1}', "tally/bad: reminders must be a list of objects"),
    "not-an-object": ('["a", 1]', "tally/bad: reminder 1 is not a JSON object"),
    "no-name": ('[{"due": 1}]', "tally/bad: reminder 1: name must be a non-empty string"),
    "empty-name": ('[{"name": "", "due": 1}]', "tally/bad: reminder 1: name must be"),
    "long-name": (f'[{{"name": "{"n" * (MAX_NAME + 1)}", "due": 1}}]',
                  f"name must be a non-empty string of at most {MAX_NAME} characters"),
    "surrogate-name": ('[{"name": "a\\udc80", "due": 1}]',
                       "tally/bad: reminder 1 ('a\\udc80'): name holds a lone surrogate"),
    "same-name": ('[{"name": "a", "due": 1}, {"name": "a", "due": 2}]',
                  "tally/bad: two reminders are named 'a'"),
    "no-due": ('[{"name": "a"}]', "tally/bad: reminder 1 ('a'): due is missing"),
    "text-due": ('[{"name": "a", "due": "soon"}]',
                 "reminder 1 ('a'): due must be a time (seconds since the epoch), "
                 "not 'soon'"),
    "bool-due": ('[{"name": "a", "due": true}]', "due must be a time"),
    "huge-due": ('[{"name": "a", "due": 1' + "0" * 400 + "}]", "due must be a time"),
    "zero-every": ('[{"name": "a", "due": 1, "every": 0}]',
                   "reminder 1 ('a'): every must be null or from 0.001 s to a century"),
    "negative-every": ('[{"name": "a", "due": 1, "every": -60}]',
                       "every must be null or from 0.001 s to a century"),
    "text-every": ('[{"name": "a", "due": 1, "every": "1h"}]',
                   "every must be null or a number of seconds, not '1h'"),
    "unknown-field": ('[{"name": "a", "due": 1, "at": 5}]',
                      "tally/bad: reminder 1 ('a'): unknown field(s) at"),
    "both-payloads": ('[{"name": "a", "due": 1, "payload": 1, "payload_text": "1"}]',
                      "either payload (JSON) or payload_text, not both"),
    "payload-text-not-json": ('[{"name": "a", "due": 1, "payload_text": "{"}]',
                              "reminder 1 ('a'): payload_text is not JSON an export writes"),
    "payload-text-nan": ('[{"name": "a", "due": 1, "payload_text": "NaN"}]',
                         "payload_text is not JSON an export writes: NaN is not JSON"),
    "payload-text-twice": ('[{"name": "a", "due": 1, "payload_text": "{\\"x\\":1,\\"x\\":2}"}]',
                           'the name "x" appears twice in one object'),
    "payload-text-number": ('[{"name": "a", "due": 1, "payload_text": 5}]',
                            "payload_text must be a string of JSON, not 5"),
    "payload-too-big": (f'[{{"name": "a", "due": 1, "payload": "{"x" * MAX_PAYLOAD}"}}]',
                        f"the payload is {MAX_PAYLOAD + 2} characters of JSON, over the "
                        f"{MAX_PAYLOAD} allowed"),
    "too-many": ("[" + ", ".join(f'{{"name": "r{n}", "due": 1}}'
                                 for n in range(MAX_REMINDERS + 1)) + "]",
                 f"tally/bad: {MAX_REMINDERS + 1} reminders, over the {MAX_REMINDERS}"),
}


@pytest.mark.parametrize(("reminders", "reason"), BAD_REMINDERS.values(),
                         ids=BAD_REMINDERS.keys())
def test_import_refuses_malformed_reminders_naming_the_record_and_writes_nothing(
    reminders: str, reason: str, stores: Stores, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    backup = write_lines(tmp_path / "backup.jsonl", _line("[]", key="good"), _line(reminders))
    assert main(["import", stores.spec("copy"), str(backup)]) == 2
    err = capsys.readouterr().err
    assert f"{backup}, line 2: " in err and reason in err, err
    assert "Traceback" not in err
    assert not stores.exists("copy")  # nothing imported, nothing created


def test_import_replace_restores_the_exported_reminders_over_the_stored_ones(
    stores: Stores, tmp_path: Path
) -> None:
    exported = reminding("alice", StoredReminder("expire", 2e9, None, '{"cart":7}'))
    stores.put(exported)
    backup = tmp_path / "backup.jsonl"
    assert main(["export", stores.spec(), "-o", str(backup)]) == 0
    changed = attrs.evolve(exported, version=3, reminders=(StoredReminder("other", 1e9),))
    stores.put(changed, 2)
    assert main(["import", stores.spec(), str(backup), "--replace"]) == 0
    alice = stores.records()["tally", "alice"]
    assert alice.reminders == exported.reminders
    assert alice.version == 4  # above the stored version, as every replace


def test_export_leaves_out_a_record_whose_reminders_import_would_refuse(
    stores: Stores, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A payload written behind trio-pgs's back that JSON cannot hold (NaN): the export
    says which record it left out, and why, naming it once."""
    stores.put(reminding("alice", StoredReminder("odd", 2e9, None, "NaN")))
    stores.put(reminding("bob", StoredReminder("fine", 2e9)))
    backup = tmp_path / "backup.jsonl"
    assert main(["export", stores.spec(), "-o", str(backup)]) == 1
    err = capsys.readouterr().err
    assert ("export skipped tally/alice: reminder 1 ('odd'): payload_text is not JSON an "
            "export writes: NaN is not JSON") in err
    assert "the export is incomplete" in err
    assert [json.loads(line)["key"] for line in backup.read_text().splitlines()] == ["bob"]


# -- the commands that rewrite a record --------------------------------------------------


def test_release_keeps_the_reminders(
    stores: Stores, capsys: pytest.CaptureFixture[str]
) -> None:
    """Lifting a quarantine keeps the reminders, and their due times: the overdue ones
    are delivered once the application runs (their missed ticks folded into one)."""
    kept = (StoredReminder("expire", 2e9, None, '{"cart":7}'),
            StoredReminder("tick", 1.7e9, 60.0))
    stores.put(reminding("alice", *kept, quarantined=True, crashes=(1.6e9,)))
    assert main(["release", stores.spec(), "tally", "alice"]) == 0
    alice = stores.records()["tally", "alice"]
    assert (alice.quarantined, alice.crashes, alice.version) == (False, (), 3)
    assert alice.reminders == kept
    capsys.readouterr()
    assert main(["show", stores.spec(), "tally", "alice"]) == 0
    assert "reminders:     2\n" in capsys.readouterr().err  # no longer held


# -- the format, without a store ------------------------------------------------------------

ROUND_TRIPS = {
    "none": (),
    "once": (StoredReminder("a", 2e9),),
    "periodic": (StoredReminder("a", -5.5, 0.001, '"text"'),),
    "unicode": (StoredReminder("caf\u00e9 \u2603", 0.0, 1e9, '{"\\u00e9":["\\u2603"]}'),),
    "raw-unicode-payload": (StoredReminder("a", 1.0, None, '["caf\u00e9"]'),),
    "spaced-payload": (StoredReminder("a", 1.0, None, "[1, 2]"),),
    "deep-payload": (StoredReminder("a", 1.0, None, "[" * 199 + "]" * 199),),
    "deeper-payload": (StoredReminder("a", 1.0, None, "[" * 600 + "]" * 600),),
    "many": tuple(StoredReminder(f"r{n:04}", float(n)) for n in range(MAX_REMINDERS)),
}


@pytest.mark.parametrize("reminders", ROUND_TRIPS.values(), ids=ROUND_TRIPS.keys())
def test_every_export_of_reminders_reads_back_as_it_was(
    reminders: tuple[StoredReminder, ...],
) -> None:
    record = reminding("alice", *reminders)
    line = json_text(record_to_json(record), ascii=True)
    assert line.isascii()
    assert read_records([line], "backup") == [record]
    assert record_from_json(record_to_json(record)) == record
