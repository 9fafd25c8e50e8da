"""A server's mailbox: many senders, one receiver, a bounded queue.

It keeps the semantics of a trio memory channel of the same capacity that the
runtime relies on (FIFO; a full mailbox makes `send` wait, its waiting senders served
in order; `send` and `receive` are checkpoints; a cancelled wait leaves nothing
behind) and drops what a mailbox does not need: closing, cloning, several receivers.
What that buys is the hot path's: one message handed straight to the waiting
receiver, or appended, with no lookup in a table of waiting tasks and no exception to
say it is empty (`next_queued`). Like trio's channels, every way in that changes it is
protected from KeyboardInterrupt (senders are user tasks): a Ctrl-C never lands
between taking the waiting receiver and waking it.

Only the entry's own task receives (its activations, one after another); a second
receiver waiting at the same time is a bug of ours, refused with `trio.BusyResourceError`.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import outcome
import trio
from trio.lowlevel import (
    Abort,
    Task,
    cancel_shielded_checkpoint,
    checkpoint_if_cancelled,
    current_task,
    enable_ki_protection,
    reschedule,
    wait_task_rescheduled,
)

T = TypeVar("T")


class Mailbox(Generic[T]):
    """At most *capacity* queued items (>= 1), and the senders waiting for room."""

    __slots__ = ("_capacity", "_items", "_receiver", "_senders")

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"a mailbox holds at least one message, not {capacity!r}")
        self._capacity = capacity
        self._items: deque[T] = deque()
        #: The task waiting in `receive`, if any (then nothing is queued).
        self._receiver: Task | None = None
        #: The tasks waiting in `send` for room, in order, with what each sends and
        #: what to call when it is let in.
        self._senders: OrderedDict[Task, tuple[T, Callable[[], None] | None]] = OrderedDict()

    def __len__(self) -> int:
        """How many items are queued (not counting the waiting senders')."""
        return len(self._items)

    @property
    def receiver_waiting(self) -> bool:
        return self._receiver is not None

    @property
    def senders_waiting(self) -> int:
        return len(self._senders)

    # -- sending --------------------------------------------------------------------

    @enable_ki_protection
    def send_nowait(self, item: T) -> None:
        """Hand *item* to the waiting receiver, or queue it; `trio.WouldBlock` if the
        mailbox is full."""
        receiver = self._receiver
        if receiver is not None:
            self._receiver = None
            reschedule(receiver, outcome.Value(item))
        elif len(self._items) < self._capacity:
            self._items.append(item)
        else:
            raise trio.WouldBlock

    @enable_ki_protection
    async def send(self, item: T, admitted: Callable[[], None] | None = None) -> None:
        """`send_nowait`, waiting for room while the mailbox is full (after the
        senders that waited before). *admitted* is called if it waits, the moment its
        item is let in (before it resumes): it must not raise."""
        await checkpoint_if_cancelled()
        try:
            self.send_nowait(item)  # full while senders wait: none is overtaken
        except trio.WouldBlock:
            pass
        else:
            await cancel_shielded_checkpoint()
            return
        task = current_task()
        self._senders[task] = (item, admitted)

        def abort(_: Any) -> Abort:
            del self._senders[task]
            return Abort.SUCCEEDED

        await wait_task_rescheduled(abort)

    # -- lending the receiver's turn (`Activation.handle_inline`) ---------------------

    def take_receiver(self) -> Task | None:
        """The waiting receiver, now marked as not waiting (None if none waits): what
        is sent meanwhile is queued, and nobody but the taker wakes it. The taker must
        `give_back`, with no checkpoint in between."""
        receiver, self._receiver = self._receiver, None
        return receiver

    def give_back(self, receiver: Task, first: T | None = None) -> None:
        """*receiver*, taken with `take_receiver`, waits again, unless *first* is given
        (handed to it, ahead of anything queued meanwhile) or something was queued
        (the first such item is handed to it)."""
        if first is None:
            first = self.next_queued()
            if first is None:
                self._receiver = receiver
                return
        reschedule(receiver, outcome.Value(first))

    # -- receiving ------------------------------------------------------------------

    @enable_ki_protection
    def next_queued(self) -> T | None:
        """The next item if there is one (the mailbox holds no None), else None."""
        items = self._items
        if not items:
            return None
        item = items.popleft()
        if self._senders:
            self._admit()
        return item

    def receive_nowait(self) -> T:
        """The next item; `trio.WouldBlock` if there is none."""
        item = self.next_queued()
        if item is None:
            raise trio.WouldBlock
        return item

    @enable_ki_protection
    async def receive(self) -> T:
        """The next item, waiting for one."""
        await checkpoint_if_cancelled()
        item = self.next_queued()
        if item is not None:
            await cancel_shielded_checkpoint()
            return item
        if self._receiver is not None:
            raise trio.BusyResourceError("another task is receiving from this mailbox")
        task = self._receiver = current_task()

        def abort(_: Any) -> Abort:
            if self._receiver is task:
                self._receiver = None
            return Abort.SUCCEEDED

        return await wait_task_rescheduled(abort)  # type: ignore[no-any-return]

    def _admit(self) -> None:
        """Room was made: the first waiting sender's item joins the queue (called
        from `next_queued`, whose protection from KeyboardInterrupt covers it)."""
        task, (item, admitted) = self._senders.popitem(last=False)
        self._items.append(item)
        reschedule(task)
        if admitted is not None:
            admitted()
