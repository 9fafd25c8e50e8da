"""Clusters: one supervisor name served by several nodes on one database.

`Cluster` is what a user configures. `ClusterNode` is this node's part: its
membership (`Membership`), where each server lives (rendezvous hashing over the live
nodes, `_placement`), and the messages it forwards to other nodes or serves for
them (`Transport`, with `_wire` encoding). Which node *may write* a server is never
decided here: the store's claims and epochs fence every write (docs/cluster.md).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import math
import ssl
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import attrs
import trio

from . import _wire as wire
from ._errors import (
    ConflictError,
    MessageEncodingError,
    NodeUnavailable,
    NotOwner,
    OutcomeUnknown,
    PersistenceError,
    SupervisorNotRunning,
)
from ._events import Tracing
from ._membership import Membership
from ._placement import owner
from ._ref import ServerRef
from ._store import Claim, Member, SupportsMembership
from ._transport import MAX_FRAME, PeerUnavailable, Transport

logger = logging.getLogger("trio_pgs")

#: How often a message is routed again (the owner moved, or was not reachable yet)
#: before its sender gets `NodeUnavailable`.
ROUTES = 6


def _address(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"an address must be a 'host:port' str, not {value!r}")
    _split(value)
    return value


def _advertised(value: object) -> str:
    """An address the other nodes connect to: a real port, and not a wildcard host
    (which names no machine to connect to)."""
    address = _address(value)
    host, port = _split(address)
    if port == 0 or _wildcard(host):
        raise ValueError(
            f"advertise must be a host and port the other nodes can connect to, not "
            f"{address!r} (a wildcard host or port 0 names no place to connect to)"
        )
    return address


def _wildcard(host: str) -> bool:
    """Whether *host* names every interface rather than one machine (0.0.0.0, ::)."""
    if host in ("", "0"):
        return True
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:  # a name
        return False


def _named(members: list[Member]) -> str:
    return ", ".join(f"{m.node} at {m.address}" for m in members)


def _split(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if (
        not sep or not host or not (port.isascii() and port.isdigit())
        or not 0 <= int(port) < 65536
    ):
        raise ValueError(f"an address must be 'host:port', not {address!r}")
    return host.strip("[]"), int(port)


def _secret(value: object) -> bytes:
    if isinstance(value, str):
        value = value.encode()
    if not isinstance(value, bytes) or len(value) < 16:
        raise ValueError(
            "secret must be bytes or a str of at least 16 bytes, the same on every node "
            "(for example secrets.token_hex(32), kept out of the code)"
        )
    return value


def _lease(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 1 <= value <= 3600:
        raise ValueError(f"lease must be between 1 and 3600 seconds, not {value!r}")
    return float(value)


def _ssl(value: object) -> ssl.SSLContext | None:
    if value is not None and not isinstance(value, ssl.SSLContext):
        raise TypeError(f"ssl_context must be an ssl.SSLContext or None, not {value!r}")
    return value


@attrs.frozen
class Cluster:
    """How a supervisor joins the cluster of its name (docs/cluster.md).

    Every `PersistentSupervisor` of one ``name`` on one database opened with a
    ``Cluster`` is a node of that cluster. ``listen`` is where this node accepts the
    other nodes' connections (``"127.0.0.1:0"``: loopback, any free port);
    ``advertise`` is the address the others use to reach it (None: the address it
    listens on). ``secret`` (bytes or str, 16 bytes or more, the same on every node)
    authenticates every connection between nodes. ``lease`` is how long a node's
    membership lasts without renewal, in seconds: a node that dies is replaced after
    at most that long. ``ssl_context`` (a server-side context) and
    ``client_ssl_context`` (client-side, checking the others' certificates) put every
    connection between nodes under TLS; give both or neither.
    """

    secret: bytes = attrs.field(converter=_secret, repr=False)
    listen: str = attrs.field(default="127.0.0.1:0", converter=_address)
    advertise: str | None = attrs.field(
        default=None, converter=attrs.converters.optional(_advertised)
    )
    lease: float = attrs.field(default=10.0, converter=_lease)
    ssl_context: ssl.SSLContext | None = attrs.field(default=None, converter=_ssl)
    client_ssl_context: ssl.SSLContext | None = attrs.field(default=None, converter=_ssl)

    def __attrs_post_init__(self) -> None:
        if self.advertise is None and _wildcard(_split(self.listen)[0]):
            raise ValueError(
                f"listen={self.listen!r} accepts on every interface, which the other nodes "
                "cannot connect to as such: give advertise='HOST:PORT', an address of this "
                "machine that they reach"
            )
        if (self.ssl_context is None) != (self.client_ssl_context is None):
            raise ValueError(
                "give both ssl_context (to accept connections) and client_ssl_context (to "
                "make them), or neither"
            )


@attrs.frozen
class ClusterStatistics:
    """The cluster's part of `SupervisorStatistics`."""

    nodes: int = 1
    forwarded: int = 0
    served_for_others: int = 0
    handoffs: int = 0
    lost_leases: int = 0


class Local(Protocol):
    """What a node needs of its supervisor (`PersistentSupervisor`)."""

    name: str
    shutdown_timeout: float

    async def _serve_remote(
        self, op: str, ref: ServerRef, payload: Any, chain: tuple[ServerRef, ...]
    ) -> Any: ...

    def _hand_off(self, mine: Callable[[ServerRef], bool]) -> int: ...

    async def _release(self, ref: ServerRef, within: float) -> None: ...

    def _recover(self) -> None: ...

    def _waits(self, ref: ServerRef) -> list[ServerRef] | None: ...

    def _stop_serving(self) -> None: ...

    def _active_count(self) -> int: ...


def _headers(value: object) -> dict[str, str] | None:
    """A request's trace headers: absent, or a small object of strings."""
    if value is None:
        return None
    if not (isinstance(value, dict) and len(value) <= 16 and all(
        isinstance(k, str) and isinstance(v, str) and len(v) <= 1024 for k, v in value.items()
    )):
        raise ValueError("malformed trace headers")
    return value


#: `ClusterNode.forward`'s answer when the node it reached does not own the server.
MOVED: Any = object()
#: How many nodes away a cycle check follows the servers' waits.
PROBE_HOPS = 4
#: How long after a node left the members the requests still waiting on it fail: more
#: than a graceful leave takes to answer its last ones.
DISCONNECT_AFTER = 2.0
#: The largest message that crosses between nodes (a frame, less its header).
LARGEST = MAX_FRAME - 64


class ClusterNode:
    """This node of a cluster: its lease, its view of the others, its forwarding."""

    def __init__(
        self, config: Cluster | None, store: SupportsMembership, local: Local,
        unstructure: wire.Unstructure,
    ) -> None:
        self.config = config
        self.local = local
        self.unstructure = unstructure
        lease = config.lease if config is not None else 10.0
        self.membership = Membership(
            store, local.name, address="", clustered=config is not None, lease=lease,
            on_change=self._view_changed, on_lost=self._lost, active=local._active_count,
        )
        if config is not None:
            secret = config.secret
            self.membership.proof = lambda node: hmac.new(
                secret, f"trio-pgs member\0{local.name}\0{node}".encode(), hashlib.sha256
            ).hexdigest()
        self.transport: Transport | None = None
        self._nursery: trio.Nursery | None = None
        #: Requests from other nodes being handled now (a leaving node lets them end).
        self._handling = 0
        #: Placement: the live nodes that take servers, and where each one listens.
        self._nodes: tuple[str, ...] = ()
        self._addresses: dict[str, tuple[str, int]] = {}
        #: A member that does not prove the secret joined before this node: this node
        #: serves nothing (`_without_strangers`).
        self._deferring = False
        #: The strangers last reported, and whether this node deferred to them: a
        #: report is made when that changes, not at every renewal.
        self._reported: tuple[frozenset[str], bool] = (frozenset(), False)
        self._owners: dict[ServerRef, str] = {}
        #: Every live member but this one, leaving ones included: who may still hold
        #: a server this node gained, until `_settled_at`.
        self._others: tuple[str, ...] = ()
        self._settled_at = -math.inf
        self.forwarded = self.served = self.handoffs = 0
        #: The supervisor's tracing of messages, if any: the trace context crosses.
        self.tracing: Tracing | None = None

    @property
    def node(self) -> str:
        return self.membership.node

    async def start(self, nursery: trio.Nursery) -> None:
        """Listen (in a cluster), join, and keep the lease in *nursery*."""
        config = self.config
        self._nursery = nursery
        if config is not None:
            self.transport = Transport(
                node=self.node, cluster=self.local.name, secret=config.secret,
                handler=self._serve, server_ssl=config.ssl_context,
                client_ssl=config.client_ssl_context,
            )
            host, port = _split(config.listen)
            bound = await nursery.start(self.transport.serve, host, port)
            self.membership.address = config.advertise or f"{bound[0]}:{bound[1]}"
        await self.membership.join()
        strangers = self._strangers(self.membership.members)
        if strangers:
            await self.membership.leave()
            raise PersistenceError(
                f"supervisor {self.local.name!r}: the cluster's other nodes "
                f"({_named(strangers)}) use another secret; give every node the same secret"
            )
        nursery.start_soon(self.membership.run)

    async def leave(self) -> None:
        """Leave the members, then close the connections to the other nodes: closed
        even when leaving is cut short (a database slow to delete this node's row),
        or the calls still waiting on them would outlive the supervisor."""
        self.membership.leaving = True
        transport = self.transport
        try:
            await self.membership.leave()
            # Requests from other nodes still being answered ("moved", at this
            # point): let them end and their replies go out before the connections
            # close, so that their callers route again instead of hearing of a lost
            # node.
            if transport is not None:
                with trio.move_on_after(1.0):
                    while self._handling or transport.answering():  # noqa: ASYNC110
                        await trio.sleep(0.01)  # a shutdown's poll; no event to wait on
                    await trio.sleep(0.05)  # the last replies leave their sender tasks
        finally:
            if transport is not None:
                await transport.aclose()  # shielded where it waits

    async def let_forwarded_end(self, by: float) -> None:
        """Leaving: the messages this node forwarded (for tasks of its program, its
        own servers being shut down by now) get their replies until *by* (trio time),
        before `leave` closes the connections; those still waiting then fail with
        `OutcomeUnknown`."""
        transport = self.transport
        if transport is None:
            return
        with trio.move_on_at(by):
            while transport.requesting():  # noqa: ASYNC110 - a shutdown's poll, as in
                await trio.sleep(0.01)  # `leave`: no event to wait on

    async def announce_leaving(self, by: float = math.inf) -> None:
        """Tell the others this node is leaving: they stop routing to it. Waits for the
        database a third of the lease at most, and not past *by* (trio time)."""
        self.membership.leaving = True
        self._nodes = tuple(n for n in self._nodes if n != self.node)
        self._owners.clear()
        with trio.move_on_at(min(trio.current_time() + self.membership.lease / 3, by)):
            await self.membership.refresh(again=True)  # one under way says "staying"

    def guarded(
        self, claim: Callable[[str, str], Awaitable[Claim]]
    ) -> Callable[[str, str], Awaitable[Claim]]:
        """*claim*, preceded while the members settle by asking the node that may
        still hold the server to hibernate it first: a server moves between nodes
        without two activations at once (the epochs fence any that slips through)."""

        async def claim_after_hand_off(kind: str, key: str) -> Claim:
            if trio.current_time() < self._settled_at and self._others:
                await self._ask_release(ServerRef(self.local.name, kind, key))
            return await claim(kind, key)

        return claim_after_hand_off

    async def _ask_release(self, ref: ServerRef) -> None:
        """Ask every other live node to hibernate *ref* if it runs it (any of them may,
        its view a renewal behind), and to learn the members; in parallel. A node that
        still runs it (a long handler, or the messages it finishes first, as a leaving
        node does) is asked again while it stays a member, up to this node's
        ``shutdown_timeout`` (plus a lease): what it handles is committed before the
        server moves. A node that does not answer in time is fenced by the claim."""
        if self.transport is None:
            return
        request = wire.encode({"op": "release", "kind": ref.kind, "key": ref.key,
                               "body": None, "chain": []})
        asked = self._others
        with trio.move_on_after(self.local.shutdown_timeout + self.membership.lease):
            while asked:
                holding: list[str] = []
                async with trio.open_nursery() as nursery:
                    for node in asked:
                        address = self._addresses.get(node)
                        if address is not None:
                            nursery.start_soon(self._release_at, node, address, request,
                                               holding)
                asked = tuple(node for node in holding if node in self._others)
                if asked:
                    await trio.sleep(0.01)  # asked again at once would wait as long anyway

    async def _release_at(
        self, node: str, address: tuple[str, int], request: bytes, holding: list[str]
    ) -> None:
        """Ask *node* to release; add it to *holding* if it still runs the server."""
        assert self.transport is not None
        with trio.move_on_after(min(2.5, self.membership.lease / 2 + 0.5)):
            try:
                answer = wire.decode(await self.transport.request(address, request))
            except (PeerUnavailable, ValueError):
                return  # gone, or going: its writes are fenced by this claim anyway
            if answer.get("ok") is False:
                holding.append(node)

    async def waits_on(self, start: ServerRef, target: ServerRef, hops: int = PROBE_HOPS) -> bool:
        """Whether *start* waits, through the servers it is calling (on this node or,
        up to *hops* nodes away, on others), on *target*: then *target* calling
        *start* would wait for ever. A node that does not answer counts as no."""
        todo, seen = [start], set()
        while todo:
            ref = todo.pop()
            if ref in seen:
                continue
            seen.add(ref)
            waits = self.local._waits(ref)
            if waits is None:
                if hops > 0 and await self._probe(ref, target, hops - 1):
                    return True
                continue
            if target in waits:
                return True
            todo.extend(waits)
        return False

    async def still_waits(self, waiter: ServerRef, waited: ServerRef) -> bool:
        """Whether *waiter*, a link of a call chain, still waits on *waited* (through
        the servers of its own node): asked of the node that serves it. A caller that
        gave up waits no more; a node that does not answer counts as no."""
        return await self.waits_on(waiter, waited, hops=1)

    def settled(self) -> bool:
        """Whether no server this node gained may still run on another node (the
        members have not changed for a lease)."""
        return trio.current_time() >= self._settled_at or not self._others

    async def _probe(self, ref: ServerRef, target: ServerRef, hops: int) -> bool:
        """Whether *ref* waits on *target*, asked of the node that runs it: its owner,
        or, while the members settle and this node owns it, every other node (it may
        still run where it was)."""
        node = self.owner_of(ref)
        if node not in (None, self.node):
            return await self._probe_at(node, ref, target, hops)
        if self.settled():
            return False
        for other in self._others:
            if await self._probe_at(other, ref, target, hops):
                return True
        return False

    async def _probe_at(self, node: str, ref: ServerRef, target: ServerRef, hops: int) -> bool:
        address = self._addresses.get(node)
        if address is None or self.transport is None:
            return False
        request = wire.encode({"op": "probe", "kind": ref.kind, "key": ref.key,
                               "body": [target.kind, target.key, hops], "chain": []})
        with trio.move_on_after(1.0):
            try:
                return wire.decode(await self.transport.request(address, request)).get(
                    "ok") is True
            except (PeerUnavailable, ValueError):
                pass
        return False

    def statistics(self) -> ClusterStatistics:
        return ClusterStatistics(
            nodes=max(len(self.membership.members), 1), forwarded=self.forwarded,
            served_for_others=self.served, handoffs=self.handoffs,
            lost_leases=self.membership.lost_leases,
        )

    # -- placement ---------------------------------------------------------------------

    def _without_strangers(
        self, members: tuple[Member, ...]
    ) -> tuple[tuple[Member, ...], bool]:
        """*members* without those that do not prove the secret, and whether this node
        must serve nothing. A stranger that joined after this node did (a higher
        incarnation: one refused as it started, say) is left out. One that joined
        before (it got in while no node was there to refuse it, and this node joined
        again after losing its lease) may be serving every server as it sees them:
        this node then serves none, so that no server is active on both."""
        strangers = self._strangers(members)
        mine = [m.incarnation for m in members if m.node == self.node]
        deferring = bool(mine) and any(m.incarnation < mine[0] for m in strangers)
        self._report(strangers, deferring)
        if not strangers:
            return members, False
        return tuple(m for m in members if m not in strangers), deferring

    def _report(self, strangers: list[Member], deferring: bool) -> None:
        """Log what changed among the strangers (not at every renewal): an error for
        those that appear, or when this node begins deferring to them; a note for
        those that are gone, and when this node serves again."""
        nodes = frozenset(m.node for m in strangers)
        (before, deferred), self._reported = self._reported, (nodes, deferring)
        new = [m for m in strangers if m.node not in before]
        if new or (deferring and not deferred):
            logger.error(
                "supervisor %r: node(s) %s do not use this cluster's secret; they get "
                "no servers and no messages from here%s", self.local.name,
                _named(strangers if deferring and not deferred else new),
                " (one joined before this node: this node serves nothing until it "
                "leaves)" if deferring else "",
            )
        if before - nodes:
            logger.info("supervisor %r: node(s) %s of another secret are gone",
                        self.local.name, ", ".join(sorted(before - nodes)))
        if deferred and not deferring:
            logger.info("supervisor %r: node %s serves again: no node of another secret "
                        "joined before it", self.local.name, self.node)

    def _strangers(self, members: tuple[Member, ...]) -> list[Member]:
        """The members that do not prove this cluster's secret (none without one)."""
        proof = self.membership.proof
        if proof is None:
            return []
        return [
            m for m in members
            if m.clustered and not hmac.compare_digest(m.proof, proof(m.node))
        ]

    def _view_changed(self, members: tuple[Member, ...]) -> None:
        members, deferring = self._without_strangers(members)
        self._deferring = deferring
        nodes = tuple(m.node for m in members if m.clustered and not m.leaving)
        if self.membership.leaving:
            nodes = tuple(n for n in nodes if n != self.node)
        if deferring:
            nodes = ()  # nobody here takes servers: the stranger may serve them all
        addresses = {m.node: _split(m.address) for m in members if m.clustered and m.address}
        if self.transport is not None and self._nursery is not None:
            for node, address in self._addresses.items():
                if node not in addresses:  # gone: fail what still waits on it, soon
                    self._nursery.start_soon(self._disconnect_later, node, address)
        self._addresses = addresses
        others = tuple(m.node for m in members if m.clustered and m.node != self.node)
        if others != self._others or nodes != self._nodes:
            # Servers move: a member came or went, or began leaving (it stays among
            # the others, still running the servers it hands off, until it is gone).
            self._others = others
            self._settled_at = trio.current_time() + self.membership.lease
        if nodes != self._nodes:
            logger.info("supervisor %r: node %s sees %d node(s): %s", self.local.name,
                        self.node, len(nodes), ", ".join(nodes))
            self._nodes = nodes
            self._owners.clear()
            if self.config is not None:
                self.handoffs += self.local._hand_off(self.owns)
                self.local._recover()

    async def _disconnect_later(self, node: str, address: tuple[str, int]) -> None:
        """A node left the members: a paused or cut-off one never answers what was
        sent to it, so those requests fail (outcome unknown). Not at once: a node that
        left gracefully is still answering its last requests ("moved")."""
        await trio.sleep(DISCONNECT_AFTER)
        if node not in self._addresses and self.transport is not None:
            self.transport.disconnect(address)

    def _lost(self) -> None:
        self._owners.clear()
        if self.config is not None:
            self.local._stop_serving()

    def owner_of(self, ref: ServerRef) -> str | None:
        """The node that owns *ref* now (None: no node takes servers)."""
        found = self._owners.get(ref)
        if found is None and self._nodes:
            if len(self._owners) > 100_000:
                self._owners.clear()
            found = self._owners[ref] = owner(self._nodes, ref.kind, ref.key)
        return found

    def owns(self, ref: ServerRef) -> bool:
        """Whether this node serves *ref* now (without a cluster: while its lease holds)."""
        if self.config is None:
            return True
        return self.membership.serving and self.owner_of(ref) == self.node

    # -- forwarding --------------------------------------------------------------------

    def route(self, ref: ServerRef) -> tuple[str, int] | None:
        """Where to send a message for *ref*: None to handle it here, else an address.
        `NodeUnavailable` (not sent) when no node takes servers now."""
        node = self.owner_of(ref)
        if node is None and self._deferring:
            raise NodeUnavailable(
                f"{ref}: a node that does not prove this cluster's secret joined before "
                "this one, and this one serves nothing meanwhile; give every node the "
                "same secret", sent=False,
            )
        if node is None:
            raise NodeUnavailable(f"{ref}: no node of the cluster takes servers now",
                                  sent=False)
        if node == self.node:
            if not self.membership.serving:
                raise NodeUnavailable(f"{ref}: its node lost its lease; try again",
                                      sent=False)
            return None
        address = self._addresses.get(node)
        if address is None:
            raise NodeUnavailable(f"{ref}: its node {node} gave no address", sent=False)
        return address

    async def reroute(self, ref: ServerRef, attempt: int) -> None:
        """Before routing *ref* again: learn the members, and wait a moment."""
        if attempt + 1 >= ROUTES:
            raise NodeUnavailable(
                f"{ref}: its owner could not be reached after {ROUTES} attempts", sent=False
            )
        await self.membership.refresh()
        await trio.sleep(0.02 * 2**attempt)

    def _closed_meanwhile(self, ref: ServerRef, where: str, sent: bool) -> Exception:
        name = self.local.name
        if not sent:
            return SupervisorNotRunning(f"{ref}: supervisor {name!r} is shutting down")
        return OutcomeUnknown(
            f"{ref}: supervisor {name!r} shut down while this message was with node "
            f"{where}, which runs the server, and shutdown_timeout ran out before its "
            "reply; it may or may not have been handled there. Read the server's state "
            "before retrying"
        )

    def encode(self, op: str, ref: ServerRef, payload: Any,
               chain: tuple[ServerRef, ...]) -> bytes:
        """The request (`MessageEncodingError` before anything is sent)."""
        packed = wire.pack(payload, self.unstructure)
        fields = {
            "op": op, "kind": ref.kind, "key": ref.key, "body": packed,
            "chain": [[hop.kind, hop.key] for hop in chain],
        }
        if self.tracing is not None:
            fields["trace"] = dict(self.tracing.inject())
        request = wire.encode(fields)
        if len(request) > LARGEST:
            raise MessageEncodingError(
                f"{ref}: the message is {len(request):,} bytes as JSON, over the "
                f"{LARGEST:,} bytes a message between nodes may have"
            )
        return request

    async def forward(self, address: tuple[str, int], ref: ServerRef, request: bytes) -> Any:
        """Send *request* to the node at *address*; its reply, or `MOVED`."""
        assert self.transport is not None
        where = f"{address[0]}:{address[1]}"
        try:
            body = await self.transport.request(address, request)
            self.forwarded += 1
        except PeerUnavailable as exc:
            if self.transport.closed:  # this node shut down, not the other one
                raise self._closed_meanwhile(ref, where, exc.sent) from None
            if not exc.sent:
                return MOVED  # never reached it: route again
            raise NodeUnavailable(
                f"{ref}: node {where} was lost with this message in flight ({exc}); its "
                "outcome is unknown", sent=True,
            ) from None
        try:
            reply = wire.decode(body)
        except ValueError:
            raise NodeUnavailable(f"{ref}: node {where} answered garbage", sent=True) from None
        if "moved" in reply:
            return MOVED
        if "error" in reply:
            raise wire.unpack_error(reply["error"], ref, where)
        return wire.unpack(reply.get("ok"))

    async def _serve(self, body: bytes) -> bytes:
        """A request from another node, handled here (the transport's handler)."""
        try:
            message = wire.decode(body)
            op, kind, key = message["op"], message["kind"], message["key"]
            chain = tuple(ServerRef(self.local.name, k, n) for k, n in message["chain"])
            ref = ServerRef(self.local.name, kind, key)
            payload = wire.unpack(message["body"])
            headers = _headers(message.get("trace"))
        except (ValueError, KeyError, TypeError) as exc:
            logger.warning("supervisor %r: a malformed request from a node was ignored "
                           "(%s)", self.local.name, exc)
            return wire.encode({"error": {"type": "TrioPGSError",
                                          "message": "malformed request"}})
        self._handling += 1
        try:
            if self.tracing is None or headers is None:
                return await self._serve_decoded(op, ref, payload, chain)
            with self.tracing.receiving(headers):  # the sender's trace goes on here
                return await self._serve_decoded(op, ref, payload, chain)
        finally:
            self._handling -= 1

    async def _serve_decoded(
        self, op: str, ref: ServerRef, payload: Any, chain: tuple[ServerRef, ...]
    ) -> bytes:
        if op == "probe":
            kind, key, hops = payload
            found = await self.waits_on(ref, ServerRef(self.local.name, kind, key), hops)
            return wire.encode({"ok": found})
        if op == "release":
            # Learn the members first: this node's own callers stop sending messages to
            # the server here (which would keep it busy), then let it hibernate.
            await self.membership.refresh()
            await self.local._release(ref, min(2.0, self.membership.lease / 2))
            return wire.encode({"ok": self.local._waits(ref) is None})  # False: still here
        if not self.owns(ref) and not self.membership.leaving:
            # The sender sees this node as the owner: maybe this node's view is the
            # stale one (a member left or joined since its last renewal).
            await self.membership.refresh()
        if not self.owns(ref):
            return wire.encode({"moved": True})
        self.served += 1
        try:
            result = await self.local._serve_remote(op, ref, payload, chain)
            reply = wire.encode({"ok": wire.pack(result, self.unstructure)})
            if len(reply) > LARGEST:
                raise MessageEncodingError(
                    f"{ref}: the reply is {len(reply):,} bytes as JSON, over the "
                    f"{LARGEST:,} bytes a message between nodes may have"
                )
            return reply
        except NotOwner:
            return wire.encode({"moved": True})
        except ConflictError as exc:
            if exc.fenced:  # another node claimed it meanwhile: the caller routes again
                return wire.encode({"moved": True})
            return wire.encode({"error": wire.pack_error(exc, self.unstructure)})
        except MessageEncodingError as exc:
            return wire.encode({"error": wire.pack_error(MessageEncodingError(
                f"{ref}: the reply cannot be sent back to the calling node: {exc}"
            ), self.unstructure)})
        except Exception as exc:
            return wire.encode({"error": wire.pack_error(exc, self.unstructure)})
