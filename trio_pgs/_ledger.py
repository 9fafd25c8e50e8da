"""The reply ledger: the one place where an activation's callers are answered.

Rule of this module: no reply leaves a server before the states it may depend on are
committed (the output gate). A reply, whether the handler's own `Reply` or a deferred
one given through `Caller.reply` by any task, is *held* while the server is handling
a message or while a commit it handed to the writer is in flight, and released when
that commit succeeds (or when the handled message needed no commit); if the commit
fails, every held reply becomes that failure instead. With nothing handling and
nothing in flight, a reply goes out at once.

The ledger also keeps the callers owed a deferred reply, so that whatever ends the
activation (a crash, a stop, shutdown, a lost commit) answers each of them exactly
once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import outcome
import trio

if TYPE_CHECKING:
    from ._ref import ServerRef

ErrorFactory = Callable[[], BaseException]


class WaitEdge:
    """An edge of the wait-for graph: a server waits on *target* (its *waiting_on* list
    holds it) until `drop`. Whoever ends the wait drops it, before the waiter resumes
    (so that the server it waited on may call it back at once); the waiter drops it
    too, however its wait ended. Dropped once."""

    __slots__ = ("_target", "_waiting_on")

    def __init__(self, waiting_on: list[ServerRef], target: ServerRef) -> None:
        waiting_on.append(target)
        self._waiting_on: list[ServerRef] | None = waiting_on
        self._target = target

    def drop(self) -> None:
        if self._waiting_on is not None:
            waiting_on, self._waiting_on = self._waiting_on, None
            waiting_on.remove(self._target)


class ReplySlot:
    """Where one call's outcome goes. The caller may stop waiting (cancelled): the
    server still handles the request and the outcome is dropped."""

    __slots__ = ("_done", "_result", "_task", "edge")

    def __init__(self) -> None:
        self._task: trio.lowlevel.Task | None = None
        self._result: outcome.Outcome[Any] | None = None
        self._done = False
        #: The wait-for edge this call adds, from a handler: dropped as soon as the
        #: outcome is known, before the caller even resumes.
        self.edge: WaitEdge | None = None

    @property
    def done(self) -> bool:
        return self._done

    def set(self, result: outcome.Outcome[Any]) -> None:
        if self._done:
            return
        self._done = True
        if self.edge is not None:  # a call from a handler
            self.edge.drop()
        if self._task is not None:
            task, self._task = self._task, None
            trio.lowlevel.reschedule(task, result)
        else:
            self._result = result

    def set_error(self, error: BaseException) -> None:
        self.set(outcome.Error(error))

    @trio.lowlevel.enable_ki_protection
    async def wait(self) -> Any:
        """Wait for the outcome. KI-protected, and the task is forgotten however the
        wait ends: a task that left (a Ctrl-C landing just before it blocked) must
        never be rescheduled by a late `set`."""
        if self._result is not None:
            await trio.lowlevel.checkpoint()
            return self._result.unwrap()
        task = trio.lowlevel.current_task()

        def abort(_: Any) -> trio.lowlevel.Abort:
            self._task = None
            return trio.lowlevel.Abort.SUCCEEDED

        try:
            self._task = task
            return await trio.lowlevel.wait_task_rescheduled(abort)
        except BaseException:
            if self._task is task:  # it never blocked: nobody may reschedule it
                self._task = None
            raise


class Caller:
    """Token for a call whose reply is deferred; see `current_caller`.

    ``await caller.reply(value)`` delivers the reply. A reply given while the server
    handles a message, or while a state it produced is being committed, is released
    only after that state is committed (and fails with the commit's error if not).
    """

    __slots__ = ("_ledger", "_replied", "_slot")

    def __init__(self, ledger: ReplyLedger, slot: ReplySlot) -> None:
        self._ledger = ledger
        self._slot = slot
        self._replied = False

    @property
    def replied(self) -> bool:
        """Whether a reply (or an error) was given to this caller."""
        return self._replied

    async def reply(self, value: Any) -> None:
        """Deliver *value* to the caller (once; later replies are ignored)."""
        await trio.lowlevel.checkpoint()
        self._ledger.give(self, outcome.Value(value))


class Waker(Protocol):
    def wake(self) -> None: ...


class ReplyLedger:
    """Every reply of one activation: held, released or failed here and nowhere else."""

    __slots__ = ("_held", "_waker", "current", "holding", "owed")

    def __init__(self, waker: Waker) -> None:
        #: Whether replies wait for the outcome of the message being handled and of
        #: the commit in flight (False: a reply goes out at once). Set by the
        #: activation when a message's handler starts; cleared by release and fail.
        self.holding = False
        #: The replies waiting (made on the first one: most messages hold none).
        self._held: list[tuple[ReplySlot, outcome.Outcome[Any]]] | None = None
        # Dicts used as ordered sets: an empty dict is a third of an empty set.
        self.owed: dict[Caller, None] = {}
        #: The reply slot of the call handled last (set by the activation as its
        #: handler starts): the caller of the message whose outcome the held replies
        #: wait for. Any other held reply is a deferred one, to the caller of an
        #: earlier message, committed before.
        self.current: ReplySlot | None = None
        #: Woken when the last owed reply was given outside a handler: the server
        #: may hibernate now. (The entry itself: a bound method would cost an object
        #: per active server.)
        self._waker = waker

    def answer(self, slot: ReplySlot, result: outcome.Outcome[Any]) -> None:
        """The handler's own answer to the caller of its message: held like any reply."""
        if not self.holding:
            slot.set(result)
        elif self._held is None:
            self._held = [(slot, result)]
        else:
            self._held.append((slot, result))

    def reply(
        self, slot: ReplySlot, caller: Caller | None, result: outcome.Outcome[Any]
    ) -> None:
        """The handler's `Reply` to the caller of *slot*: held like any reply. *caller*
        is the caller's token if the handler took one (`current_caller`), else None."""
        if caller is not None:
            caller._replied = True
        self.answer(slot, result)

    def owe(self, caller: Caller) -> None:
        """The handler deferred its reply (`NoReply` without replying yet)."""
        if not caller._replied:
            self.owed[caller] = None

    def give(self, caller: Caller, result: outcome.Outcome[Any]) -> None:
        """A deferred reply, from any task: once per caller, held while holding."""
        if caller._replied:
            return
        caller._replied = True
        self.owed.pop(caller, None)
        if self.holding:
            self.answer(caller._slot, result)
        else:
            caller._slot.set(result)
            if not self.owed:
                self._waker.wake()

    def fail_now(self, slot: ReplySlot, error: ErrorFactory) -> None:
        """The caller of the message being handled gets *error*, held or not: its
        message ended the activation (crash, failed commit, cut off)."""
        if not slot.done:
            slot.set_error(error())

    def release(self) -> None:
        """What was held is committed (or needed no commit): deliver it."""
        self.holding = False
        held, self._held = self._held, None
        if held:
            for slot, result in held:
                slot.set(result)

    def fail_held(self, error: ErrorFactory, deferred: ErrorFactory | None = None) -> None:
        """What was held was not committed: its callers get *error* instead, or
        *deferred* (if given) those of deferred replies (to callers other than the
        `current` one), whose own requests were committed before: only the reply is
        lost. The current caller, if the failed message deferred its reply, gets
        *error* now: its request was not committed either."""
        self.holding = False
        current = self.current
        for caller in self.owed:
            if caller._slot is current:  # deferred by the message that failed
                del self.owed[caller]
                caller._replied = True
                caller._slot.set_error(error())
                break
        held, self._held = self._held, None
        if held:
            late = error if deferred is None else deferred
            for slot, _ in held:
                slot.set_error((error if slot is current else late)())

    def fail(self, error: ErrorFactory, deferred: ErrorFactory | None = None) -> None:
        """The activation ends: held replies and owed callers all get *error*, or
        *deferred* (if given) the callers of earlier, committed requests."""
        self.fail_held(error, deferred)
        self.fail_owed(error if deferred is None else deferred)

    def fail_owed(self, error: ErrorFactory) -> None:
        """The activation ends with a commit in flight: the callers still owed a reply
        get *error*; the held replies are left to that commit's outcome."""
        owed, self.owed = self.owed, {}
        for caller in owed:
            caller._replied = True
            caller._slot.set_error(error())
