"""Reminders as data: what a record keeps, what a handler receives, and the arithmetic
of a delivery (DESIGN.md section 15).

A `StoredReminder` travels in its server's `Record`, so it is committed with the state
and rolled back with it. `deliver` says what one delivery is: the oldest tick due, how
many later ticks are folded into it (``missed``), and what is left to keep. Times here
are wall-clock timestamps (seconds since the epoch, as `time.time`); the runtime
turns them into trio deadlines.
"""

from __future__ import annotations

import datetime
import json
import math
from collections.abc import Iterable
from typing import Any

import attrs

#: Bounds on what a handler may set: a reminder is small bookkeeping, not a queue.
MAX_NAME = 200
MAX_PAYLOAD = 64 * 1024
MIN_EVERY = 0.001
MAX_REMINDERS = 1000
#: Due times a reminder may have: those a `datetime` can name (years 1 to 9999), so
#: that the arithmetic of a delivery stays exact enough (a float's spacing near 1e11
#: is 1e-5 s) and never overflows.
EARLIEST = -62_135_596_800.0
LATEST = 253_402_300_799.0
#: The longest period: a century.
MAX_EVERY = 100 * 365.25 * 86_400


@attrs.frozen
class Reminder:
    """What ``handle_info`` receives when the reminder *name* comes due.

    ``due`` is when this tick was due (a wall-clock timestamp, as `time.time`; it may
    be well before now if the server could not run then). ``missed`` counts the later
    ticks of a periodic reminder that also came due before this delivery: they are
    folded into this one, never delivered one by one. ``payload`` is the plain JSON
    data given to `PersistentServer.remind`.
    """

    name: str
    due: float
    payload: Any = None
    missed: int = 0


@attrs.frozen
class StoredReminder:
    """One reminder as its server's record keeps it: next due time, period (None: once),
    and the payload as JSON text."""

    name: str
    due: float
    every: float | None = None
    payload: str = "null"


@attrs.frozen(order=True)
class Due:
    """A server with reminders, as a store's due index lists it: the earliest due
    time among its reminders. Ordered by time, then kind and key."""

    due: float
    kind: str
    key: str


def make_reminder(
    name: str, at: datetime.datetime | float | None, after: float | None,
    every: float | None, payload: Any, now: float,
) -> StoredReminder:
    """Check the arguments of `PersistentServer.remind` and build the reminder:
    ``TypeError`` or ``ValueError`` saying what is wrong, before anything changes."""
    if not isinstance(name, str) or not name or len(name) > MAX_NAME:
        raise ValueError(f"a reminder's name is a non-empty str of at most {MAX_NAME} "
                         f"characters, not {name!r}")
    if at is not None and after is not None:
        raise TypeError(f"reminder {name!r}: give at= or after=, not both")
    if every is not None:
        every = _seconds(f"reminder {name!r}: every", every)
        if not MIN_EVERY <= every <= MAX_EVERY:
            raise ValueError(f"reminder {name!r}: every must be from {MIN_EVERY} s to a "
                             f"century ({MAX_EVERY:.0f} s), not {every}")
    if at is not None:
        due = _timestamp(name, at)
    elif after is not None:
        seconds = _seconds(f"reminder {name!r}: after", after)
        if seconds < 0:
            raise ValueError(f"reminder {name!r}: after must not be negative, not {after}")
        due = now + seconds
    elif every is not None:
        due = now + every
    else:
        raise TypeError(f"reminder {name!r}: say when, with at=, after= or every=")
    if not EARLIEST <= due <= LATEST:
        raise ValueError(f"reminder {name!r}: it would be due at {due!r}, outside the "
                         "times a datetime can name (years 1 to 9999)")
    return StoredReminder(name, due, every, encode_payload(name, payload))


def _seconds(what: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{what} is a number of seconds, not {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{what} must be finite, not {value!r}")
    return float(value)


def _timestamp(name: str, at: object) -> float:
    if isinstance(at, datetime.datetime):
        if at.tzinfo is None or at.utcoffset() is None:
            raise ValueError(f"reminder {name!r}: at= is a naive datetime, which names no "
                             "moment; give it a timezone (datetime.now(timezone.utc) + ...)")
        return at.timestamp()
    return _seconds(f"reminder {name!r}: at", at)


def encode_payload(name: str, payload: Any) -> str:
    """*payload* as JSON text, if it is plain JSON data that comes back equal (no
    tuples, no non-str keys, no NaN); else ``TypeError``."""
    try:
        text = json.dumps(payload, allow_nan=False, separators=(",", ":"))
        same = json.loads(text) == payload
    except (TypeError, ValueError, RecursionError) as exc:
        raise TypeError(f"reminder {name!r}: the payload must be plain JSON data (None, "
                        f"bool, int, float, str, list, dict with str keys): {exc}") from None
    if not same:
        raise TypeError(f"reminder {name!r}: the payload {payload!r} would not come back "
                        "as it is from JSON (a tuple or a non-str key?); use lists and "
                        "str keys")
    if len(text) > MAX_PAYLOAD:
        raise ValueError(f"reminder {name!r}: the payload is {len(text)} characters of "
                         f"JSON, over the {MAX_PAYLOAD} allowed")
    return text


def deliver(reminder: StoredReminder, now: float) -> tuple[Reminder, StoredReminder | None]:
    """The delivery of a due *reminder* at *now*: the `Reminder` to hand over, and
    what remains (the next tick of a periodic one, strictly after *now*; None for a
    one-off)."""
    payload = json.loads(reminder.payload)
    every = reminder.every
    if every is None:
        return Reminder(reminder.name, reminder.due, payload, 0), None
    missed = max(0, math.floor((now - reminder.due) / every))
    following = reminder.due + (missed + 1) * every
    if following <= now:  # rounded down onto now: the next tick is the one after
        missed += 1
        following = reminder.due + (missed + 1) * every
    if following <= now:  # beyond what the floats can tell apart: a period from now
        following = now + every
    return (Reminder(reminder.name, reminder.due, payload, missed),
            attrs.evolve(reminder, due=following))


def earliest(reminders: Iterable[StoredReminder]) -> float | None:
    """When the first of *reminders* is due (None: there are none)."""
    return min((r.due for r in reminders), default=None)


def with_reminder(
    reminders: tuple[StoredReminder, ...], reminder: StoredReminder
) -> tuple[StoredReminder, ...]:
    """*reminders* with *reminder* set (replacing one of its name), sorted by name."""
    kept = [r for r in reminders if r.name != reminder.name]
    if len(kept) >= MAX_REMINDERS:
        raise ValueError(f"a server keeps at most {MAX_REMINDERS} reminders; cancel some "
                         f"before setting {reminder.name!r}")
    return tuple(sorted((*kept, reminder), key=lambda r: r.name))


def without_reminder(
    reminders: tuple[StoredReminder, ...], name: str
) -> tuple[StoredReminder, ...]:
    return tuple(r for r in reminders if r.name != name)


# -- in a store ---------------------------------------------------------------------------


_ENCODER = json.JSONEncoder(allow_nan=False, separators=(",", ":"))


def pack_reminders(reminders: tuple[StoredReminder, ...]) -> str:
    """*reminders* as the JSON text a store keeps (``""`` for none). ``ValueError``
    for reminders that `unpack_reminders` would refuse to read back (a time out of its
    bounds, a name that is no str, names out of order): a store never writes what it
    cannot read. A payload is not parsed again here: those made by `make_reminder`
    and by an import are JSON by construction, and this runs for every write."""
    if not reminders:
        return ""
    for r in reminders:
        if not _readable(r.name, r.due, r.every, r.payload):
            raise ValueError(f"the reminder {r!r:.200} would not read back as it is")
    names = [r.name for r in reminders]
    if names != sorted(set(names)):
        raise ValueError("reminders are not sorted by name, or a name repeats")
    return _ENCODER.encode([[r.name, r.due, r.every, r.payload] for r in reminders])


def unpack_reminders(text: str) -> tuple[StoredReminder, ...]:
    """The reminders a store kept as *text*: ``ValueError`` if it is not what
    `pack_reminders` writes (a row edited by hand, a foreign writer)."""
    if not text:
        return ()
    try:
        items = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"reminders are not JSON: {exc}") from None
    if not isinstance(items, list):
        raise ValueError("reminders are not a JSON list")
    reminders = [_unpack_one(item) for item in items]
    names = [r.name for r in reminders]
    if names != sorted(set(names)):
        raise ValueError("reminders are not sorted by name, or a name repeats")
    return tuple(reminders)


def _readable(name: object, due: object, every: object, payload: object) -> bool:
    """Whether these are the fields of a reminder as `unpack_reminders` reads one
    (the payload's JSON aside)."""
    finite = (int, float)
    return (
        isinstance(name, str) and bool(name)
        and not isinstance(due, bool) and isinstance(due, finite)
        and EARLIEST <= due <= LATEST  # NaN and infinities fail too
        and (every is None or (isinstance(every, finite) and not isinstance(every, bool)
                               and MIN_EVERY <= every <= MAX_EVERY))
        and isinstance(payload, str)
    )


def _unpack_one(item: object) -> StoredReminder:
    if not (isinstance(item, list) and len(item) == 4):
        raise ValueError(f"a reminder is [name, due, every, payload], not {item!r:.80}")
    name, due, every, payload = item
    if not _readable(name, due, every, payload):
        raise ValueError(f"a reminder is [name, due, every, payload], not {item!r:.80}")
    try:
        json.loads(payload)
    except (ValueError, RecursionError):
        raise ValueError(f"reminder {name!r}: its payload is not JSON") from None
    return StoredReminder(name, float(due), None if every is None else float(every), payload)
