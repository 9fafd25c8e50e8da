"""The supervisors open in this process, by name: how a ref finds its supervisor."""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

from ._errors import SupervisorNotRunning

if TYPE_CHECKING:
    from ._ref import ServerRef
    from ._supervisor import PersistentSupervisor

open_supervisors: dict[str, PersistentSupervisor] = {}


def find_supervisor(ref: ServerRef) -> PersistentSupervisor:
    try:
        sup = open_supervisors[ref.supervisor]
    except KeyError:
        raise SupervisorNotRunning(
            f"{ref}: no supervisor named {ref.supervisor!r} is open in this process; "
            f"open PersistentSupervisor(name={ref.supervisor!r}, ...) to reach it"
        ) from None
    try:
        token = trio.lowlevel.current_trio_token()
    except RuntimeError:
        raise RuntimeError(
            f"{ref}: not in a trio run; await ref.call() and the like inside the trio "
            "run the supervisor is open in (from a thread: trio.from_thread.run)"
        ) from None
    if token is not sup.trio_token:
        raise RuntimeError(
            f"{ref}: its supervisor {ref.supervisor!r} runs in another trio run; a ref is "
            "usable only from the trio run its supervisor is open in. From another "
            "thread, use trio.from_thread.run(ref.call, ..., trio_token=...) with that "
            "run's token"
        )
    return sup
