"""What the ``trio-pgs`` command prints: tables, messages, JSON, times, progress.

Everything printed goes through here, and every stored string (a kind, a key, a state,
a store's message about them) is printed escaped: a character that is not printable
(control characters, C1, DEL, bidi controls, line and paragraph separators, and the
rest of what `str.isprintable` refuses) would drive the terminal, forge table rows or
reorder text, so it is written as an escape instead. Text uses Python's escapes
(``\\x1b``, ``\\u202e``, ``\\n``, a backslash doubled), which bash's ``$'...'`` quoting
reads back; JSON uses JSON's (``\\u001b``), so it stays the same JSON.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from typing import Any

from .._store import Record

#: Import and export show progress on a terminal from this many records.
PROGRESS_MIN = 1000
_NAMED = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def escape(text: str) -> str:
    """*text* with every character that is not printable, and the backslash, escaped."""
    if text.isprintable() and "\\" not in text:
        return text
    return "".join(_escape_char(char) for char in text)


def _escape_char(char: str) -> str:
    if char in _NAMED:
        return _NAMED[char]
    if char.isprintable():
        return char
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def out(text: str) -> None:
    """Print *text*, escaped, on stdout."""
    print(escape(text))


def err(text: str) -> None:
    """Print *text*, escaped, on stderr."""
    print(escape(text), file=sys.stderr)


def err_json(text: str, value: Any, *, limit: int | None = None) -> None:
    """Print *text*, escaped, then *value* as JSON (`json_text`: it stays JSON), on one
    line of stderr; only the first *limit* characters of the JSON, if given."""
    shown = json_text(value)
    if limit is not None and len(shown) > limit:
        shown = f"{shown[:limit]}... ({len(shown)} characters; --meta prints them all)"
    print(escape(text) + shown, file=sys.stderr)


def json_text(value: Any, *, indent: int | None = None, ascii: bool = False) -> str:
    """*value* as JSON text safe for a terminal: printable text as it is (UTF-8, or
    escaped too if *ascii*), every other character as a JSON escape, so that the text
    parses to *value* still. `ValueError` if *value* holds a NaN or an infinity."""
    text = json.dumps(value, indent=indent, ensure_ascii=ascii, allow_nan=False)
    if text.replace("\n", "").isprintable():
        return text
    # json.dumps escapes C0 already; what it leaves raw (DEL, C1, bidi controls, line
    # separators, lone surrogates) can only be inside a string, where its \u escape
    # (four hex digits) means the same.
    return "".join(
        char if char.isprintable() or char == "\n" else _json_escape(char) for char in text
    )


def _json_escape(char: str) -> str:
    code = ord(char)
    if code < 0x10000:
        return f"\\u{code:04x}"
    code -= 0x10000  # as a surrogate pair, as JSON writes a character beyond the BMP
    return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"


def table(header: Sequence[str], rows: Iterable[Sequence[object]], numeric: set[int]) -> None:
    """Aligned columns on a terminal (the *numeric* ones right-aligned), tab-separated
    values when piped. Values are escaped, so a tab or a newline never splits a cell."""
    cells = [list(header), *([escape(str(value)) for value in row] for row in rows)]
    if not sys.stdout.isatty():
        for row in cells:
            print("\t".join(row))
        return
    widths = [max(len(row[column]) for row in cells) for column in range(len(header))]
    for row in cells:
        print("  ".join(
            cell.rjust(width) if column in numeric else cell.ljust(width)
            for column, (cell, width) in enumerate(zip(row, widths, strict=True))
        ).rstrip())


def iso(timestamp: float, *, zero: str | None = "-") -> str:
    """*timestamp* as an ISO 8601 time in UTC; *zero* for 0 (never set) unless it is
    None, and the number itself when no date can show it (NaN, infinite, beyond the
    year 9999)."""
    if not timestamp and zero is not None:
        return zero
    try:
        moment = datetime.fromtimestamp(timestamp, timezone.utc)
    except (ValueError, OverflowError, OSError):
        return repr(timestamp)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


#: The units of a span of time, largest first.
_UNITS = (("d", 86400), ("h", 3600), ("m", 60), ("s", 1))


def span(seconds: float, *, exact: bool = False) -> str:
    """A span of *seconds* (not negative) in days, hours, minutes and seconds: its two
    largest units, cut short ("3h 2m", "5m", "12s", "0s"); if *exact*, every unit, the
    seconds with their fraction ("1d 30s", "0.5s")."""
    if not math.isfinite(seconds):
        return repr(seconds)
    if exact:  # to the microsecond, so that 59.9999999 is never shown as "60s"
        seconds = round(seconds, 6)
    counts: list[tuple[int, str]] = []
    rest = int(seconds)
    for unit, size in _UNITS:
        count, rest = divmod(rest, size)
        counts.append((count, unit))
    if exact:
        last = f"{counts[-1][0] + seconds % 1:.6f}".rstrip("0").rstrip(".")
        shown = [f"{count}{unit}" for count, unit in counts[:-1] if count]
        shown += [f"{last}s"] if last != "0" else []
    else:
        first = next((n for n, (count, _) in enumerate(counts) if count), len(counts) - 1)
        shown = [f"{count}{unit}" for count, unit in counts[first : first + 2] if count]
    return " ".join(shown) or "0s"


def from_now(moment: float, now: float) -> str:
    """How far *moment* is from *now*: "in 3h 2m", or "5m ago (overdue)"."""
    if moment >= now:
        return f"in {span(moment - now)}"
    return f"{span(now - moment)} ago (overdue)"


def ident(kind: str, key: str) -> str:
    """A server's name in messages (raw: `out` and `err` escape it)."""
    return f"{kind}/{key}"


def status(record: Record) -> str:
    return "quarantined" if record.quarantined else "ok"


class Progress:
    """A count redrawn in place on stderr, when it is a terminal and the job is big."""

    def __init__(self, verb: str, total: int | None = None, *, quiet: bool = False) -> None:
        self.verb, self.total, self.count = verb, total, 0
        self._enabled = not quiet and sys.stderr.isatty()
        self._enabled &= total is None or total >= PROGRESS_MIN
        self._shown, self._next = False, 0.0

    def step(self, records: int = 1) -> None:
        self.count += records
        if not self._enabled or (self.total is None and self.count < PROGRESS_MIN):
            return
        if (now := time.monotonic()) >= self._next:
            self._next = now + 0.1
            self._draw()

    def _draw(self) -> None:
        of = "" if self.total is None else f"/{self.total}"
        sys.stderr.write(f"\r{self.verb} {self.count}{of} records")
        sys.stderr.flush()
        self._shown = True

    def done(self) -> None:
        if self._shown:
            self._draw()
            sys.stderr.write("\n")


