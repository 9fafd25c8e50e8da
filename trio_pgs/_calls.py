"""Messages, reply slots, the call chain and deferred replies."""

from __future__ import annotations

import contextvars
import enum
from typing import TYPE_CHECKING, Any

import outcome
import trio

if TYPE_CHECKING:
    from ._activation import Activation
    from ._ref import ServerRef


class Kind(enum.Enum):
    CALL = "call"
    CAST = "cast"
    INFO = "info"
    TIMER = "timer"
    STOP = "stop"
    CRASH = "crash"  # trio_pgs.testing.crash(): raise SimulatedCrash in the server
    WAKE = "wake"  # not a message: the idle reaper or the supervisor wakes the server


class ReplySlot:
    """Where one call's outcome goes. The caller may stop waiting (cancelled): the
    server still handles the request and the outcome is dropped."""

    __slots__ = ("_done", "_result", "_task", "edge")

    def __init__(self) -> None:
        self._task: trio.lowlevel.Task | None = None
        self._result: outcome.Outcome[Any] | None = None
        self._done = False
        #: The wait-for edge (the calling server's list, the callee) this call adds;
        #: removed as soon as the outcome is known, before the caller even resumes.
        self.edge: tuple[list[ServerRef], ServerRef] | None = None

    @property
    def done(self) -> bool:
        return self._done

    def set(self, result: outcome.Outcome[Any]) -> None:
        if self._done:
            return
        self._done = True
        self.drop_edge()
        if self._task is not None:
            task, self._task = self._task, None
            trio.lowlevel.reschedule(task, result)
        else:
            self._result = result

    def drop_edge(self) -> None:
        if self.edge is not None:
            waiting_on, target = self.edge
            self.edge = None
            waiting_on.remove(target)

    def set_error(self, error: BaseException) -> None:
        self.set(outcome.Error(error))

    async def wait(self) -> Any:
        if self._result is not None:
            await trio.lowlevel.checkpoint()
            return self._result.unwrap()
        self._task = trio.lowlevel.current_task()

        def abort(_: Any) -> trio.lowlevel.Abort:
            self._task = None
            return trio.lowlevel.Abort.SUCCEEDED

        return await trio.lowlevel.wait_task_rescheduled(abort)


class Message:
    __slots__ = ("chain", "kind", "payload", "slot")

    def __init__(
        self,
        kind: Kind,
        payload: Any,
        slot: ReplySlot | None,
        chain: tuple[ServerRef, ...],
    ) -> None:
        self.kind = kind
        self.payload = payload
        self.slot = slot
        self.chain = chain


class Caller:
    """Token for a call whose reply is deferred; see `current_caller`.

    ``await caller.reply(value)`` delivers the reply. A reply given while the server
    handles a message is released only after that message's state is committed.
    """

    __slots__ = ("_activation", "_replied", "_slot")

    def __init__(self, activation: Activation, slot: ReplySlot) -> None:
        self._activation = activation
        self._slot = slot
        self._replied = False

    @property
    def replied(self) -> bool:
        """Whether a reply (or an error) was given to this caller."""
        return self._replied

    async def reply(self, value: Any) -> None:
        """Deliver *value* to the caller (once; later replies are ignored)."""
        await trio.lowlevel.checkpoint()
        self._activation.release(self, outcome.Value(value))


class Handling:
    """What the server task is doing now: set in a context variable per message."""

    __slots__ = ("caller", "chain", "waiting_on")

    def __init__(
        self,
        chain: tuple[ServerRef, ...],
        caller: Caller | None,
        waiting_on: list[ServerRef],
    ) -> None:
        self.chain = chain
        self.caller = caller
        #: The servers this server's handler is waiting on now (its entry's list).
        self.waiting_on = waiting_on


current_handling: contextvars.ContextVar[Handling | None] = contextvars.ContextVar(
    "trio_pgs_handling", default=None
)


def current_chain() -> tuple[ServerRef, ...]:
    handling = current_handling.get()
    return () if handling is None else handling.chain


def current_caller() -> Caller:
    """The caller of the `handle_call` running now, to reply to later.

    Return ``NoReply(state)`` from `handle_call`, keep the token, and
    ``await caller.reply(value)`` from a later message (or a task). A server that
    owes replies does not hibernate; if it crashes, its callers get `ServerCrashed`.
    """
    handling = current_handling.get()
    if handling is None or handling.caller is None:
        raise RuntimeError("current_caller() is only available inside handle_call")
    return handling.caller
