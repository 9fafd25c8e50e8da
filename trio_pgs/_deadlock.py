"""Deadlock detection for calls: the call chain and the wait-for graph."""

from __future__ import annotations

import itertools
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, NoReturn

from ._errors import CallCycleError
from ._registry import open_supervisors

if TYPE_CHECKING:
    from ._calls import Handling
    from ._ref import ServerRef


def check_no_deadlock(target: ServerRef, handling: Handling) -> tuple[ServerRef, ...]:
    """Raise `CallCycleError` if waiting on *target* from this handler cannot end.

    Two checks: *target* is still waiting in this call chain (A calls B calls A, or
    a self-call), or *target* is waiting, through the servers it is calling now, on
    this server (A calls B while B, handling another message, calls A). Returns the
    chain the message carries. A link of the chain that another node serves is taken
    to hold here; in a cluster, `check_across` asks that node instead.
    """
    chain = handling.chain
    if unseen_links(chain, target) is not None:
        _raise_cycle(target, (*chain, target))
    _check_wait_path(target, chain[-1])
    return chain


async def check_across(
    target: ServerRef, chain: tuple[ServerRef, ...],
    holds: Callable[[ServerRef, ServerRef], Awaitable[bool]],
) -> None:
    """`check_no_deadlock` for a message of *chain* (its sender last) in a cluster:
    each link of the chain that another node serves is asked of that node (*holds*:
    whether its waiter still waits on the next server), so that a caller there that
    gave up (cancelled) is not taken to be waiting still."""
    links = unseen_links(chain, target)
    if links is not None:
        for waiter, waited in links:
            if not await holds(waiter, waited):
                break
        else:
            _raise_cycle(target, (*chain, target))
    _check_wait_path(target, chain[-1])


def would_deadlock(target: ServerRef, handling: Handling) -> bool:
    """Whether waiting on *target* from this handler could never end (the checks of
    `check_no_deadlock`, as a question)."""
    chain = handling.chain
    return (
        unseen_links(chain, target) is not None
        or _wait_path(target, chain[-1]) is not None
    )


def unseen_links(
    chain: tuple[ServerRef, ...], target: ServerRef
) -> list[tuple[ServerRef, ServerRef]] | None:
    """Whether the servers of *chain* from *target* on may still wait, each on the next.

    A chain is what its message's senders waited on when they sent it; a caller that
    gave up since (cancelled) waits no more, and a call back to it is no cycle. A
    server of this process tells (its wait-for edges). None: no cycle (*target* is
    not in the chain, or a link of this process broke). Else the links whose waiter
    another node serves, not known here: an empty list is a sure cycle."""
    if target not in chain:
        return None
    links = chain[len(chain) - 1 - chain[::-1].index(target):]  # from its last wait on
    unseen = []
    for waiter, waited in itertools.pairwise(links):
        waits = _waits_of(waiter)
        if waits is None:
            unseen.append((waiter, waited))
        elif waited not in waits:
            return None
    return unseen


def _waits_of(ref: ServerRef) -> list[ServerRef] | None:
    """What *ref* waits on now, if this process serves it (nothing when it is
    dormant); None if another node serves it (not known here)."""
    sup = open_supervisors.get(ref.supervisor)
    if sup is None:
        return None
    waits = sup._waits(ref)
    return [] if waits is None and sup._serves(ref) else waits


def _local_entry(ref: ServerRef) -> Any:
    """The entry of *ref* if it runs in this process, else None."""
    sup = open_supervisors.get(ref.supervisor)
    return None if sup is None else sup._entries.get(ref)


def _wait_path(target: ServerRef, me: ServerRef) -> tuple[ServerRef, ...] | None:
    """The servers from *target* to *me* along "is waiting on" edges, if any."""
    stack: list[tuple[ServerRef, tuple[ServerRef, ...]]] = [(target, (me, target))]
    seen: set[ServerRef] = set()
    while stack:
        ref, path = stack.pop()
        if ref in seen:
            continue
        seen.add(ref)
        entry = _local_entry(ref)
        if entry is None:
            continue
        for waited in entry.waiting_on:
            if waited == me:
                return (*path, me)
            stack.append((waited, (*path, waited)))
    return None


def _check_wait_path(target: ServerRef, me: ServerRef) -> None:
    path = _wait_path(target, me)
    if path is not None:
        _raise_cycle(target, path)


def _raise_cycle(ref: ServerRef, path: tuple[ServerRef, ...]) -> NoReturn:
    shown = " -> ".join(str(r) for r in path)
    raise CallCycleError(
        f"calling {ref} would deadlock: {shown} would wait on each other for ever; "
        "use cast, or a deferred reply (current_caller())"
    )
