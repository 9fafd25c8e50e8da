"""The byte transport between cluster nodes: authenticated, multiplexed request/reply.

The rule of this module: it moves opaque ``bytes`` bodies and knows nothing of what they
mean. Every connection is mutually authenticated with the cluster's shared secret before
any request frame crosses it, and every way a connection ends reaches each waiting
caller as one `PeerUnavailable`, which says whether the request may have been seen.

Frames, and the handshake that authenticates a connection (hello, nonces, HMAC proofs),
live in `trio_pgs._frames`, whose docstring documents them. After the handshake, every
frame is one message, both ways::

    type(1: request 0, reply 1, failure 2) request_id(8) body
"""

from __future__ import annotations

import itertools
import logging
import socket
import ssl
import struct
from collections.abc import Awaitable, Callable

import attrs
import trio

from ._errors import TrioPGSError
from ._frames import MAX_NODE_ID as _MAX_NODE_ID
from ._frames import FrameReader as _FrameReader
from ._frames import Refused as _Refused
from ._frames import prove_as_client, prove_as_server

__all__ = ["MAX_FRAME", "PeerUnavailable", "Transport", "TransportStatistics"]

logger = logging.getLogger("trio_pgs")

#: The largest frame body a transport accepts unless told otherwise.
MAX_FRAME: int = 16 * 2**20

_MESSAGE = struct.Struct(">BQ")  # a message's header: type, request id
_HEADER = struct.Struct(">IBQ")  # the frame's length, then the message's header
_MESSAGE_HEADER = _MESSAGE.size
_REQUEST, _REPLY, _FAILURE = 0, 1, 2
#: The sender joins queued frames into one write up to this size (fewer syscalls).
_BATCH_BYTES = 256 * 1024
_FAILURE_TEXT = 300


class PeerUnavailable(TrioPGSError):
    """The peer could not be reached, or the connection broke.

    ``sent`` is False only when the request certainly never reached the peer, so it is
    safe to retry; when True the peer may have handled it (or be handling it still).
    """

    def __init__(self, message: str, *, sent: bool) -> None:
        super().__init__(message)
        self.sent = sent


@attrs.frozen
class TransportStatistics:
    """A snapshot of a `Transport`.

    ``connections_in`` and ``connections_out`` are the authenticated connections open
    now; the other fields count since the transport was made: requests handed to a
    connection, handler results sent back (replies and failures), and peers whose
    connection was closed for breaking the protocol (a failed handshake included).
    """

    connections_in: int
    connections_out: int
    requests_sent: int
    requests_served: int
    peers_refused: int


@attrs.define
class _Counters:
    connections_in: int = 0
    connections_out: int = 0
    requests_sent: int = 0
    requests_served: int = 0
    peers_refused: int = 0


class _Link:
    """An authenticated connection: whole frames in through ``reader``, out through `send`.

    Frames go out through one sender task fed by a channel, not by each caller writing:
    a caller cancelled mid-write would leave half a frame on a connection that others keep
    using, and shielding the write instead would let a peer that stops reading hold a
    caller past its cancellation. A channel send is either done or not at all.
    """

    def __init__(self, stream: trio.abc.Stream, reader: _FrameReader, peer: str) -> None:
        self.stream = stream
        self.reader = reader
        self.peer = peer
        self.lost: str | None = None
        self._outbox, self._queued = trio.open_memory_channel[bytes](0)

    async def send(self, frame: bytes) -> None:
        """Queue a whole frame; raises `trio.BrokenResourceError` if it never will be."""
        try:
            # Handing the frame straight to a waiting sender task saves a trip through
            # the scheduler on the hot path; the caller checkpoints right after anyway.
            self._outbox.send_nowait(frame)
        except trio.WouldBlock:
            await self._outbox.send(frame)

    def close_outbox(self) -> None:
        """Frames not yet queued never will be: their senders get BrokenResourceError."""
        self._queued.close()

    async def send_loop(self, on_failure: trio.CancelScope) -> None:
        """Write queued frames until cancelled; on a broken stream cancel ``on_failure``."""
        try:
            async for frame in self._queued:
                await self.stream.send_all(self._batch(frame))
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self.lost = f"connection lost while sending ({exc.__cause__ or exc})"
            on_failure.cancel()

    def _batch(self, first: bytes) -> bytes:
        frames, size = [first], len(first)
        while size < _BATCH_BYTES:
            try:
                frame = self._queued.receive_nowait()
            except trio.WouldBlock:
                break
            frames.append(frame)
            size += len(frame)
        return first if len(frames) == 1 else b"".join(frames)


class _Pending:
    """One request waiting for its reply."""

    __slots__ = ("event", "failure", "reply")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.reply: bytes | None = None
        self.failure: str | None = None

    def result(self) -> bytes:
        if self.failure is not None:
            raise PeerUnavailable(self.failure, sent=True)
        assert self.reply is not None
        return self.reply


class _Outgoing:
    """The connection to one address: made by its own task, shared by every request."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.address = address
        self.scope = trio.CancelScope()
        self.ready = trio.Event()
        self.done = trio.Event()
        self.link: _Link | None = None
        self.closed: str | None = None  # why, once closed
        self.pending: dict[int, _Pending] = {}
        self._ids = itertools.count()

    async def wait_ready(self) -> _Link:
        await self.ready.wait()
        if self.link is None or self.closed is not None:
            raise PeerUnavailable(self._describe(self.closed), sent=False)
        return self.link

    async def request(self, link: _Link, body: bytes, counters: _Counters) -> bytes:
        request_id = next(self._ids)
        pending = self.pending[request_id] = _Pending()
        try:
            try:
                await link.send(_message(_REQUEST, request_id, body))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                # Never queued: the connection closed first, so nothing was written.
                raise PeerUnavailable(self._describe(self.closed), sent=False) from None
            counters.requests_sent += 1
            await pending.event.wait()
        finally:
            del self.pending[request_id]
        return pending.result()

    def resolve(self, request_id: int, reply: bytes | None, failure: str | None) -> None:
        pending = self.pending.get(request_id)
        if pending is None:
            return  # its caller stopped waiting: a late reply is dropped
        pending.reply, pending.failure = reply, failure
        pending.event.set()

    def close(self, reason: str) -> None:
        """Fail every pending request (they may have been handled) and stop the task."""
        if self.closed is None:
            self.closed = reason
        self.scope.cancel()
        self.ready.set()
        message = self._describe(self.closed)
        for pending in self.pending.values():
            if not pending.event.is_set():
                pending.failure = message
                pending.event.set()

    def _describe(self, reason: str | None) -> str:
        host, port = self.address
        return f"node at {_format(host, port)} unavailable: {reason or 'not connected'}"


def _format(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


#: TCP keepalive: a peer whose host vanished without a reset (a cable pulled, a link
#: that drops packets) is noticed within about 11 s of silence, and data it never
#: acknowledges within 15 s ends the connection; its pending requests then fail.
_KEEP_IDLE, _KEEP_INTERVAL, _KEEP_COUNT, _USER_TIMEOUT_MS = 5, 2, 3, 15_000


def _keep_alive(stream: trio.SocketStream) -> None:
    try:
        stream.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for name, value in (("TCP_KEEPIDLE", _KEEP_IDLE), ("TCP_KEEPINTVL", _KEEP_INTERVAL),
                            ("TCP_KEEPCNT", _KEEP_COUNT), ("TCP_USER_TIMEOUT", _USER_TIMEOUT_MS)):
            option = getattr(socket, name, None)
            if option is not None:  # Linux has them all; others keep their defaults
                stream.setsockopt(socket.IPPROTO_TCP, option, value)
    except OSError as exc:  # not a TCP socket (tests), or refused: the defaults stay
        logger.debug("no TCP keepalive on a connection: %s", exc)


def _peer_of(stream: trio.SocketStream) -> str:
    try:
        host, port = stream.socket.getpeername()[:2]
    except OSError:
        return "an unknown peer"
    return _format(host, port)


def _message(kind: int, request_id: int, body: bytes) -> bytes:
    return _HEADER.pack(len(body) + _MESSAGE_HEADER, kind, request_id) + body


def _parse(frame: bytes) -> tuple[int, int, bytes]:
    if len(frame) < _MESSAGE_HEADER:
        raise _Refused(f"a frame of {len(frame)} bytes is too short to be a message")
    kind, request_id = _MESSAGE.unpack_from(frame)
    return kind, request_id, frame[_MESSAGE_HEADER:]


class Transport:
    """Authenticated request/reply between the nodes of one cluster, over TCP (or TLS).

    ``handler`` answers each request received by `serve`; it runs in a task of its own,
    and up to ``max_in_flight`` of them run at once per connection. Bodies and replies
    are at most ``max_frame`` bytes less a 9-byte header.
    """

    def __init__(
        self,
        *,
        node: str,
        cluster: str,
        secret: bytes,
        handler: Callable[[bytes], Awaitable[bytes]],
        server_ssl: ssl.SSLContext | None = None,
        client_ssl: ssl.SSLContext | None = None,
        max_frame: int = MAX_FRAME,
        handshake_timeout: float = 5.0,
        connect_timeout: float = 5.0,
        max_in_flight: int = 1024,
    ) -> None:
        if not secret:
            raise ValueError("the cluster secret must not be empty")
        if len(node.encode()) > _MAX_NODE_ID:
            raise ValueError(f"a node id is at most {_MAX_NODE_ID} bytes in UTF-8")
        if max_frame < _MESSAGE_HEADER or max_in_flight < 1:
            raise ValueError("max_frame and max_in_flight must leave room for one request")
        self._node = node
        self._cluster = cluster
        self._secret = secret
        self._handler = handler
        self._server_ssl = server_ssl
        self._client_ssl = client_ssl
        self._max_frame = max_frame
        self._handshake_timeout = handshake_timeout
        self._connect_timeout = connect_timeout
        self._max_in_flight = max_in_flight
        self._outgoing: dict[tuple[str, int], _Outgoing] = {}
        self._counters = _Counters()
        #: Requests being answered now (from the handler to the reply handed over).
        self._answering = 0
        self._closed = False

    def answering(self) -> int:
        """How many requests from other nodes are being answered now."""
        return self._answering

    def requesting(self) -> int:
        """How many requests to other nodes wait for their replies now."""
        return sum(len(outgoing.pending) for outgoing in self._outgoing.values())

    @property
    def closed(self) -> bool:
        """Whether `aclose` was called: no request goes out any more."""
        return self._closed

    def statistics(self) -> TransportStatistics:
        """A snapshot of the counters (see `TransportStatistics`); never blocks."""
        return TransportStatistics(**attrs.asdict(self._counters))

    def _refuse(self, peer: str, reason: str) -> None:
        self._counters.peers_refused += 1
        logger.warning("closed the connection with %s: %s", peer, reason)

    # -- serving ----------------------------------------------------------------------

    async def serve(
        self,
        host: str,
        port: int,
        *,
        task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept connections on ``host``:``port`` until cancelled.

        Port 0 picks a free port; ``task_status.started((host, bound_port))`` says which
        (the port of the first listener, should ``host`` resolve to several). Every
        connection is closed when this returns. A peer's failures are logged, never
        raised.
        """
        listeners = await trio.open_tcp_listeners(port, host=host)
        bound = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self._serve_connection, listeners)
            task_status.started((host, bound))

    async def _serve_connection(self, stream: trio.SocketStream) -> None:
        _keep_alive(stream)
        peer = _peer_of(stream)
        try:
            await self._serve_peer(stream, peer)
        except Exception:  # a bug here must not end `serve` for every other peer
            logger.exception("the connection with %s failed", peer)

    async def _serve_peer(self, stream: trio.SocketStream, peer: str) -> None:
        try:
            link = await self._accept(stream, peer)
        except _Refused as exc:
            self._refuse(peer, str(exc))
            return
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._refuse(peer, f"handshake failed: {exc.__cause__ or exc}")
            return
        self._counters.connections_in += 1
        try:
            await self._serve_link(link)
        finally:
            self._counters.connections_in -= 1
            link.close_outbox()
            await trio.aclose_forcefully(link.stream)

    async def _accept(self, stream: trio.SocketStream, peer: str) -> _Link:
        with trio.move_on_after(self._handshake_timeout):
            wrapped: trio.abc.Stream = stream
            if self._server_ssl is not None:
                tls = trio.SSLStream(stream, self._server_ssl, server_side=True)
                await tls.do_handshake()
                wrapped = tls
            reader = _FrameReader(wrapped)
            client = await prove_as_server(
                wrapped, reader, secret=self._secret, cluster=self._cluster, node=self._node
            )
            return _Link(wrapped, reader, f"node {client!r} at {peer}")
        raise _Refused(f"handshake not finished within {self._handshake_timeout} s")

    async def _serve_link(self, link: _Link) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(link.send_loop, nursery.cancel_scope)
            await self._read_requests(link, nursery)
            nursery.cancel_scope.cancel()

    async def _read_requests(self, link: _Link, nursery: trio.Nursery) -> None:
        # Backpressure: past max_in_flight running handlers, stop reading (the peer's
        # writes then block) instead of starting tasks without bound.
        slots = trio.Semaphore(self._max_in_flight)
        try:
            while True:
                try:
                    slots.acquire_nowait()  # skips a scheduler trip; receive checkpoints
                except trio.WouldBlock:
                    await slots.acquire()
                frame = await link.reader.receive(self._max_frame)
                if frame is None:
                    return
                kind, request_id, body = _parse(frame)
                if kind != _REQUEST:
                    raise _Refused(f"a frame of type {kind} where a request was expected")
                nursery.start_soon(self._handle, link, request_id, body, slots)
        except _Refused as exc:
            self._refuse(link.peer, str(exc))
        except trio.BrokenResourceError as exc:
            logger.info("lost the connection with %s: %s", link.peer, exc.__cause__ or exc)

    async def _handle(
        self, link: _Link, request_id: int, body: bytes, slots: trio.Semaphore
    ) -> None:
        self._answering += 1
        try:
            frame = await self._answer(link, request_id, body)
            try:
                await link.send(frame)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return  # the connection is closing; its client fails the request itself
            self._counters.requests_served += 1
        finally:
            self._answering -= 1
            slots.release()

    async def _answer(self, link: _Link, request_id: int, body: bytes) -> bytes:
        try:
            reply = await self._handler(body)
            if not isinstance(reply, bytes):
                raise TypeError(f"the handler returned {type(reply).__name__}, not bytes")
        except Exception as exc:
            logger.exception("the transport's handler failed on a request from %s", link.peer)
            return self._failure(request_id, f"the handler raised {type(exc).__name__}: {exc}")
        if len(reply) > self._max_frame - _MESSAGE_HEADER:
            text = f"a reply of {len(reply)} bytes is over the frame limit"
            return self._failure(request_id, text)
        return _message(_REPLY, request_id, reply)

    def _failure(self, request_id: int, text: str) -> bytes:
        # Short, and never itself over the limit: cutting a character in two is harmless,
        # the client decodes with replacement.
        limit = min(_FAILURE_TEXT, self._max_frame - _MESSAGE_HEADER)
        return _message(_FAILURE, request_id, text.encode()[:limit])

    # -- requesting -------------------------------------------------------------------

    async def request(self, address: tuple[str, int], body: bytes) -> bytes:
        """Send ``body`` to the node at ``address``; return its handler's reply.

        The first request to an address connects (concurrent ones share that connection);
        later ones reuse it, and one after it broke connects again. Raises
        `PeerUnavailable` when there is no reply: with ``sent=False`` only if the
        request certainly never left. Cancelled while waiting, the caller just stops
        waiting (the peer may still handle the request). A body over the frame limit
        raises `ValueError` before anything is sent.
        """
        if len(body) > self._max_frame - _MESSAGE_HEADER:
            raise ValueError(f"a body of {len(body)} bytes is over the frame limit")
        if self._closed:
            raise PeerUnavailable("the transport is closed", sent=False)
        outgoing = self._outgoing.get(address)
        if outgoing is None or outgoing.closed is not None:
            outgoing = self._connect(address)
        link = await outgoing.wait_ready()
        return await outgoing.request(link, body, self._counters)

    def _connect(self, address: tuple[str, int]) -> _Outgoing:
        outgoing = self._outgoing[address] = _Outgoing(address)
        # A system task, because the connection outlives the request that made it and
        # the transport has no nursery of its own; `_run_outgoing` never raises, and
        # `aclose` (or `disconnect`) ends it.
        trio.lowlevel.spawn_system_task(self._run_outgoing, outgoing)
        return outgoing

    async def _run_outgoing(self, outgoing: _Outgoing) -> None:
        reason = "disconnected"
        try:
            with outgoing.scope:
                reason = await self._connect_and_run(outgoing)
        except Exception as exc:  # a bug here must not crash trio's system nursery
            logger.exception("the connection to %s failed", outgoing.address)
            reason = f"internal error: {exc!r}"
        finally:
            outgoing.close(reason)
            if self._outgoing.get(outgoing.address) is outgoing:
                del self._outgoing[outgoing.address]
            outgoing.done.set()

    async def _connect_and_run(self, outgoing: _Outgoing) -> str:
        try:
            link = await self._open(outgoing.address)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            return f"cannot connect: {exc.__cause__ or exc}"
        except _Refused as exc:
            self._refuse(_format(*outgoing.address), str(exc))
            return str(exc)
        outgoing.link = link
        outgoing.ready.set()
        self._counters.connections_out += 1
        try:
            return await self._run_link(outgoing, link)
        finally:
            self._counters.connections_out -= 1
            link.close_outbox()
            await trio.aclose_forcefully(link.stream)

    async def _open(self, address: tuple[str, int]) -> _Link:
        host, port = address
        with trio.move_on_after(self._connect_timeout):
            socket_stream = await trio.open_tcp_stream(host, port)
            _keep_alive(socket_stream)
            stream: trio.abc.Stream = socket_stream
            try:
                if self._client_ssl is not None:
                    tls = trio.SSLStream(stream, self._client_ssl, server_hostname=host)
                    stream = tls
                    await tls.do_handshake()
                reader = _FrameReader(stream)
                server = await prove_as_client(
                    stream, reader, secret=self._secret, cluster=self._cluster, node=self._node
                )
            except BaseException:
                await trio.aclose_forcefully(stream)
                raise
            return _Link(stream, reader, f"node {server!r} at {_format(host, port)}")
        raise OSError(f"not connected within {self._connect_timeout} s")

    async def _run_link(self, outgoing: _Outgoing, link: _Link) -> str:
        reason = "connection lost"  # kept only if the sender's failure cancels the reader
        async with trio.open_nursery() as nursery:
            nursery.start_soon(link.send_loop, nursery.cancel_scope)
            reason = await self._read_replies(outgoing, link)
            nursery.cancel_scope.cancel()
        return link.lost or reason

    async def _read_replies(self, outgoing: _Outgoing, link: _Link) -> str:
        try:
            while True:
                frame = await link.reader.receive(self._max_frame)
                if frame is None:
                    return "the peer closed the connection"
                kind, request_id, body = _parse(frame)
                if kind == _REPLY:
                    outgoing.resolve(request_id, body, None)
                elif kind == _FAILURE:
                    text = body.decode(errors="replace")
                    outgoing.resolve(request_id, None, f"{link.peer}: {text}")
                else:
                    raise _Refused(f"a frame of type {kind} where a reply was expected")
        except _Refused as exc:
            self._refuse(link.peer, str(exc))
            return str(exc)
        except trio.BrokenResourceError as exc:
            return f"connection lost ({exc.__cause__ or exc})"

    def disconnect(self, address: tuple[str, int]) -> None:
        """Close the connection to ``address`` now, if any; never blocks.

        Its pending requests raise `PeerUnavailable` (``sent=True``); the next request
        to ``address`` connects again.
        """
        outgoing = self._outgoing.pop(address, None)
        if outgoing is not None:
            outgoing.close("disconnected")

    async def aclose(self) -> None:
        """Close every outgoing connection and wait until they are closed.

        Pending requests raise `PeerUnavailable` (``sent=True``); later ones raise it
        with ``sent=False``. `serve` is not affected: cancel it to stop serving.
        """
        self._closed = True
        closing = list(self._outgoing.values())
        self._outgoing.clear()
        for outgoing in closing:
            outgoing.close("the transport is closed")
        with trio.CancelScope(shield=True):
            for outgoing in closing:
                await outgoing.done.wait()
