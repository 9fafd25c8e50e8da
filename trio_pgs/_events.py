"""Lifecycle events for metrics and tracing: `PersistentSupervisor(on_event=...)`."""

from __future__ import annotations

import enum

import attrs

from ._ref import ServerRef


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
    which covers the writes of many servers (group commit).
    """

    type: EventType
    ref: ServerRef | None
    time: float
    error: BaseException | None = None
    reason: str | None = None
    records: int = 0
    seconds: float = 0.0
