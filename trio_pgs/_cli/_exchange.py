"""The export format: one JSON object per record (docs/cli.md, "Export format")."""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable
from typing import Any

import attrs

from .._encoding import dumps, loads
from .._ref import check_key
from .._server import check_kind
from .._store import Record
from ._exit import EXIT_USAGE, CommandError
from ._output import ident

_FIELDS = frozenset(field.name for field in attrs.fields(Record)) | {"data_base64"}


def record_to_json(record: Record) -> dict[str, Any]:
    """*record* as one object of the export: every field; the state as JSON when its
    bytes are exactly what trio-pgs writes for that JSON (else ``data_base64``), so
    an import restores the same bytes; the history base64."""
    exported: dict[str, Any] = {"kind": record.kind, "key": record.key}
    try:
        state = loads(record.data)
        readable = dumps(state) == record.data
    except (ValueError, TypeError):
        readable = False
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
    return exported


def record_from_json(obj: Any) -> Record:
    """The record an export object describes; `ValueError` says what is wrong."""
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    unknown = sorted(set(obj) - _FIELDS)
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(unknown)}")
    if ("data" in obj) == ("data_base64" in obj):
        raise ValueError("give the state as either data (JSON) or data_base64")
    history, crashes = obj.get("history", []), obj.get("crashes", [])
    if not isinstance(history, list):
        raise ValueError("history must be a list of base64 strings")
    if not isinstance(crashes, list) or not all(map(_is_number, crashes)):
        raise ValueError("crashes must be a list of times (numbers)")
    if not isinstance(obj.get("quarantined", False), bool):
        raise ValueError("quarantined must be true or false")
    try:
        data = _b64(obj["data_base64"]) if "data_base64" in obj else dumps(obj["data"])
        return Record(
            check_kind(obj.get("kind")),
            check_key(obj.get("key")),
            data,
            _int(obj, "version", 1, 1),
            _int(obj, "state_version", 1, 1),
            _int(obj, "epoch", 0, 0),
            _number(obj, "updated_at"),
            tuple(map(float, crashes)),
            obj.get("quarantined", False),
            tuple(map(_b64, history)),
        )
    except TypeError as exc:  # check_kind, check_key and dumps say what they refuse
        raise ValueError(str(exc)) from None


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _int(obj: dict[str, Any], name: str, default: int, minimum: int) -> int:
    value = obj.get(name, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, not {value!r}")
    return value


def _number(obj: dict[str, Any], name: str) -> float:
    value = obj.get(name, 0.0)
    if not _is_number(value):
        raise ValueError(f"{name} must be a number, not {value!r}")
    return float(value)


def _b64(text: object) -> bytes:
    if not isinstance(text, str):
        raise ValueError(f"expected a base64 string, not {text!r}")
    try:
        return base64.b64decode(text, validate=True)
    except binascii.Error as exc:
        raise ValueError(f"invalid base64 ({exc})") from None


def read_records(lines: Iterable[str], name: str) -> list[Record]:
    """Every record of an export, all checked before anything is written."""
    records: list[Record] = []
    seen: dict[tuple[str, str], int] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = record_from_json(json.loads(line))
        except ValueError as exc:  # json.JSONDecodeError included
            raise CommandError(f"{name}, line {number}: {exc}", EXIT_USAGE) from None
        name_ = (record.kind, record.key)
        if name_ in seen:
            raise CommandError(
                f"{name}, line {number}: {ident(record.kind, record.key)} is already on line "
                f"{seen[name_]}",
                EXIT_USAGE,
            )
        seen[name_] = number
        records.append(record)
    return records


