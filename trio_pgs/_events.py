"""Lifecycle events for metrics and tracing: `PersistentSupervisor(on_event=...)`."""

from __future__ import annotations

import enum
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import attrs

from ._ref import ServerRef

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Mapping


class EventType(enum.Enum):
    """What happened. Every type but `COMMITTED` concerns one server."""

    #: `on_activate` returned: the server is active (a first start or a wake-up).
    ACTIVATED = "activated"
    #: The server hibernated after its idle timeout (or early, above ``max_active``).
    HIBERNATED = "hibernated"
    #: A hook raised, a result was invalid, a state could not be encoded, or an
    #: activation failed. ``error`` is the exception.
    CRASHED = "crashed"
    #: The crash that made the server reach ``max_crashes``: it is quarantined.
    QUARANTINED = "quarantined"
    #: The server handled a `Stop`; ``reason`` is its reason.
    STOPPED = "stopped"
    #: One store transaction committed: ``records`` puts and deletes in ``seconds``.
    COMMITTED = "committed"


@attrs.frozen
class ServerEvent:
    """One event, as passed to the supervisor's ``on_event`` callable.

    ``time`` is `trio.current_time()`. ``ref`` is None for `EventType.COMMITTED`,
    which covers the writes of many servers (group commit); ``supervisor`` names the
    supervisor for every event.
    """

    type: EventType
    ref: ServerRef | None
    time: float
    error: BaseException | None = None
    reason: str | None = None
    records: int = 0
    seconds: float = 0.0
    supervisor: str = ""


@runtime_checkable
class Tracing(Protocol):
    """What an ``on_event`` hook may offer besides being called with events: tracing
    of messages (`trio_pgs.otel.Telemetry` does). The supervisor uses it when the hook
    has these methods; without them a message carries nothing and costs nothing more.

    A *carried* value is opaque to trio-pgs: what `capture` returned in the sender's
    task, travelling with the message to the server's task.
    """

    def opened(self, supervisor: Any) -> None:
        """The supervisor opened (metrics that read its statistics start now)."""

    def closed(self, supervisor: Any) -> None:
        """The supervisor closed."""

    def sending(self, ref: ServerRef, kind: str) -> AbstractContextManager[Any]:
        """Around the delivery of a message (``"call"``, ``"cast"``, ``"info"``,
        ``"stop"``) in the sender's task: for a call, until its reply."""

    def capture(self) -> Any:
        """The sender's current trace context, to travel with its message."""

    def handling(self, ref: ServerRef, kind: str, carried: Any) -> AbstractContextManager[Any]:
        """Around the handler of a message that carried *carried*, in the server's task."""

    def inject(self) -> Mapping[str, str]:
        """The current trace context as text, to cross to another node."""

    def receiving(self, headers: Mapping[str, str]) -> AbstractContextManager[Any]:
        """Make the context *headers* carry current (a message from another node)."""


def traced_call(
    tracing: Tracing, deliver: Callable[[ServerRef, Any], Awaitable[Any]]
) -> Callable[[ServerRef, Any], Awaitable[Any]]:
    """*deliver* (a call's) inside ``tracing.sending``: installed only when tracing."""

    async def call(ref: ServerRef, request: Any) -> Any:
        with tracing.sending(ref, "call"):
            return await deliver(ref, request)

    return call


def traced_async(
    tracing: Tracing, deliver: Callable[[ServerRef, str, Any], Awaitable[None]]
) -> Callable[[ServerRef, str, Any], Awaitable[None]]:
    """*deliver* (a cast's or an info's) inside ``tracing.sending``."""

    async def send(ref: ServerRef, kind: str, payload: Any) -> None:
        with tracing.sending(ref, kind):
            await deliver(ref, kind, payload)

    return send


def traced_stop(
    tracing: Tracing, deliver: Callable[[ServerRef, str], Awaitable[None]]
) -> Callable[[ServerRef, str], Awaitable[None]]:
    """*deliver* (a stop's) inside ``tracing.sending``."""

    async def stop(ref: ServerRef, reason: str) -> None:
        with tracing.sending(ref, "stop"):
            await deliver(ref, reason)

    return stop
