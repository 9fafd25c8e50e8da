"""Idle deadlines of the active servers, kept by one task per supervisor.

Waiting for a message with a deadline of its own (a `trio.CancelScope` per wait) cost
about a sixth of the trio thread's time per message. Instead, a server waits without
a deadline, and the supervisor's reaper wakes it when its idle timeout may have passed:

- Per distinct ``idle_timeout``, the active servers are kept in an ordered dict in the
  order of their last handled message. Recording a message is one ``move_to_end``; the
  first server of each dict is the next one due. No structure holds dormant servers.
- The reaper sleeps until the earliest due time. Then it takes every server that is
  due out of its dict and wakes it if it is waiting for a message. The server decides
  for itself whether to hibernate (idle long enough, nothing owed); a server busy at
  its due time checks again when it next waits.
- The rare deadline that does not follow the order of activity (a server whose last
  owed reply was given by another task) goes to a small heap.

The reaper may wake a server early, never late: it reads the time of its last message
when it wakes it, and the server checks the time again itself.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import OrderedDict
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from ._entry import Entry


class IdleReaper:
    def __init__(self) -> None:
        self._groups: dict[float, OrderedDict[Entry, None]] = {}
        self._irregular: list[tuple[float, int, Entry]] = []
        self._order = itertools.count()
        self._scope: trio.CancelScope | None = None
        self._next = math.inf

    def touch(self, entry: Entry, timeout: float | None) -> None:
        """*entry* handled a message now (its ``last_activity``): the hot path. A
        server that never hibernates (*timeout* None) has no deadline."""
        if timeout is None:
            return
        group = entry.idle_group
        if group is not None:
            group.move_to_end(entry)
            return
        group = self._groups.get(timeout)
        if group is None:
            group = self._groups[timeout] = OrderedDict()
        group[entry] = None
        entry.idle_group = group
        self._wake_by(entry.last_activity + timeout)

    def check_at(self, entry: Entry, due: float) -> None:
        """Wake *entry* at *due*, out of the order of activity."""
        if entry.check_due != due:
            entry.check_due = due
            heapq.heappush(self._irregular, (due, next(self._order), entry))
            self._wake_by(due)

    def forget(self, entry: Entry) -> None:
        group = entry.idle_group
        if group is not None:
            entry.idle_group = None
            del group[entry]

    def _wake_by(self, due: float) -> None:
        if due < self._next:
            self._next = due
            if self._scope is not None:
                self._scope.deadline = due

    @trio.lowlevel.enable_ki_protection
    async def run(self) -> None:
        while True:
            now = trio.current_time()
            next_due = math.inf
            for timeout, group in self._groups.items():
                while group:
                    entry = next(iter(group))
                    due = entry.last_activity + timeout
                    if due > now:
                        next_due = min(next_due, due)
                        break
                    del group[entry]
                    entry.idle_group = None
                    entry.wake()
            irregular = self._irregular
            while irregular and irregular[0][0] <= now:
                _, _, entry = heapq.heappop(irregular)
                entry.check_due = None
                entry.wake()
            if irregular:
                next_due = min(next_due, irregular[0][0])
            self._next = next_due
            try:
                with trio.CancelScope(deadline=next_due) as self._scope:
                    await trio.sleep_forever()
            finally:
                self._scope = None  # also when cancelled: touch() must not reach it
