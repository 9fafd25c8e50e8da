"""Messages, and what a server task is handling now (the call chain)."""

from __future__ import annotations

import contextvars
import enum
from typing import TYPE_CHECKING, Any

from ._ledger import Caller, ReplyLedger, ReplySlot

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
    #: Not a message: what is left of a call handled in its caller's task (a crash, a
    #: stop), a coroutine for the server's task to await (`Activation.handle_inline`).
    RESUME = "resume"


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

    The call chain and the caller's token are made when first asked for: most
    handlers call no server and reply by returning.
    """

    __slots__ = ("_ledger", "_slot", "caller", "live", "ref", "sent_by", "waiting_on")

    def __init__(
        self,
        ref: ServerRef,
        sent_by: tuple[ServerRef, ...],
        waiting_on: list[ServerRef],
        slot: ReplySlot | None = None,
        ledger: ReplyLedger | None = None,
    ) -> None:
        #: The server handling, and the chain of the message it handles (the servers
        #: whose handlers wait on it, its sender last).
        self.ref = ref
        self.sent_by = sent_by
        #: The servers this server's handler is waiting on now (its entry's list).
        self.waiting_on = waiting_on
        #: A call's reply slot, and the ledger its reply goes through.
        self._slot = slot
        self._ledger = ledger
        #: The caller's token, once the handler asked for it (`caller_token`).
        self.caller: Caller | None = None
        self.live = True

    @property
    def chain(self) -> tuple[ServerRef, ...]:
        """The servers waiting on one another down to this one, this one last."""
        return (*self.sent_by, self.ref)

    def caller_token(self) -> Caller | None:
        """The token of the call being handled (None for another message)."""
        if self.caller is None and self._slot is not None:
            assert self._ledger is not None
            self.caller = Caller(self._ledger, self._slot)
        return self.caller


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
    caller = None if handling is None else handling.caller_token()
    if caller is None:
        raise RuntimeError("current_caller() is only available inside handle_call")
    return caller
