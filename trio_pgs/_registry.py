"""The supervisors open in this process, by name: how a ref finds its supervisor."""

from __future__ import annotations

from typing import Any, Protocol

import trio

from ._errors import SupervisorNotRunning

# Below refs in the layers: a ref is anything with a supervisor name (`Named`), and
# the supervisor is what a ref needs of it (`Reachable`).


class Named(Protocol):
    @property
    def supervisor(self) -> str: ...


class Reachable(Protocol):
    """What a ref needs from the supervisor it names (`PersistentSupervisor`)."""

    _trio_token: trio.lowlevel.TrioToken | None
    _entries: dict[Any, Any]

    async def _deliver_call(self, ref: Any, request: Any) -> Any: ...

    async def _deliver_async(self, ref: Any, kind: str, payload: Any) -> None: ...

    async def _deliver_stop(self, ref: Any, reason: str) -> None: ...

    async def _deliver_crash(self, ref: Any) -> None: ...

    def _waits(self, ref: Any) -> list[Any] | None:
        """What *ref* waits on now, if it runs here (None: not here)."""

    def _serves(self, ref: Any) -> bool:
        """Whether this process serves *ref* (in a cluster: this node owns it, and no
        other node may still run it)."""


open_supervisors: dict[str, Reachable] = {}


def find_supervisor(ref: Named) -> Reachable:
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
    if token is not sup._trio_token:
        raise RuntimeError(
            f"{ref}: its supervisor {ref.supervisor!r} runs in another trio run; a ref is "
            "usable only from the trio run its supervisor is open in. From another "
            "thread, use trio.from_thread.run(ref.call, ..., trio_token=...) with that "
            "run's token"
        )
    return sup
