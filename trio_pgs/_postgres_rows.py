"""What crosses between trio-pgs and a row of the records table, checked both ways.

Going in, a kind and a key must be what PostgreSQL's text and the primary key's index
can hold (`check_ident`). Coming out, a row is a record only if it is one that
trio-pgs could have written (`decode`): a row changed by hand, or by a buggy tool, is
refused with `PersistenceError` naming it, for that server alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from ._errors import PersistenceError
from ._schedule import unpack_reminders
from ._store import MAX_COUNT, Record

#: The most bytes a kind and a key may take together: a btree index entry holds at
#: most 2,704 bytes (PostgreSQL's page size / 3), with room to spare for its header.
MAX_IDENT_BYTES = 2_600


def decode(row: Sequence[Any]) -> Record:
    """The record in a row of the records table (`sql.COLUMNS`), checked: what the
    schema cannot rule out (NULL data, NULL, non-finite or nested array items, an empty
    key, versions below 1) is refused with `PersistenceError`."""
    kind, key = row[0], row[1]
    try:
        problem = _problem(row)
    except (TypeError, ValueError) as exc:
        problem = f"{type(exc).__name__}: {exc}"
    if problem is not None:
        raise PersistenceError(
            f"{kind}/{key}: the stored row is not a valid trio-pgs record ({problem}); "
            "inspect or purge it"
        )
    _, _, version, epoch, _, data, state_version, updated_at, crashes, quarantined, \
        history, reminders = row
    return Record(
        kind=kind, key=key, data=bytes(data or b""), version=version,
        state_version=state_version, epoch=epoch, updated_at=updated_at,
        crashes=tuple(crashes), quarantined=quarantined, history=tuple(history),
        reminders=unpack_reminders(reminders),
    )


def _problem(row: Sequence[Any]) -> str | None:
    kind, key, version, epoch, deleted, data, state_version, updated_at, crashes, \
        _, history, reminders = row
    if not kind or not key:
        return "its kind or key is empty"
    if version < 1 or epoch < 0 or state_version < 1:
        return "its version or state_version is below 1, or its epoch below 0"
    if version > MAX_COUNT or epoch > MAX_COUNT:
        return f"its version or epoch is above {MAX_COUNT}: no room left for its writes"
    if data is None and not deleted:
        return "it has no data"
    if not all(type(t) is float and math.isfinite(t) for t in crashes):
        return "its crash times are not all numbers"
    if not all(type(old) is bytes for old in history):
        return "its history does not hold states only"
    if not math.isfinite(updated_at):
        return "its updated_at is not a number"
    try:
        unpack_reminders(reminders)
    except ValueError as exc:
        return f"its reminders are not what trio-pgs writes: {exc}"
    return None


def check_ident(kind: str, key: str) -> None:
    if not isinstance(kind, str) or not isinstance(key, str):
        raise TypeError("kinds and keys are strings")
    if "\x00" in kind or "\x00" in key:
        raise ValueError(f"PostgreSQL text cannot hold a NUL character: {kind!r}/{key!r}")
    try:
        size = len(kind.encode()) + len(key.encode())
    except UnicodeEncodeError:
        raise ValueError(
            f"PostgreSQL text holds UTF-8, which a lone surrogate is not: {kind!r}/{key!r}"
        ) from None
    if size > MAX_IDENT_BYTES:
        raise ValueError(
            f"a kind and key of {size} bytes in UTF-8 do not fit PostgreSQL's index of records "
            f"(at most {MAX_IDENT_BYTES} bytes together): {kind[:40]!r}/{key[:40]!r}..."
        )
    if not kind or not key:
        raise ValueError(f"a kind and a key are non-empty strings, not {kind!r}/{key!r}")


def check_idents(kinds: list[str], keys: list[str]) -> None:
    """`check_ident` of each kind and key (strings, by `sql.bulk`), at once for the
    usual ones: ASCII, no NUL, none empty, the longest kind and key fitting together."""
    joined = "".join(kinds) + "".join(keys)
    if not (
        joined.isascii() and "\x00" not in joined and min(map(len, kinds)) > 0
        and min(map(len, keys)) > 0
        and max(map(len, kinds)) + max(map(len, keys)) <= MAX_IDENT_BYTES
    ):
        for kind, key in zip(kinds, keys, strict=True):
            check_ident(kind, key)
