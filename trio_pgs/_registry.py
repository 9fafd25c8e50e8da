"""The supervisors open in this process, by name: how a ref finds its supervisor."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._errors import SupervisorNotRunning

if TYPE_CHECKING:
    from ._ref import ServerRef
    from ._supervisor import PersistentSupervisor

open_supervisors: dict[str, PersistentSupervisor] = {}


def find_supervisor(ref: ServerRef) -> PersistentSupervisor:
    try:
        return open_supervisors[ref.supervisor]
    except KeyError:
        raise SupervisorNotRunning(
            f"{ref}: no supervisor named {ref.supervisor!r} is open in this process; "
            f"open PersistentSupervisor(name={ref.supervisor!r}, ...) to reach it"
        ) from None
