"""Helpers for testing your own servers."""

from __future__ import annotations

from typing import Any

import trio
import trio.lowlevel
import trio.testing

from .._ref import ServerRef
from .._registry import find_supervisor
from .._supervisor import PersistentSupervisor


async def crash(ref: ServerRef) -> None:
    """Make *ref*'s server crash as if its next handler raised (`SimulatedCrash`).

    Messages queued before are handled first. Returns once the crash was handled (the
    restart strategy applied); the server is activated first if it was dormant. A
    server that cannot crash raises what a call to it would: `ServerNotFound` (no
    record), `ServerQuarantined`, `ActivationFailed`.
    """
    await find_supervisor(ref)._deliver_crash(ref)


async def hibernate(ref: ServerRef) -> None:
    """Make *ref*'s server hibernate now instead of after its idle timeout, and wait
    until it has. A server that is busy or owes replies hibernates once idle; a
    dormant one is left alone."""
    sup = find_supervisor(ref)
    assert isinstance(sup, PersistentSupervisor)
    entry: Any = sup._entries.get(ref)
    if entry is None:
        await trio.lowlevel.checkpoint()
        return
    while sup._entries.get(ref) is entry is not None:
        if not entry.hibernate_now:  # asked again after a message kept it awake
            entry.hibernate_now = True
            entry.wake()
        # Until a server settles or ends: waiting, not spinning, so that virtual time
        # (autojump_clock) passes while the server is busy.
        await sup._wait_settled()


async def wait_all_idle(sup: PersistentSupervisor) -> None:
    """Wait until every active server of *sup* waits for a message with nothing
    queued, and no commit is in flight.

    Work scheduled for later is not waited for: timers (`send_after`), idle timeouts,
    and the deferred writes of `WRITE_BEHIND` servers (due ``max_lag`` after the
    change); `hibernate` a server to have its pending state written now."""
    while True:
        await trio.testing.wait_all_tasks_blocked()
        if all(
            entry.waiting() and entry.mailbox_empty()
            for entry in sup._entries.values()
        ) and sup._writer.idle():
            return
        # Sleep until a server settles (not a busy loop: time, virtual or not, passes).
        await sup._wait_settled()
