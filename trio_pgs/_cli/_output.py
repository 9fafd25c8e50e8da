"""What the ``trio-pgs`` command prints: tables, times, server names, progress."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone

from .._store import Record

#: Import and export show progress on a terminal from this many records.
PROGRESS_MIN = 1000
_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def table(header: Sequence[str], rows: Iterable[Sequence[object]], numeric: set[int]) -> None:
    """Aligned columns on a terminal (the *numeric* ones right-aligned), tab-separated
    values when piped. Backslashes, tabs and newlines in values are escaped."""
    cells = [list(header), *([str(value).translate(_ESCAPES) for value in row] for row in rows)]
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


def iso(timestamp: float) -> str:
    if not timestamp:
        return "-"
    return datetime.fromtimestamp(timestamp, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def ident(kind: str, key: str) -> str:
    """A server's name in messages, with its control characters escaped."""
    return f"{kind}/{key}".translate(_ESCAPES)


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


