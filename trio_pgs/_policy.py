"""Persistence policies: when an activation's new states reach the store.

Rule of this module: each policy alone decides when a state is written, and alone
knows what is not written yet. The activation asks it three things: take this new
state (`changed`), settle what you owe before the server does anything else
(`settle`), and write everything now (`flush`, at hibernation, crash, stop and
shutdown).

- `EachMessage` (the default) hands every new state to the group-commit writer and
  lets the server go on: the writer's callback releases (or fails) the replies the
  ledger holds, and the server settles that commit before its next step. So the
  output gate holds, and the server is not resumed just to pass a reply on.
- `Deferred` (WRITE_BEHIND, ON_STOP) keeps the newest encoded state and writes it when
  due (``max_lag`` after the first unwritten change; never for ON_STOP) or at a flush.
  A write that meets a `ConflictError` can never succeed: the state is dropped and the
  activation must go back to the stored record (`conflicted`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any, Protocol

import trio

from ._errors import ConflictError
from ._ledger import ReplyLedger
from ._schedule import StoredReminder
from ._store import Record, next_record, put
from ._writer import Writer

logger = logging.getLogger("trio_pgs")


class Committer(Protocol):
    """What a policy needs from its activation."""

    record: Record
    ledger: ReplyLedger

    @property
    def reminders(self) -> tuple[StoredReminder, ...]:
        """Its reminders now: written with the next state."""

    def commit_settled(self, error: BaseException | None, touch: bool) -> None: ...


class InFlight:
    """A commit handed to the writer: done once its outcome is known. It is the
    writer's callback for that commit too (one object per commit, no closure)."""

    __slots__ = ("done", "error", "owner", "previous_state", "touch", "waiter")

    def __init__(self, owner: Committer, previous_state: Any, touch: bool) -> None:
        #: Told of the outcome; forgotten then (no cycle through its policy after).
        self.owner: Committer | None = owner
        #: The state before this commit's: what the server falls back to if it fails.
        self.previous_state = previous_state
        #: Whether the commit counts as activity (timer infos do not).
        self.touch = touch
        self.done = False
        self.error: BaseException | None = None
        self.waiter: trio.lowlevel.Task | None = None

    def __call__(self, error: BaseException | None) -> None:
        """The writer's callback: the commit's outcome (None: committed)."""
        owner, self.owner = self.owner, None
        assert owner is not None, "the writer calls back once"
        self.done, self.error = True, error
        owner.commit_settled(error, self.touch)
        if self.waiter is not None:
            task, self.waiter = self.waiter, None
            trio.lowlevel.reschedule(task)


class EachMessage:
    """Every changed state is committed before any reply that may depend on it."""

    __slots__ = ("_keep_history", "_state_version", "_writer", "inflight")

    due = math.inf  # nothing is ever written later
    pending = None
    conflicted: ConflictError | None = None

    def __init__(self, writer: Writer, state_version: int, keep_history: int) -> None:
        self._writer = writer
        self._state_version = state_version
        self._keep_history = keep_history
        self.inflight: InFlight | None = None

    def changed(
        self, owner: Committer, data: bytes, previous_state: Any, touch: bool = True
    ) -> None:
        """Hand *data* to the writer (the ledger keeps holding until it settles)."""
        old = owner.record
        record = next_record(
            old, data, self._state_version, self._keep_history, owner.reminders
        )
        owner.record = record
        inflight = self.inflight = InFlight(owner, previous_state, touch)
        self._writer.submit(put(record, old.version), inflight)

    def settled(self) -> bool:
        """Whether nothing is in flight, without waiting: the commit handed off last,
        if any, has committed (it is forgotten now). False: `settle` waits for it, or
        returns it with its error. (The hot path: usually committed by now.)"""
        inflight = self.inflight
        if inflight is None:
            return True
        if inflight.done and inflight.error is None:
            self.inflight = None
            return True
        return False

    async def settle(self) -> InFlight | None:
        """Wait for the commit in flight, if any (its outcome is usually known), and
        return it; the caller looks at its ``error``."""
        inflight = self.inflight
        if inflight is None:
            return None
        if not inflight.done:
            inflight.waiter = trio.lowlevel.current_task()

            def abort(_: Any) -> trio.lowlevel.Abort:
                inflight.waiter = None
                return trio.lowlevel.Abort.SUCCEEDED

            await trio.lowlevel.wait_task_rescheduled(abort)
        self.inflight = None
        return inflight

    async def flush(self, write: Callable[[bytes], Any]) -> bool:
        return True


class Deferred:
    """WRITE_BEHIND (``lag`` = ``max_lag``) and ON_STOP (``lag`` = inf): replies go out
    at once, and only the newest state is written, later."""

    __slots__ = ("_extra", "_lag", "_retry", "_where", "conflicted", "due", "pending")

    inflight = None

    def __init__(
        self, lag: float, retry: float, where: str, extra: dict[str, str] | None = None
    ) -> None:
        self._lag = lag
        self._retry = retry
        self._where = where  # the server, for log messages
        self._extra = extra  # its kind and key, as every record about one server has
        #: The newest encoded state not committed yet, and when it must be.
        self.pending: bytes | None = None
        self.due = math.inf
        #: A deferred write met this ConflictError: the activation's record is stale.
        self.conflicted: ConflictError | None = None

    def changed(
        self, owner: Committer, data: bytes, previous_state: Any, touch: bool = True
    ) -> None:
        unchanged = data == owner.record.data and owner.reminders is owner.record.reminders
        self.pending = None if unchanged else data
        if self.pending is not None and self.due == math.inf:
            self.due = trio.current_time() + self._lag

    def settled(self) -> bool:
        return True

    async def settle(self) -> None:
        return None

    async def flush(self, write: Callable[[bytes], Any]) -> bool:
        """Commit the pending state with *write*; on a store error keep it pending and
        retry after max_lag. Returns whether nothing is left pending."""
        data = self.pending
        if data is None:
            return True
        try:
            await write(data)
        except ConflictError as exc:
            # Another writer changed the record (the CLI, a second process): retrying
            # can never succeed. The unwritten state is dropped and the server reloads.
            logger.error("%s: a deferred write conflicts with the stored record (%s); the "
                         "unwritten state is dropped and the server reloads from the store",
                         self._where, exc, extra=self._extra)
            self.pending, self.due, self.conflicted = None, math.inf, exc
            return True
        except Exception:
            logger.exception("%s: a deferred write failed; it stays pending and is retried",
                             self._where, extra=self._extra)
            self.due = trio.current_time() + self._retry
            return False
        if self.pending is data:
            self.pending, self.due = None, math.inf
        return self.pending is None


Policy = EachMessage | Deferred
