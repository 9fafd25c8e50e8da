"""`Wakeups`: the one task that activates dormant servers whose reminders are due.

Rule of this module: it keeps no timer per server and reads no record. It asks the
store's due index (`SupportsReminders.due`) which servers have a reminder due, wakes
each one through the supervisor (which activates it, on the node that owns it), and
sleeps until the next due time. The activation delivers the reminders itself (see
`_reminding.py`), so this task only has to get dormant servers running.

A server it woke is not woken again for the same due time until its entry has ended:
then, if the entry left a reminder due (its activation failed, or it crashed), it is
tried again after a backoff, never in a busy loop.
"""

from __future__ import annotations

import enum
import logging
import math
from collections.abc import Callable, Sequence

import trio

from ._calls import current_handling
from ._schedule import Due
from ._store import SupportsReminders

logger = logging.getLogger("trio_pgs")

#: At most this long between two looks at the index: reminders written by another
#: process (the CLI, another node) are seen within it.
POLL = 30.0
#: Index entries read per query: the first query reads FIRST_PAGE (usually the next
#: entry is not due yet, and one is all it takes to know when to look again), each
#: next one twice as many, up to PAGE.
FIRST_PAGE = 16
PAGE = 500
#: A server whose due reminder was not delivered is tried again after this, doubled
#: at each failure up to BACKOFF_MAX.
BACKOFF = 1.0
BACKOFF_MAX = 60.0
#: A due server another node owns: looked at again after this (sooner if the members
#: change), in case its owner is gone.
NOT_MINE_AGAIN = 5.0


class Woken(enum.Enum):
    WOKEN = "woken"  # activated (or active already): it delivers its reminders
    NOT_MINE = "not mine"  # another cluster node serves it
    CLOSED = "closed"  # the supervisor is shutting down


class _Held:
    """A due server that was woken or passed over, and until when to leave it."""

    __slots__ = ("due", "failures", "retry_at")

    def __init__(self, due: float, retry_at: float) -> None:
        self.due = due
        self.retry_at = retry_at  # wall clock; inf while its entry runs
        self.failures = 0


class Wakeups:
    """Wakes the dormant servers of *kinds* whose reminders are due."""

    def __init__(
        self,
        store: SupportsReminders,
        kinds: Callable[[], Sequence[str]],
        wall: Callable[[], float],
        wake: Callable[[str, str], Woken],
    ) -> None:
        self._store = store
        self._kinds = kinds
        self._wall = wall
        self._wake = wake
        self._held: dict[tuple[str, str], _Held] = {}
        self._kick = trio.Event()
        #: When the task means to look again (wall clock).
        self._next = -math.inf
        self.woken = 0

    def ended(self, kind: str, key: str, due: float | None) -> None:
        """The entry of (*kind*, *key*) ended; *due*: when its first committed reminder
        is due (None: none, or not known)."""
        now = self._wall()
        held = self._held.pop((kind, key), None)
        if held is not None and (due is None or due == held.due):
            # Woken for a reminder that is still due as it was (or may be): not
            # delivered. (Due at another time, it was: the next tick may be due now.)
            held.failures += 1
            held.retry_at = now + min(BACKOFF_MAX, BACKOFF * 2 ** (held.failures - 1))
            self._held[(kind, key)] = held
            due = held.retry_at
        if due is not None and due < self._next:
            self.kick()

    def untried(self, kind: str, key: str) -> None:
        """The entry of (*kind*, *key*) ended without trying to deliver anything: a
        `start` that found the record (`AlreadyStarted`), whose entry the index saw
        as the server woken. Wake it again at once: no failure, no backoff."""
        if self._held.pop((kind, key), None) is not None:
            self.kick()

    def kick(self) -> None:
        """Look at the index now: the members changed, a server was released."""
        self._kick.set()

    def members_changed(self) -> None:
        """Servers passed over as another node's may be this node's now."""
        for ident, held in list(self._held.items()):
            if held.retry_at != math.inf:
                del self._held[ident]
        self.kick()

    @trio.lowlevel.enable_ki_protection
    async def run(self) -> None:
        """The task (KI-protected, as every task of the supervisor's: a Ctrl-C goes to
        the application's own code, whose exit from the supervisor shuts it down)."""
        current_handling.set(None)  # it inherited its spawner's context
        while True:
            self._kick = trio.Event()
            try:
                self._next = await self._wake_due()
            except Exception:
                logger.exception("reminders: the store's due index could not be read; "
                                 "trying again in %s s", BACKOFF)
                self._next = self._wall() + BACKOFF
            if self._next == -math.inf:
                return  # the supervisor is closing
            delay = max(0.0, self._next - self._wall())
            with trio.move_on_after(delay):
                await self._kick.wait()

    async def _wake_due(self) -> float:
        """Wake every due server; return when to look again (-inf: stop)."""
        now = self._wall()
        kinds = self._kinds()
        look_again = now + POLL
        after: Due | None = None
        seen: set[tuple[str, str]] = set()
        limit = FIRST_PAGE
        while True:
            page = await self._store.due(kinds, after=after, limit=limit)
            for entry in page:
                if entry.due > now:
                    self._prune(seen)
                    return min(look_again, entry.due)
                seen.add((entry.kind, entry.key))
                retry_at = self._visit(entry, now)
                if retry_at == -math.inf:
                    return retry_at
                look_again = min(look_again, retry_at)
            if len(page) < limit:
                self._prune(seen)
                return look_again
            after = page[-1]
            limit = min(PAGE, 2 * limit)

    def _prune(self, seen: set[tuple[str, str]]) -> None:
        """Forget the servers passed over that are due no more (delivered elsewhere,
        or stopped); those woken here stay held until their entry ends."""
        for ident in [i for i, held in self._held.items()
                      if held.retry_at != math.inf and i not in seen]:
            del self._held[ident]

    def _visit(self, entry: Due, now: float) -> float:
        """Wake the server of a due *entry* unless it is held; return when it may
        need a look again (inf: when its entry ends)."""
        ident = (entry.kind, entry.key)
        held = self._held.get(ident)
        if held is not None and held.due == entry.due and held.retry_at > now:
            return held.retry_at
        woken = self._wake(entry.kind, entry.key)
        if woken is Woken.CLOSED:
            return -math.inf
        if held is None or held.due != entry.due:
            held = self._held[ident] = _Held(entry.due, math.inf)
        if woken is Woken.NOT_MINE:
            held.retry_at = now + NOT_MINE_AGAIN
        else:
            held.retry_at = math.inf
            self.woken += 1
        return held.retry_at
