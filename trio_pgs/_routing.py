"""Where a message goes in a cluster: here, when this node owns its server, else to
the node that does (`route`); and a message another node sent here (`serve`).

Rule of this module: a message crosses nodes with the call chain its sender waits on
(a cast or a send carries none: its sender waits on nobody), and a wait for another
node counts in the wait-for graph for as long as it lasts, so that a call closing a
cycle through other nodes is refused (`CallCycleError`) rather than left to hang.
A message whose owner moved meanwhile is routed again, up to the node's limit.

Routing works on the supervisor's own delivery (`Delivery`): it decides where a
message goes, never how a server receives it.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Any, Protocol

import trio

from ._calls import Handling, Kind, Message, live_handling
from ._cluster import MOVED, ClusterNode
from ._deadlock import check_across, check_no_deadlock
from ._errors import CallCycleError, ConflictError, NotOwner, SupervisorNotRunning
from ._ledger import WaitEdge

if TYPE_CHECKING:
    from ._entry import Entry, KindInfo
    from ._ref import ServerRef


class Delivery(Protocol):
    """What routing needs of its supervisor (`PersistentSupervisor`): delivery on
    this node, and whether it is closing."""

    name: str
    _node: ClusterNode | None
    _kinds: dict[str, KindInfo]

    @property
    def _closing(self) -> bool: ...

    def _unknown_kind(self, kind: str) -> Exception: ...

    def _waits(self, ref: ServerRef) -> list[ServerRef] | None: ...

    async def _send(
        self, ref: ServerRef, kind: Kind, payload: Any, chain: tuple[ServerRef, ...] | None
    ) -> tuple[Entry, Message]: ...

    async def _wait_reply(self, ref: ServerRef, entry: Entry, message: Message) -> Any: ...

    async def _deliver_async_here(
        self, ref: ServerRef, kind: str, payload: Any,
        chain: tuple[ServerRef, ...] | None = None,
    ) -> None: ...

    async def _release_here(self, ref: ServerRef) -> None: ...

    async def _rollback_here(self, ref: ServerRef, steps: int) -> None: ...

    async def _start_here(self, info: KindInfo, ref: ServerRef, args: tuple[Any, ...]) -> None: ...


async def serve(
    sup: Delivery, op: str, ref: ServerRef, payload: Any, chain: tuple[ServerRef, ...]
) -> Any:
    """A message for *ref* that this node serves: delivered here (`NotOwner` if the
    server turns out to be another node's)."""
    if sup._closing:
        raise NotOwner(f"{ref}: this node is shutting down")
    if op == "call" or op == "stop":
        if chain and live_handling() is None:
            # From another node's handler: would its wait close a cycle through the
            # servers waiting here (X here calls Y there, Y calls X), or through
            # other nodes' (X calls Y calls Z, each on its own node)?
            node = sup._node
            if node is None:
                check_no_deadlock(ref, Handling(chain[-1], chain[:-1], []))
            else:
                await check_across(ref, chain, node.still_waits)
                if await node.waits_on(ref, chain[-1]):
                    raise _cycle_through_others(ref, chain[-1])
        entry, message = await sup._send(
            ref, Kind.CALL if op == "call" else Kind.STOP, payload, chain
        )
        return await sup._wait_reply(ref, entry, message)
    if op == "cast" or op == "info":
        await sup._deliver_async_here(ref, op, payload, chain)
        return None
    if op == "repair":
        what, steps = payload
        if what == "release":
            await sup._release_here(ref)
        else:
            await sup._rollback_here(ref, int(steps))
        return None
    if op == "start":
        info = sup._kinds.get(ref.kind)
        if info is None:
            raise sup._unknown_kind(ref.kind)
        await sup._start_here(info, ref, tuple(payload))
        return None
    raise ValueError(f"unknown operation {op!r}")


async def route(sup: Delivery, node: ClusterNode, ref: ServerRef, op: str, payload: Any) -> Any:
    """Deliver a message in a cluster: here when this node owns *ref*, else to its
    owner; routed again when the owner moved meanwhile."""
    await trio.lowlevel.checkpoint_if_cancelled()
    handling = live_handling()
    chain: tuple[ServerRef, ...] = ()  # a cast waits on nobody: it carries no chain
    if handling is not None and op in ("call", "stop"):
        chain = handling.chain
        await check_across(ref, chain, node.still_waits)
    request: bytes | None = None
    for attempt in itertools.count():  # reroute() gives up after ROUTES
        address = node.route(ref)
        if address is None:
            if (
                handling is not None and op in ("call", "stop") and not node.settled()
                and sup._waits(ref) is None and await node.waits_on(ref, handling.ref)
            ):  # it moved here, and still runs where it was, waiting on this caller
                raise _cycle_through_others(ref, handling.ref)
            try:
                return await serve(sup, op, ref, payload, chain)
            except NotOwner:
                if sup._closing:
                    raise SupervisorNotRunning(
                        f"supervisor {sup.name!r} is shutting down"
                    ) from None
            except ConflictError as exc:
                if not exc.fenced:  # fenced: another node claimed it; go there
                    raise
        else:
            if request is None:
                request = node.encode(op, ref, payload, chain)
            reply = await _forward(node, address, ref, request, handling)
            if reply is not MOVED:
                return reply
        await node.reroute(ref, attempt)
    raise AssertionError("unreachable")


def _cycle_through_others(ref: ServerRef, caller: ServerRef) -> CallCycleError:
    return CallCycleError(
        f"calling {ref} would deadlock: it waits, through other nodes' servers, on "
        f"{caller}, which calls it; use cast, or a deferred reply (current_caller())"
    )


async def _forward(
    node: ClusterNode, address: tuple[str, int], ref: ServerRef, request: bytes,
    handling: Handling | None,
) -> Any:
    """`ClusterNode.forward`; from a handler, its wait is an edge of the wait-for
    graph while it lasts (so that a call back from the other node is caught)."""
    if handling is None:
        return await node.forward(address, ref, request)
    edge = WaitEdge(handling.waiting_on, ref)
    try:
        return await node.forward(address, ref, request)
    finally:
        edge.drop()
