"""The library's exceptions: one root, a small flat set below it."""

from __future__ import annotations

from typing import Any


class TrioPGSError(Exception):
    """Root of trio-pgs's own failures (misuse raises `TypeError`/`ValueError`)."""


class ServerNotFound(TrioPGSError):
    """The key has no stored record: it was never started, or it stopped normally."""


class AlreadyStarted(TrioPGSError):
    """`start` was given a key that already has a record; `.ref` reaches that server.

    ``ref`` is that server's `ServerRef` (typed `Any` here: errors are the lowest
    layer and know nothing of refs).
    """

    def __init__(self, message: str, ref: Any) -> None:
        super().__init__(message)
        self.ref = ref


class ServerCrashed(TrioPGSError):
    """The handler raised (the cause is chained) or returned something invalid."""


class ServerQuarantined(TrioPGSError):
    """The server crashed too often; release or roll it back before using it again."""


class ActivationFailed(TrioPGSError):
    """The stored record could not be loaded, decoded or restored (cause chained)."""


class PersistenceError(TrioPGSError):
    """The store failed: a state could not be committed, or a store could not open.

    Raised for a call, the change was not committed: the server went back to its last
    committed state, and retrying is safe. The one exception is `OutcomeUnknown`.
    """


class OutcomeUnknown(PersistenceError):
    """The change was handed to the store, but its outcome was never learned.

    It may or may not be stored: a shutdown stopped waiting for a slow store, or the
    connection was lost mid-commit. Read the server's state (or make the request
    idempotent) before retrying, or it may be applied twice.
    """


class ConflictError(PersistenceError):
    """A write expected another version of the record: another writer got there first.

    ``fenced`` is True when the write was refused for its epoch: a later activation
    (in another process, or another node of a cluster) claimed the server.
    """

    def __init__(self, message: str, *, fenced: bool = False) -> None:
        super().__init__(message)
        self.fenced = fenced


class StateEncodingError(TrioPGSError):
    """A state could not be encoded; nothing was written and the state did not advance."""


class CallCycleError(TrioPGSError):
    """The call would wait on a server already in the current call chain (a deadlock)."""


class UnknownKind(TrioPGSError):
    """The supervisor serves no class for this kind; nothing is imported to find one."""


class SupervisorNotRunning(TrioPGSError):
    """No supervisor of the ref's name is open in this process (or it is shutting down)."""


class SupervisorEscalated(TrioPGSError):
    """More than ``max_restarts`` crashes within ``max_seconds``: the supervisor shut
    every server down (states kept) and raised this out of its ``async with``."""


class RequestError(TrioPGSError):
    """Raised by a handler to refuse a request: not a crash.

    Subclass it for business errors (insufficient funds, a move out of turn). The
    caller of a `handle_call` that raises it gets the exception itself; the state is
    unchanged, nothing is committed, and no crash is counted (so a client sending bad
    requests cannot quarantine a server). Raised by `handle_cast` or `handle_info`,
    it is logged and the message dropped.
    """


class UnknownRequest(RequestError):
    """The server does not handle this call or cast (OTP's bad_call): a refusal."""


class NodeUnavailable(TrioPGSError):
    """The cluster node that owns the server could not be reached, or was lost with
    the message in flight (it died, or the connection broke).

    ``sent`` is False when the message certainly never reached that node: nothing
    happened, and sending it again is safe. Otherwise its outcome is unknown, as with
    `OutcomeUnknown`: read the server's state (or make the request idempotent) before
    sending it again. The next message is served by the new owner, from the last
    committed state, once the lost node's lease has run out.
    """

    def __init__(self, message: str, *, sent: bool = True) -> None:
        super().__init__(message)
        self.sent = sent


class MessageEncodingError(TrioPGSError):
    """A request, a reply or `start` arguments could not be encoded to travel to
    another cluster node. For a request, raised before anything was sent."""


class NotOwner(TrioPGSError):
    """Internal: this node does not own the server (another cluster node does, or
    this node lost its lease); the message is routed again. Never reaches a user."""


class SimulatedCrash(Exception):
    """Raised inside a server by `trio_pgs.testing.crash`: a crash like any other."""
