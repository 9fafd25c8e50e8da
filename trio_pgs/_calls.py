"""Messages, and what a server task is handling now (the call chain)."""

from __future__ import annotations

import contextvars
import enum
from typing import TYPE_CHECKING, Any

from ._ledger import Caller, ReplySlot

if TYPE_CHECKING:
    from ._ref import ServerRef


class Kind(enum.Enum):
    CALL = "call"
    CAST = "cast"
    INFO = "info"
    TIMER = "timer"
    STOP = "stop"
    CRASH = "crash"  # trio_pgs.testing.crash(): raise SimulatedCrash in the server
    WAKE = "wake"  # not a message: the idle reaper or the supervisor wakes the server


class Message:
    __slots__ = ("chain", "kind", "payload", "slot", "trace")

    #: The sender's trace context (`Tracing.capture`), when the supervisor traces.
    trace: Any

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
        self.trace = None


class Handling:
    """What a server task is doing now: set in a context variable per message (and
    around `init` and `on_activate`), and valid only until that hook returns.

    Tasks that a handler spawns inherit the context variable; `live` tells them apart:
    once the hook has returned, they are not part of the call chain any more.
    """

    __slots__ = ("caller", "chain", "live", "waiting_on")

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
        self.live = True


current_handling: contextvars.ContextVar[Handling | None] = contextvars.ContextVar(
    "trio_pgs_handling", default=None
)


def live_handling() -> Handling | None:
    """The hook running in this task (or in the task that spawned it), if it still runs."""
    handling = current_handling.get()
    return handling if handling is not None and handling.live else None


def current_caller() -> Caller:
    """The caller of the `handle_call` running now, to reply to later.

    Return ``NoReply(state)`` from `handle_call`, keep the token, and
    ``await caller.reply(value)`` from a later message (or a task). A server that
    owes replies does not hibernate; if it crashes, its callers get `ServerCrashed`.
    """
    handling = live_handling()
    if handling is None or handling.caller is None:
        raise RuntimeError("current_caller() is only available inside handle_call")
    return handling.caller
