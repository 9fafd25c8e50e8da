"""The export format: one JSON object per record (docs/cli.md, "Export format").

The rule of this module: an export imports back. `import` refuses what `export` would
not write (a line it cannot read safely, a field it would not write, a value a store
cannot hold), and `export` leaves out, with a message, a record that `import` would
refuse; both use `record_from_json`, so the two sides cannot drift apart.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections.abc import Iterable
from typing import Any

import attrs

from .._encoding import dumps, loads
from .._ref import check_key
from .._schedule import (
    EARLIEST,
    LATEST,
    MAX_EVERY,
    MAX_NAME,
    MAX_PAYLOAD,
    MAX_REMINDERS,
    MIN_EVERY,
    StoredReminder,
)
from .._server import check_kind
from .._store import MAX_COUNT, Record
from ._exit import EXIT_NOT_STARTED, CommandError
from ._output import ident

#: How deeply a state may nest arrays and objects to be exported as JSON (``data``); a
#: deeper one is exported as ``data_base64``. An import line may nest one level more
#: (the record's own object), and a deeper one is refused before it is parsed: JSON
#: readers recurse, and 100,000 levels overflow the stack.
MAX_STATE_DEPTH = 200
_FIELDS = frozenset(field.name for field in attrs.fields(Record)) | {"data_base64"}
#: The fields of one reminder in an export (``payload`` or ``payload_text``).
_REMINDER_FIELDS = frozenset({"name", "due", "every", "payload", "payload_text"})
#: How deeply a reminder's payload may nest to be exported as JSON (``payload``): the
#: record's object, the list of reminders and the reminder's object hold it, and the
#: line may nest `MAX_STATE_DEPTH` + 1 deep. A deeper one is exported as ``payload_text``.
MAX_PAYLOAD_DEPTH = MAX_STATE_DEPTH - 2
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')  # a JSON string, escapes included
_BRACKET = re.compile(r"[\[\]{}]")


# -- export -------------------------------------------------------------------------------


def record_to_json(record: Record) -> dict[str, Any]:
    """*record* as one object of the export: every field; the state as JSON when its
    bytes are exactly what trio-pgs writes for that JSON and it nests at most
    `MAX_STATE_DEPTH` deep (else ``data_base64``), so that an import restores the same
    bytes; the history base64."""
    exported: dict[str, Any] = {"kind": record.kind, "key": record.key}
    readable, state = _state(record.data)
    if readable:
        exported["data"] = state
    else:
        exported["data_base64"] = base64.b64encode(record.data).decode("ascii")
    exported.update(
        version=record.version,
        state_version=record.state_version,
        epoch=record.epoch,
        updated_at=record.updated_at,
        crashes=list(record.crashes),
        quarantined=record.quarantined,
        history=[base64.b64encode(old).decode("ascii") for old in record.history],
    )
    if record.reminders:
        # Only when there are some: an export of records without reminders stays
        # importable by a trio-pgs that knows no reminders, and one that has some is
        # refused there (an unknown field) rather than imported without them.
        exported["reminders"] = [_reminder_to_json(r) for r in record.reminders]
    return exported


def _reminder_to_json(reminder: StoredReminder) -> dict[str, Any]:
    """One reminder of the export: its payload as JSON when its text is exactly what
    trio-pgs writes for that JSON (else ``payload_text``, the text itself)."""
    exported: dict[str, Any] = {
        "name": reminder.name, "due": reminder.due, "every": reminder.every,
    }
    readable, payload = _payload(reminder.payload)
    if readable:
        exported["payload"] = payload
    else:
        exported["payload_text"] = reminder.payload
    return exported


def _payload(text: str) -> tuple[bool, Any]:
    """Whether a reminder's payload *text* is exported as JSON, and that JSON."""
    if _deeper_than(text, MAX_PAYLOAD_DEPTH):
        return False, None
    try:
        payload = json.loads(text)
        return _payload_text(payload) == text, payload
    except (ValueError, TypeError, RecursionError):
        return False, None


def _payload_text(payload: Any) -> str:
    """*payload* as trio-pgs stores a reminder's payload (`_schedule.encode_payload`)."""
    return json.dumps(payload, allow_nan=False, separators=(",", ":"))


def _state(data: bytes) -> tuple[bool, Any]:
    """Whether *data* is exported as JSON, and that JSON."""
    if data.count(b"[") + data.count(b"{") > MAX_STATE_DEPTH:
        try:
            if _deeper_than(data.decode("utf-8"), MAX_STATE_DEPTH):
                return False, None
        except UnicodeDecodeError:
            return False, None
    try:
        state = loads(data)
        return dumps(state) == data, state
    except (ValueError, TypeError):
        return False, None


def import_refusal(record: Record, exported: dict[str, Any]) -> str | None:
    """Why an import would refuse *exported*, the export of *record* (None if it
    would restore *record* as it is)."""
    try:
        restored = record_from_json(exported)
    except ValueError as exc:  # the export's message names the record already
        return str(exc).removeprefix(f"{ident(record.kind, record.key)}: ")
    if restored != record:
        return "an import would not restore it as it is"
    return None


# -- import -------------------------------------------------------------------------------


def read_records(lines: Iterable[str], name: str) -> list[Record]:
    """Every record of an export, all checked before anything is written; a line that
    is not one raises `CommandError` (exit status 2) naming *name* and the line."""
    records: list[Record] = []
    seen: dict[tuple[str, str], int] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = record_from_json(_parse(line))
        except (ValueError, RecursionError) as exc:  # json.JSONDecodeError included
            raise CommandError(f"{name}, line {number}: {exc}", EXIT_NOT_STARTED) from None
        server = (record.kind, record.key)
        if server in seen:
            raise CommandError(
                f"{name}, line {number}: {ident(*server)} is already on line {seen[server]}",
                EXIT_NOT_STARTED,
            )
        seen[server] = number
        records.append(record)
    return records


def _parse(line: str) -> Any:
    """The JSON value of *line*, read as strictly as an export is written: not nested
    deeper than an export nests, no NaN or infinity, no name twice in an object."""
    if _deeper_than(line, MAX_STATE_DEPTH + 1):
        raise ValueError(
            f"nested deeper than {MAX_STATE_DEPTH + 1} levels of arrays and objects (an "
            f"export gives a state nested deeper than {MAX_STATE_DEPTH} as data_base64)"
        )
    return json.loads(
        line, object_pairs_hook=_object, parse_constant=_constant, parse_float=_finite
    )


def _deeper_than(text: str, limit: int) -> bool:
    """Whether the JSON *text* nests arrays and objects more than *limit* deep,
    found without recursion (and at once for the usual, shallow text)."""
    if text.count("[") + text.count("{") <= limit:
        return False
    depth = 0
    for bracket in _BRACKET.finditer(_STRING.sub("", text)):
        if bracket.group() in "[{":
            depth += 1
            if depth > limit:
                return True
        else:
            depth -= 1
    return False


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found = dict(pairs)
    if len(found) != len(pairs):
        names: set[str] = set()
        for name, _ in pairs:
            if name in names:
                raise ValueError(f"the name {json.dumps(name)} appears twice in one object")
            names.add(name)
    return found


def _constant(text: str) -> Any:
    raise ValueError(f"{text} is not JSON (an export never writes it)")


def _finite(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise ValueError(f"{text} is not a finite number")
    return number


def record_from_json(obj: Any) -> Record:
    """The record an export object describes; `ValueError` says what is wrong."""
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    unknown = sorted(set(obj) - _FIELDS)
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(unknown)}")
    for required in ("kind", "key"):
        if required not in obj:
            raise ValueError(f"{required} is missing")
    if ("data" in obj) == ("data_base64" in obj):
        raise ValueError("give the state as either data (JSON) or data_base64")
    history, crashes = obj.get("history", []), obj.get("crashes", [])
    if not isinstance(history, list):
        raise ValueError("history must be a list of base64 strings")
    if not isinstance(crashes, list):
        raise ValueError("crashes must be a list of times (numbers)")
    if not isinstance(obj.get("quarantined", False), bool):
        raise ValueError("quarantined must be true or false")
    try:
        kind, key = check_kind(obj["kind"]), _storable_key(obj["key"])
        data = _b64(obj["data_base64"]) if "data_base64" in obj else dumps(obj["data"])
        return Record(
            kind=kind,
            key=key,
            data=data,
            version=_counter(obj, "version", 1),
            state_version=_counter(obj, "state_version", 1),
            epoch=_counter(obj, "epoch", 0),
            updated_at=_time(obj.get("updated_at", 0.0), "updated_at"),
            crashes=tuple(_time(crash, "crashes") for crash in crashes),
            quarantined=obj.get("quarantined", False),
            history=tuple(map(_b64, history)),
            reminders=_reminders(obj.get("reminders", []), ident(kind, key)),
        )
    except TypeError as exc:  # check_kind, check_key and dumps say what they refuse
        raise ValueError(str(exc)) from None


def _reminders(items: object, server: str) -> tuple[StoredReminder, ...]:
    """The reminders of an export object (sorted by name, as a record keeps them);
    `ValueError` naming *server* (kind/key) and the reminder says what is wrong."""
    if not isinstance(items, list):
        raise ValueError(f"{server}: reminders must be a list of objects, not {items!r:.80}")
    if len(items) > MAX_REMINDERS:
        raise ValueError(f"{server}: {len(items)} reminders, over the {MAX_REMINDERS} a "
                         "server keeps")
    reminders: dict[str, StoredReminder] = {}
    for number, item in enumerate(items, 1):
        reminder = _reminder(item, f"{server}: reminder {number}")
        if reminder.name in reminders:
            raise ValueError(f"{server}: two reminders are named '{reminder.name}'")
        reminders[reminder.name] = reminder
    return tuple(reminders[name] for name in sorted(reminders))


def _reminder(item: object, where: str) -> StoredReminder:
    """One reminder of an export; *where* begins each message ("tally/a: reminder 2")."""
    if not isinstance(item, dict):
        raise ValueError(f"{where} is not a JSON object: {item!r:.80}")
    name = item.get("name")
    if not isinstance(name, str) or not name or len(name) > MAX_NAME:
        raise ValueError(f"{where}: name must be a non-empty string of at most {MAX_NAME} "
                         f"characters, not {name!r:.80}")
    where = f"{where} ('{name}')"  # printed escaped, once
    unknown = sorted(set(item) - _REMINDER_FIELDS)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {', '.join(unknown)}")
    if "due" not in item:
        raise ValueError(f"{where}: due is missing")
    due = _seconds(item["due"], f"{where}: due must be a time (seconds since the epoch)")
    if not EARLIEST <= due <= LATEST:  # what a store keeps (`pack_reminders`)
        raise ValueError(f"{where}: due must be a time a datetime can name (years 1 to "
                         f"9999), not {due}")
    every = item.get("every")
    if every is not None:
        every = _seconds(every, f"{where}: every must be null or a number of seconds")
        if not MIN_EVERY <= every <= MAX_EVERY:
            raise ValueError(f"{where}: every must be null or from {MIN_EVERY} s to a "
                             f"century ({MAX_EVERY:.0f} s), not {every}")
    return StoredReminder(
        _storable(name, f"{where}: name"), due, every,
        _storable(_payload_of(item, where), f"{where}: payload"),
    )


def _seconds(value: object, must: str) -> float:
    """*value* as a finite float; else `ValueError`: *must*, and what *value* is."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            if math.isfinite(seconds := float(value)):
                return seconds
        except OverflowError:
            pass
    raise ValueError(f"{must}, not {value!r:.80}")


def _payload_of(item: dict[str, Any], where: str) -> str:
    """A reminder's payload as the JSON text a store keeps: ``payload`` re-encoded as
    trio-pgs encodes payloads, or ``payload_text`` checked as strictly as a line."""
    if "payload" in item and "payload_text" in item:
        raise ValueError(f"{where}: give the payload as either payload (JSON) or "
                         "payload_text, not both")
    if "payload_text" in item:
        text = item["payload_text"]
        if not isinstance(text, str):
            raise ValueError(f"{where}: payload_text must be a string of JSON, not "
                             f"{text!r:.80}")
        try:  # as strictly as a line, but as deep as a payload may be
            json.loads(text, object_pairs_hook=_object, parse_constant=_constant,
                       parse_float=_finite)
        except ValueError as exc:
            raise ValueError(f"{where}: payload_text is not JSON an export writes: "
                             f"{exc}") from None
        except RecursionError:
            raise ValueError(f"{where}: payload_text nests too deeply to be read") from None
    else:
        try:
            text = _payload_text(item.get("payload"))
        except (ValueError, TypeError) as exc:  # only from a caller's object, never a line
            raise ValueError(f"{where}: the payload is not JSON data ({exc})") from None
    if len(text) > MAX_PAYLOAD:
        raise ValueError(f"{where}: the payload is {len(text)} characters of JSON, over "
                         f"the {MAX_PAYLOAD} allowed")
    return text


def _storable(text: str, what: str) -> str:
    """*text*, if a store can hold it: no lone surrogate (JSON can write one)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{what} holds a lone surrogate ({text[exc.start]}), which no "
                         "store can hold") from None
    return text


def _storable_key(key: object) -> str:
    """A valid key that a store can hold (`check_key` refuses a lone surrogate, which
    is no character of UTF-8, though JSON can write one as an escape)."""
    return check_key(key)


def _counter(obj: dict[str, Any], name: str, minimum: int) -> int:
    value = obj.get(name, minimum)
    if type(value) is not int or not minimum <= value <= MAX_COUNT:
        raise ValueError(f"{name} must be an int from {minimum} to {MAX_COUNT}, not {value!r}")
    return value


def _time(value: object, name: str) -> float:
    """A time in seconds since the epoch, finite (JSON holds no other)."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise ValueError(f"{name} must hold times (numbers), not {value!r}")
    try:
        seconds = float(value)
    except OverflowError:
        raise ValueError(f"{name} holds a time too large for a float: {value}") from None
    if not math.isfinite(seconds):
        raise ValueError(f"{name} holds {seconds}, which JSON cannot hold")
    return seconds


def _b64(text: object) -> bytes:
    if not isinstance(text, str):
        raise ValueError(f"expected a base64 string, not {text!r}")
    try:
        return base64.b64decode(text, validate=True)
    except binascii.Error as exc:
        raise ValueError(f"invalid base64 ({exc})") from None
