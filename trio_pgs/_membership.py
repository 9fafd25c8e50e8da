"""A supervisor's membership of its name: join, keep the lease, leave.

Every supervisor on a store with membership (`SupportsMembership`: PostgresStore) is
a member of its name: the only one, or a node of a cluster. The store times leases by
its own clock; this side only knows when it *sent* a renewal, so it counts its lease
from then, minus a margin (`SAFETY`): the store's lease always ends later than this
node believes, and the node stops serving before the store lets anyone else in.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import uuid
from collections.abc import Callable

import trio

from ._errors import PersistenceError
from ._store import Member, SupportsMembership

logger = logging.getLogger("trio_pgs")

#: The part of a lease this node counts on: it stops serving once 80 % of the lease
#: since its last successful renewal has passed (clock drift and the time to stop).
SAFETY = 0.8
#: Renewals per lease.
RENEWALS = 3


class Membership:
    """The lease of one member (node) of *supervisor* on *store*.

    ``on_change`` gets the live members after every renewal that changed them;
    ``on_lost`` is called (sync) when the lease is about to run out unrenewed, or
    the store says this node is no member any more: the node must stop serving. It
    then joins again, as a new incarnation, and ``on_change`` follows.
    """

    def __init__(
        self,
        store: SupportsMembership,
        supervisor: str,
        *,
        address: str,
        clustered: bool,
        lease: float,
        on_change: Callable[[tuple[Member, ...]], None],
        on_lost: Callable[[], None],
        active: Callable[[], int],
    ) -> None:
        self.store, self.supervisor = store, supervisor
        self.node = uuid.uuid4().hex[:16]
        self.incarnation = 0
        self.address, self.clustered, self.lease = address, clustered, lease
        self.on_change, self.on_lost, self.active = on_change, on_lost, active
        self.members: tuple[Member, ...] = ()
        #: A cluster node's proof of the secret, for a node id (None: no cluster).
        self.proof: Callable[[str], str] | None = None
        #: On the trio clock: until when this node may serve (-inf: not a member).
        self.valid_until = -math.inf
        self.leaving = False
        self.lost_leases = 0
        self._refreshing: trio.Event | None = None
        self._running = trio.CancelScope()
        #: The current renewal period (cancelled to wake the run task at a loss).
        self._keeping = trio.CancelScope()
        #: The lease is lost; the run task joins again.
        self._lost = False

    @property
    def serving(self) -> bool:
        return trio.current_time() < self.valid_until

    async def join(self) -> None:
        """Join (`PersistenceError` if the name is taken) and learn the members."""
        sent = trio.current_time()
        self.incarnation = await self.store.join(
            self.supervisor, self.node, address=self.address, clustered=self.clustered,
            lease=self.lease, host=socket.gethostname(), pid=os.getpid(),
            proof=self.proof(self.node) if self.proof is not None else "",
        )
        self.valid_until = sent + self.lease * SAFETY
        self._lost = False
        await self._renew()

    async def run(self) -> None:
        """Renew the lease until cancelled; when it is lost, join again. The one task
        that joins again: a loss noticed elsewhere (`refresh`) only wakes it."""
        interval = self.lease / RENEWALS
        with self._running:
            while True:
                with trio.move_on_at(self.valid_until) as self._keeping:
                    await trio.sleep(interval)
                    await self._renew_until_done(min(interval, 1.0))
                if self._lost or not self.serving:
                    self._note_lost("no renewal in time" if not self._lost else
                                    "the store says this node is no member any more")
                    await self._join_again(interval)

    async def _renew_until_done(self, pause: float) -> None:
        """Renew, trying again every *pause* seconds while the store fails."""
        renewed = await self._renew()
        while not renewed:
            await trio.sleep(pause)
            renewed = await self._renew()

    async def refresh(self, *, again: bool = False) -> None:
        """Renew now (learning the members), or wait for a renewal under way; with
        *again*, renew after it too (one sent before a change, such as ``leaving``,
        does not carry it)."""
        while self._refreshing is not None:
            await self._refreshing.wait()
            if not again:
                return
        self._refreshing = done = trio.Event()
        try:
            await self._renew()
        finally:
            self._refreshing = None
            done.set()

    async def _renew(self) -> bool:
        """One renewal; False if the store failed (the lease may still hold)."""
        if self._lost:
            return True  # the run task is joining again
        sent, incarnation = trio.current_time(), self.incarnation
        try:
            members = await self.store.renew(
                self.supervisor, self.node, incarnation, lease=self.lease,
                active=self.active(), leaving=self.leaving,
            )
        except PersistenceError as exc:
            logger.warning("supervisor %r: lease renewal failed (%s); the lease holds "
                           "%.1f s more", self.supervisor, exc,
                           max(self.valid_until - trio.current_time(), 0))
            return False
        if incarnation != self.incarnation or self._lost:
            return True  # a renewal of an earlier incarnation: stale
        if members is None:
            self._lost = True
            self.valid_until = -math.inf
            self._keeping.cancel()  # wake the run task
            return True
        self.valid_until = sent + self.lease * SAFETY
        if members != self.members:
            self.members = members
            self.on_change(members)
        return True

    def _note_lost(self, why: str) -> None:
        self._lost = True
        self.valid_until = -math.inf
        self.lost_leases += 1
        logger.error("supervisor %r: node %s lost its lease (%s); it stops serving and "
                     "joins again", self.supervisor, self.node, why)
        self.on_lost()

    async def _join_again(self, pause: float) -> None:
        while True:
            try:
                await self.join()
            except PersistenceError as exc:
                logger.error("supervisor %r: joining again failed: %s", self.supervisor, exc)
                await trio.sleep(pause)
                continue
            logger.warning("supervisor %r: node %s joined again (incarnation %d)",
                           self.supervisor, self.node, self.incarnation)
            return

    async def leave(self) -> None:
        """Leave the members (best effort: else the lease runs out by itself)."""
        self._running.cancel()
        self.valid_until = -math.inf
        self.members = ()
        try:
            await self.store.leave(self.supervisor, self.node, self.incarnation)
        except PersistenceError as exc:
            logger.warning("supervisor %r: leaving failed (%s); the lease of node %s runs "
                           "out by itself", self.supervisor, exc, self.node)
