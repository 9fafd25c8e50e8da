"""The entry: a server that is active or in transition, and its mailbox.

The supervisor keeps one `Entry` per server that is active or in transition; the
mailbox belongs to the entry, not to a task, so a message sent while the server is
activating or hibernating waits in it and is handled in order. An entry is removed in
one synchronous step, and only when its mailbox is empty: that is what makes "exactly
one activation" and "no message lost" hold without locks.
"""

from __future__ import annotations

import enum
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

import attrs
import trio

from ._calls import Kind, Message
from ._encoding import Codec
from ._errors import (
    NotOwner,
    ServerNotFound,
    ServerQuarantined,
    SupervisorNotRunning,
)
from ._events import EventType, Tracing
from ._ledger import ErrorFactory, ReplySlot, WaitEdge
from ._mailbox import Mailbox
from ._server import Options, PersistentServer
from ._store import Claim, Store
from ._writer import Writer

if TYPE_CHECKING:
    from ._ref import ServerRef

logger = logging.getLogger("trio_pgs")


@attrs.frozen
class KindInfo:
    """A registered server class, with its options and codec under one supervisor."""

    cls: type[PersistentServer[Any]]
    options: Options
    codec: Codec


class Counters:
    """What `PersistentSupervisor.statistics` reports, counted where it happens."""

    __slots__ = (
        "activations", "crashes", "hibernations", "messages", "migrations", "quarantined",
        "refusals", "reminders", "stops", "woken_by_reminders",
    )

    def __init__(self) -> None:
        self.activations = self.hibernations = self.crashes = self.stops = 0
        self.messages = self.quarantined = self.migrations = self.refusals = 0
        self.reminders = self.woken_by_reminders = 0


class Host(Protocol):
    """What a server's entry and activation need from the supervisor they run in:
    the small surface between the runtime and `PersistentSupervisor`."""

    store: Store
    writer: Writer
    counters: Counters
    max_active: int | None
    #: Wall-clock time is trio time plus this (reminders are due in wall-clock time).
    wall_offset: float
    #: Whether the store keeps reminders (has a due index).
    reminders_kept: bool
    #: The ``on_event`` hook's tracing of messages, if any.
    tracing: Tracing | None

    #: Whether this node serves the server now (always, outside a cluster).
    owns: Callable[[ServerRef], bool]

    async def claim(self, kind: str, key: str) -> Claim:
        """Claim a server before activating it (`SupportsClaims`, or a plain load),
        once no release or rollback of its record is under way."""

    def touch(self, entry: Entry, idle_timeout: float | None) -> None:
        """*entry* handled a message now: its idle deadline and recency move."""

    def check_idle_at(self, entry: Entry, due: float) -> None:
        """Wake *entry* at *due* to check its idle deadline (out of activity order)."""

    def note_settled(self, entry: Entry | None = None) -> None:
        """*entry* began waiting for a message (None: one ended)."""

    def forget(self, entry: Entry) -> None:
        """*entry* ended (synchronously, with an empty mailbox)."""

    def emit(self, type: EventType, ref: ServerRef | None, **fields: Any) -> None:
        """Pass a `ServerEvent` to the ``on_event`` hook, if any."""

    def note_crash(self, ref: ServerRef, quarantined: bool, error: BaseException) -> None:
        """Count a crash (and escalate, if asked to)."""

    def note_unflushed(self, ref: ServerRef) -> None:
        """*ref*'s last state could not be committed at shutdown."""

    def interrupt(self, error: BaseException) -> None:
        """A KeyboardInterrupt or SystemExit: shut everything down, then raise it."""

    def spawn(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """Run *fn* in the supervisor's nursery."""


#: Not a message: tells a waiting server to check its idle deadline and shutdown.
WAKE = Message(Kind.WAKE, None, None, ())


#: What an entry's ``activated`` becomes once set: one shared Event, already set.
_ACTIVATED = trio.Event()
_ACTIVATED.set()


class Status(enum.Enum):
    ACTIVATING = "activating"
    ACTIVE = "active"
    HIBERNATING = "hibernating"
    ENDED = "ended"


class Next(enum.Enum):
    CONTINUE = "continue"
    REACTIVATE = "reactivate"
    END = "end"


class StartRequest:
    __slots__ = ("args", "slot")

    def __init__(self, args: tuple[Any, ...], slot: ReplySlot) -> None:
        self.args = args
        self.slot = slot


class Entry:
    """A server that is active or in transition, and its mailbox."""

    # Slots: an active server's memory is mostly its entry, its activation and its task.
    __slots__ = (
        "activated",
        "activation",
        "activation_error",
        "activation_waits",
        "check_due",
        "front",
        "hibernate_now",
        "host",
        "idle_group",
        "info",
        "last_activity",
        "mailbox",
        "ref",
        "retry_now",
        "shutting_down",
        "start",
        "status",
        "task_scope",
        "waiting_on",
    )

    def __init__(
        self,
        host: Host,
        info: KindInfo,
        ref: ServerRef,
        start: StartRequest | None = None,
    ) -> None:
        self.host = host
        self.info = info
        self.ref = ref
        self.mailbox: Mailbox[Message] = Mailbox(info.options.mailbox_size)
        self.status = Status.ACTIVATING
        self.activated = trio.Event()
        self.activation_error: ErrorFactory | None = None
        #: The wait-for edges of handlers waiting for this activation (a cast to a
        #: dormant server): dropped when it ends, before they resume.
        self.activation_waits: list[WaitEdge] | None = None
        self.start = start
        self.shutting_down = False
        #: Set by `wake` while a failed write is retried later: retry it now.
        self.retry_now: trio.Event | None = None
        #: Set by the supervisor above max_active: hibernate at the next wait.
        self.hibernate_now = False
        #: Kept by the supervisor's IdleReaper: the time of the last handled message
        #: (timer infos excepted), the reaper's dict this entry is in, if any, and the
        #: due time of an irregular check, if one is scheduled.
        self.last_activity = 0.0
        self.idle_group: OrderedDict[Entry, None] | None = None
        self.check_due: float | None = None
        self.task_scope: trio.CancelScope | None = None
        #: The running activation (an `Activation`), if any.
        self.activation: Any = None
        #: Servers this one's handler is calling now: the edges of the wait-for graph.
        self.waiting_on: list[ServerRef] = []
        #: A message taken from the mailbox but not handled (the commit before it
        #: failed): the next activation handles it first.
        self.front: Message | None = None

    def __repr__(self) -> str:
        return f"<Entry {self.ref} {self.status.value}>"

    @property
    def extra(self) -> dict[str, str]:
        """For log records: the server's kind and key."""
        return {"kind": self.ref.kind, "key": self.ref.key}

    def mark_activated(self) -> None:
        """Wake whoever waits for the activation, and drop the entry's own Event."""
        event, self.activated = self.activated, _ACTIVATED
        event.set()
        waits, self.activation_waits = self.activation_waits, None
        for edge in waits or ():
            edge.drop()

    def waiting(self) -> bool:
        """Whether the server is waiting for a message (so its mailbox is empty)."""
        return self.mailbox.receiver_waiting

    def wake(self) -> None:
        """Make the server re-check, now, whether to hibernate or shut down, if it is
        waiting for a message (a busy server checks when it next waits), or retry a
        failed write it waits to retry."""
        if self.waiting():
            self.mailbox.send_nowait(WAKE)  # handed straight to the waiting task
        elif self.retry_now is not None:
            self.retry_now.set()

    def mailbox_empty(self) -> bool:
        return self.front is None and not self.mailbox

    def end(self, error: ErrorFactory) -> None:
        """Fail what is still queued with *error* and forget the entry. Synchronous,
        so no message can slip in between the last check and the removal."""
        dropped = 0
        while True:
            if self.front is not None:
                message, self.front = self.front, None
            else:
                queued = self.mailbox.next_queued()
                if queued is None:
                    break
                message = queued
            if message.slot is not None:
                message.slot.set_error(error())
            elif message.kind is Kind.RESUME:  # its call is the activation's current
                message.payload.close()  # never run: not left for the garbage collector
            else:
                dropped += 1
        if dropped and not isinstance(error(), NotOwner):  # those are sent again
            logger.warning("%s: %d queued cast/info message(s) dropped: %s",
                           self.ref, dropped, error(), extra=self.extra)
        self.status = Status.ENDED
        self.host.forget(self)
        if not self.activated.is_set():
            self.activation_error = error
            self.mark_activated()


def not_owner(ref: ServerRef) -> ErrorFactory:
    return lambda: NotOwner(f"{ref}: this node does not serve it now")


def not_running(ref: ServerRef) -> ErrorFactory:
    return lambda: SupervisorNotRunning(
        f"{ref}: the supervisor {ref.supervisor!r} shut down before this message was "
        "handled; open it again and retry"
    )


def not_found(ref: ServerRef) -> ErrorFactory:
    return lambda: ServerNotFound(
        f"{ref}: no such server (never started, or stopped normally); "
        "start it with supervisor.start()"
    )


def quarantined_error(ref: ServerRef) -> ErrorFactory:
    return lambda: ServerQuarantined(
        f"{ref} is quarantined: it crashed too often (max_crashes within crash_window). "
        "Fix the cause, then `await supervisor.release(ref)`, or "
        "`await supervisor.rollback(ref)` to an earlier state (keep_history)"
    )
