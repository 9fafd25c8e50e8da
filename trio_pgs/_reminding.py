"""One activation's reminders: what its handlers set, when the next one is due, and
what a crash or a refusal rolls back to (docs/reminders.md).

Rule of this module: a `ReminderBook` only keeps the reminders in memory; the
activation commits them with the state (`Record.reminders`), and a delivery advances
a reminder here, in the same change as the handler's own. Wall-clock times are turned
into trio deadlines with the supervisor's ``wall_offset`` (wall = trio time + offset),
so that trio's clocks, the autojump clock included, drive reminders too.
"""

from __future__ import annotations

import datetime
import math
from typing import TYPE_CHECKING, Any

import trio

from ._errors import PersistenceError
from ._schedule import (
    Reminder,
    StoredReminder,
    deliver,
    earliest,
    make_reminder,
    with_reminder,
    without_reminder,
)

if TYPE_CHECKING:
    from ._ref import ServerRef


def trio_time_of(wall: float, offset: float) -> float:
    """The first trio time at which the wall-clock time (trio time + *offset*) is
    *wall* or later: the deadline of a reminder due then. (``wall - offset`` alone may
    round a hair early, and a server woken at its deadline would find nothing due.)"""
    # The sum rounds to a step of wall's size: search between a step below and above.
    step = math.ulp(wall) + math.ulp(offset)
    low, high = wall - offset - 2 * step, wall - offset + 2 * step
    if low + offset >= wall or not high + offset >= wall:  # pragma: no cover
        return wall - offset  # not a bracket (values beyond any clock): plain
    while True:  # the smallest t with t + offset >= wall, to the last bit
        middle = low + (high - low) / 2
        if middle in (low, high):
            return high
        if middle + offset >= wall:
            high = middle
        else:
            low = middle


class ReminderBook:
    """The reminders of one activation (or of a ``start()`` running ``init``)."""

    __slots__ = ("_advanced", "_before", "_kept", "_offset", "_where", "current", "due_at")

    def __init__(
        self, committed: tuple[StoredReminder, ...], wall_offset: float, kept: bool,
        where: ServerRef,
    ) -> None:
        #: The reminders as the handlers left them (committed or not).
        self.current = committed
        self._offset = wall_offset
        self._kept = kept  # the store has a due index
        self._where = where
        #: At the start of the message being handled, and the same with the reminder
        #: it delivers advanced: what a crash and a refusal go back to.
        self._before = self._advanced = committed
        #: When the next reminder is due, in trio time (inf: none).
        self.due_at = self._deadline()

    def wall(self) -> float:
        return trio.current_time() + self._offset

    def _deadline(self) -> float:
        first = earliest(self.current)
        return math.inf if first is None else trio_time_of(first, self._offset)

    def remind(
        self, name: str, at: datetime.datetime | float | None, after: float | None,
        every: float | None, payload: Any,
    ) -> None:
        reminder = make_reminder(name, at, after, every, payload, self.wall())
        if not self._kept:
            raise PersistenceError(
                f"{self._where}: this supervisor's store keeps no reminders (it has no "
                "due index); use a store that does (DiskCacheStore, PostgresStore, "
                "MemoryStore)"
            )
        self.current = with_reminder(self.current, reminder)
        self.due_at = self._deadline()

    def cancel(self, name: str) -> None:
        if any(r.name == name for r in self.current):
            self.current = without_reminder(self.current, name)
            self.due_at = self._deadline()

    # -- around one message -----------------------------------------------------------

    def begin(self) -> None:
        """A message other than a reminder is about to be handled."""
        self._before = self._advanced = self.current

    def take_due(self) -> Reminder | None:
        """Begin the delivery of the reminder due first, if one is due: it is advanced
        now (removed, or moved to its next tick), so the handler may set it again."""
        now = self.wall()
        due = [r for r in self.current if r.due <= now]
        if not due:
            self.due_at = self._deadline()
            return None
        first = min(due, key=lambda r: (r.due, r.name))
        delivery, rest = deliver(first, now)
        self._before = self.current
        if rest is None:
            self.current = without_reminder(self.current, first.name)
        else:
            self.current = with_reminder(self.current, rest)
        self._advanced = self.current
        self.due_at = self._deadline()
        return delivery

    def crashed(self) -> None:
        """The message crashed: nothing it set stands, and the reminder it was
        delivering is due again (at-least-once)."""
        self.current = self._before
        self.due_at = self._deadline()

    def refused(self) -> None:
        """The message was refused (`RequestError`): what its handler set is dropped,
        but a reminder it was delivering counts as delivered."""
        self.current = self._advanced
        self.due_at = self._deadline()


class Starting:
    """What a server reaches as its activation while ``init`` runs: its ref and its
    reminders (committed with the first record); no timers yet."""

    __slots__ = ("book", "ref")

    def __init__(self, ref: ServerRef, wall_offset: float, kept: bool) -> None:
        self.ref = ref
        self.book = ReminderBook((), wall_offset, kept, ref)

    def send_after(self, delay: float, info: Any) -> None:
        raise RuntimeError(
            f"{self.ref}: send_after() in init() has no activation to deliver to yet; "
            "arm it in on_activate(), or use remind() for a durable reminder"
        )
