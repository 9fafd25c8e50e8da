"""The byte transport between cluster nodes, over real sockets on 127.0.0.1.

Real sockets need a real clock (a mock clock jumping while I/O is pending would fire
timeouts early), so each test is bounded by `trio.fail_after` and uses short timeouts.
The fake peers below speak the wire format by hand, from the module's docstring: they
check the format as much as they provoke the transport.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import logging
import os
import ssl
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio
import trio.testing
import trustme
from hypothesis import given
from hypothesis import strategies as st

from trio_pgs._transport import (
    MAX_FRAME,
    PeerUnavailable,
    Transport,
    TransportStatistics,
    _FrameReader,
    _Refused,
)

SECRET = b"the cluster's secret"
CLUSTER = "accounts"
LOCAL = "127.0.0.1"
BOUND = 5.0  # seconds: every test ends well within this


def bounded(test: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
    """Fail the test rather than hang it."""

    @functools.wraps(test)
    async def run(*args: Any, **kwargs: Any) -> None:
        with trio.fail_after(BOUND):
            await test(*args, **kwargs)

    return run


class Handler:
    """Echoes a request; ``block`` waits for `release`, ``fail`` raises, ``sleep:S`` sleeps."""

    def __init__(self) -> None:
        self.seen: list[bytes] = []
        self.blocked = 0
        self.release = trio.Event()

    async def __call__(self, body: bytes) -> bytes:
        self.seen.append(body)
        if body == b"block":
            self.blocked += 1
            await self.release.wait()
        elif body == b"fail":
            raise RuntimeError("the ledger is on fire")
        elif body.startswith(b"sleep:"):
            await trio.sleep(float(body[6:]))
        return b"echo:" + body


def node(name: str, handler: Handler | None = None, **options: Any) -> Transport:
    settings: dict[str, Any] = {
        "cluster": CLUSTER, "secret": SECRET, "handshake_timeout": 1.0, "connect_timeout": 1.0,
    }
    settings.update(options)
    return Transport(node=name, handler=handler or Handler(), **settings)


async def serving(nursery: trio.Nursery, transport: Transport, port: int = 0) -> tuple[str, int]:
    address: tuple[str, int] = await nursery.start(transport.serve, LOCAL, port)
    return address


async def expect_sent(
    client: Transport, address: tuple[str, int], body: bytes, sent: bool, match: str | None = None
) -> None:
    """The request fails with PeerUnavailable, and ``sent`` says what it must."""
    with pytest.raises(PeerUnavailable, match=match) as failure:
        await client.request(address, body)
    assert failure.value.sent is sent


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def all_tasks() -> int:
    count, tasks = 0, [trio.lowlevel.current_root_task()]
    while tasks:
        task = tasks.pop()
        count += 1
        for nursery in task.child_nurseries:
            tasks.extend(nursery.child_tasks)
    return count


async def settle() -> None:
    """Let the other side of a loopback connection catch up."""
    await trio.sleep(0.05)


# -- a peer that speaks the wire format by hand -------------------------------------------


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def message(kind: int, request_id: int, body: bytes) -> bytes:
    return frame(struct.pack(">BQ", kind, request_id) + body)


def proof(label: bytes, nonces: bytes, *fields: str, secret: bytes = SECRET) -> bytes:
    mac = hmac.new(secret, label + b"\x01" + nonces, hashlib.sha256)
    for field in fields:
        mac.update(struct.pack(">I", len(field.encode())) + field.encode())
    return mac.digest()


CLIENT_LABEL = b"trio-pgs transport: client proof"
SERVER_LABEL = b"trio-pgs transport: server proof"


class Raw:
    """One end of a connection, read and written frame by frame."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = b""
        self.sent: list[bytes] = []

    @classmethod
    async def connect(cls, address: tuple[str, int]) -> Raw:
        return cls(await trio.open_tcp_stream(*address))

    async def send(self, data: bytes) -> None:
        self.sent.append(data)
        await self.stream.send_all(data)

    async def receive(self) -> bytes:
        while True:
            if len(self.buffer) >= 4:
                (length,) = struct.unpack_from(">I", self.buffer)
                if len(self.buffer) >= 4 + length:
                    body, self.buffer = self.buffer[4 : 4 + length], self.buffer[4 + length :]
                    return body
            chunk = await self.stream.receive_some()
            assert chunk, "the transport closed the connection"
            self.buffer += chunk

    async def handshake_as_client(self, *, secret: bytes = SECRET) -> None:
        hello = await self.receive()
        assert hello[:5] == b"TPGS\x01"
        client_nonce = os.urandom(32)
        mine = proof(CLIENT_LABEL, hello[5:] + client_nonce, CLUSTER, "raw", secret=secret)
        await self.send(frame(client_nonce + mine + b"raw"))
        if secret == SECRET:
            answer = await self.receive()
            server = answer[32:].decode()
            expected = proof(SERVER_LABEL, hello[5:] + client_nonce, CLUSTER, "raw", server)
            assert answer[:32] == expected

    async def handshake_as_server(self, *, secret: bytes = SECRET) -> None:
        server_nonce = os.urandom(32)
        await self.send(frame(b"TPGS\x01" + server_nonce))
        answer = await self.receive()
        client = answer[64:].decode()
        nonces = server_nonce + answer[:32]
        assert answer[32:64] == proof(CLIENT_LABEL, nonces, CLUSTER, client)
        mine = proof(SERVER_LABEL, nonces, CLUSTER, client, "fake", secret=secret)
        await self.send(frame(mine + b"fake"))

    async def wait_closed(self) -> None:
        """Until the transport closes its end (unread bytes may turn it into a reset)."""
        try:
            while await self.stream.receive_some():
                pass
        except trio.BrokenResourceError:
            pass

    async def aclose(self) -> None:
        await self.stream.aclose()


async def fake_server(
    nursery: trio.Nursery, conversation: Callable[[Raw], Awaitable[None]]
) -> tuple[str, int]:
    """A listener that runs ``conversation`` on each connection."""

    async def converse(stream: trio.SocketStream) -> None:
        await conversation(Raw(stream))

    listeners = await trio.open_tcp_listeners(0, host=LOCAL)
    port = listeners[0].socket.getsockname()[1]
    await nursery.start(trio.serve_listeners, converse, listeners)
    return LOCAL, port


# -- requests and replies -------------------------------------------------------------------


@bounded
async def test_a_request_returns_the_peers_reply() -> None:
    server, client = node("b"), node("a")
    async with trio.open_nursery() as nursery:
        address = await serving(nursery, server)
        assert await client.request(address, b"hello") == b"echo:hello"
        assert await client.request(address, b"") == b"echo:"
        assert client.statistics() == TransportStatistics(
            connections_in=0, connections_out=1, requests_sent=2, requests_served=0,
            peers_refused=0,
        )
        assert server.statistics() == TransportStatistics(
            connections_in=1, connections_out=0, requests_sent=0, requests_served=2,
            peers_refused=0,
        )
        await client.aclose()
        nursery.cancel_scope.cancel()


@bounded
async def test_concurrent_first_requests_share_one_connection() -> None:
    server, client = node("b"), node("a")
    replies: list[bytes] = []

    async def ask(body: bytes) -> None:
        replies.append(await client.request(address, body))

    async with trio.open_nursery() as nursery:
        address = await serving(nursery, server)
        async with trio.open_nursery() as askers:
            for i in range(20):
                askers.start_soon(ask, b"%d" % i)
        assert sorted(replies) == sorted(b"echo:%d" % i for i in range(20))
        assert server.statistics().connections_in == 1
        assert client.statistics().connections_out == 1
        await client.aclose()
        nursery.cancel_scope.cancel()


@bounded
async def test_a_slow_handler_does_not_hold_up_other_replies_on_the_connection() -> None:
    server, client = node("b"), node("a")
    order: list[bytes] = []

    async def ask(body: bytes) -> None:
        order.append(await client.request(address, body))

    async with trio.open_nursery() as nursery:
        address = await serving(nursery, server)
        async with trio.open_nursery() as askers:
            askers.start_soon(ask, b"sleep:0.3")
            await settle()
            askers.start_soon(ask, b"fast")
        assert order == [b"echo:fast", b"echo:sleep:0.3"]
        assert server.statistics().connections_in == 1
        await client.aclose()
        nursery.cancel_scope.cancel()


@bounded
async def test_running_handlers_are_capped_per_connection_and_reading_waits() -> None:
    handler = Handler()
    server, client = node("b", handler, max_in_flight=2), node("a")
    async with trio.open_nursery() as nursery:
        address = await serving(nursery, server)
        async with trio.open_nursery() as askers:
            for _ in range(5):
                askers.start_soon(client.request, address, b"block")
            await trio.sleep(0.2)
            assert handler.blocked == 2
            assert client.statistics().requests_sent == 5
            handler.release.set()
        assert handler.blocked == 5
        await client.aclose()
        nursery.cancel_scope.cancel()


@bounded
async def test_a_caller_cancelled_while_its_request_is_written_leaves_the_frame_whole() -> None:
    # The server reads nothing while its one handler slot is taken, so a large frame
    # stays half written until then; its caller is cancelled meanwhile.
    handler = Handler()
    limit = 128 * 2**20
    server = node("b", handler, max_in_flight=1, max_frame=limit)
    client = node("a", max_frame=limit)
    big = os.urandom(64 * 2**20)
    async with trio.open_nursery() as nursery:
        address = await serving(nursery, server)
        nursery.start_soon(client.request, address, b"block")
        await settle()
        with trio.move_on_after(0.3) as waited:
            await client.request(address, big)
        assert waited.cancelled_caught
        assert client.statistics().requests_sent == 2
        assert len(handler.seen) == 1  # the big frame is not whole on the server yet
        handler.release.set()
        assert await client.request(address, b"after") == b"echo:after"
        assert handler.seen[1] == big
        assert server.statistics().peers_refused == 0
        await client.aclose()
        nursery.cancel_scope.cancel()


@bounded
async def test_a_caller_cancelled_waiting_for_its_reply_just_stops_waiting() -> None:
    handler = Handler()
    server, client = node("b", handler), node("a")
    async with trio.open_nursery() as nursery:
        address = await serving(nursery, server)
        with trio.move_on_after(0.1):
            await client.request(address, b"block")
        handler.release.set()  # its late reply is dropped
        await settle()
        assert await client.request(address, b"next") == b"echo:next"
        assert server.statistics().requests_served == 2
        assert client.statistics().connections_out == 1
        await client.aclose()
        nursery.cancel_scope.cancel()


@bounded
async def test_a_failing_handler_is_logged_and_its_caller_gets_the_text(
    caplog: pytest.LogCaptureFixture,
) -> None:
    server, client = node("b"), node("a")
    async with trio.open_nursery() as nursery:
        address = await serving(nursery, server)
        with pytest.raises(PeerUnavailable, match=r"node 'b' .*RuntimeError: the ledger") as e:
            await client.request(address, b"fail")
        assert e.value.sent
        [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert record.name == "trio_pgs" and record.exc_info is not None
        assert await client.request(address, b"still") == b"echo:still"
        await client.aclose()
        nursery.cancel_scope.cancel()


@bounded
async def test_a_handler_that_returns_no_bytes_fails_that_request_only() -> None:
    async def sloppy(body: bytes) -> bytes:
        return body.decode() if body == b"text" else body  # type: ignore[return-value]

    server = Transport(node="b", cluster=CLUSTER, secret=SECRET, handler=sloppy)
    client = node("a")
    async with trio.open_nursery() as nursery:
        address = await serving(nursery, server)
        await expect_sent(client, address, b"text", True, "returned str, not bytes")
        assert await client.request(address, b"bytes") == b"bytes"
        assert client.statistics().connections_out == 1
        await client.aclose()
        nursery.cancel_scope.cancel()


@bounded
async def test_a_body_over_the_frame_limit_is_refused_before_sending() -> None:
    client = node("a", max_frame=100)
    with pytest.raises(ValueError, match="frame limit"):
        await client.request((LOCAL, 1), b"x" * 100)
    assert client.statistics().connections_out == 0


@bounded
async def test_a_reply_over_the_frame_limit_reaches_the_caller_as_a_failure() -> None:
    async def huge(body: bytes) -> bytes:
        return b"x" * 200

    server = Transport(node="b", cluster=CLUSTER, secret=SECRET, handler=huge, max_frame=100)
    client = node("a")
    async with trio.open_nursery() as nursery:
        address = await serving(nursery, server)
        with pytest.raises(PeerUnavailable, match="over the frame limit") as e:
            await client.request(address, b"give me a lot")
        assert e.value.sent
        await client.aclose()
        nursery.cancel_scope.cancel()


# -- reaching a peer -----------------------------------------------------------------------


async def free_port() -> int:
    with trio.socket.socket() as sock:
        await sock.bind((LOCAL, 0))
        port: int = sock.getsockname()[1]
    return port


@bounded
async def test_a_refused_connection_was_certainly_not_sent() -> None:
    client = node("a")
    with pytest.raises(PeerUnavailable, match="cannot connect") as e:
        await client.request((LOCAL, await free_port()), b"hello")
    assert not e.value.sent
    assert client.statistics().requests_sent == 0
    await client.aclose()


@bounded
async def test_connect_timeout_bounds_a_peer_that_never_says_hello() -> None:
    async def silent(raw: Raw) -> None:
        await trio.sleep_forever()

    client = node("a", connect_timeout=0.2)
    async with trio.open_nursery() as nursery:
        address = await fake_server(nursery, silent)
        with trio.fail_after(1):
            with pytest.raises(PeerUnavailable, match=r"within 0\.2 s") as e:
                await client.request(address, b"hello")
        assert not e.value.sent
        await client.aclose()
        nursery.cancel_scope.cancel()


@bounded
async def test_a_lost_connection_fails_pending_requests_and_the_next_one_reconnects() -> None:
    server, client = node("b"), node("a")
    life = trio.CancelScope()

    async def serve_once(task_status: trio.TaskStatus[tuple[str, int]]) -> None:
        with life:
            await server.serve(LOCAL, 0, task_status=task_status)

    async with trio.open_nursery() as nursery:
        address = await nursery.start(serve_once)
        assert await client.request(address, b"first") == b"echo:first"
        async with trio.open_nursery() as waiting:
            waiting.start_soon(expect_sent, client, address, b"block", True)
            await settle()
            life.cancel()  # the peer goes away with the request written
        assert client.statistics().connections_out == 0
        await nursery.start(server.serve, *address)
        assert await client.request(address, b"again") == b"echo:again"
        assert client.statistics().connections_out == 1
        await client.aclose()
        nursery.cancel_scope.cancel()


@bounded
async def test_disconnect_fails_pending_requests_and_the_next_one_reconnects() -> None:
    server, client = node("b"), node("a")
    async with trio.open_nursery() as nursery:
        address = await serving(nursery, server)
        async with trio.open_nursery() as waiting:
            for _ in range(3):
                waiting.start_soon(expect_sent, client, address, b"block", True)
            await settle()
            client.disconnect(address)
        client.disconnect(address)  # not connected: nothing to do
        assert await client.request(address, b"again") == b"echo:again"
        await settle()
        assert server.statistics().connections_in == 1
        await client.aclose()
        nursery.cancel_scope.cancel()


@bounded
async def test_aclose_fails_pending_requests_and_leaves_no_task_behind() -> None:
    tasks = all_tasks()
    server, client = node("b"), node("a")
    async with trio.open_nursery() as nursery:
        address = await serving(nursery, server)
        async with trio.open_nursery() as waiting:
            waiting.start_soon(expect_sent, client, address, b"block", True)
            await settle()
            await client.aclose()
        assert client.statistics().connections_out == 0
        await expect_sent(client, address, b"later", False, "closed")
        await settle()
        assert server.statistics().connections_in == 0
        nursery.cancel_scope.cancel()
    assert all_tasks() == tasks


@bounded
async def test_cancelling_serve_closes_every_connection() -> None:
    tasks = all_tasks()
    server, clients = node("b"), [node("a"), node("c")]
    async with trio.open_nursery() as nursery:
        address = await serving(nursery, server)
        async with trio.open_nursery() as waiting:
            for client in clients:
                waiting.start_soon(expect_sent, client, address, b"block", True)
            await settle()
            assert server.statistics().connections_in == 2
            nursery.cancel_scope.cancel()
    assert server.statistics().connections_in == 0
    assert [c.statistics().connections_out for c in clients] == [0, 0]
    assert all_tasks() == tasks


# -- the handshake ---------------------------------------------------------------------------


@pytest.mark.parametrize("mismatch", [{"secret": b"another secret"}, {"cluster": "payments"}])
@bounded
async def test_another_secret_or_cluster_fails_on_both_sides(
    mismatch: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    server, client = node("b"), node("a", **mismatch)
    async with trio.open_nursery() as nursery:
        address = await serving(nursery, server)
        await expect_sent(client, address, b"hello", False, "handshake failed")
        assert server.statistics().peers_refused == 1
        # one line from each side: the server names the client, the client the server
        by_server, by_client = warnings(caplog)
        assert "node 'a'" in by_server and "another secret or cluster" in by_server
        assert f"{LOCAL}:" in by_server
        assert f"{LOCAL}:{address[1]}" in by_client and "handshake failed" in by_client
        assert client.statistics().peers_refused == 1
        assert server.statistics().requests_served == 0
        await client.aclose()
        nursery.cancel_scope.cancel()


@bounded
async def test_a_server_that_cannot_prove_the_secret_is_refused_by_the_client() -> None:
    async def impostor(raw: Raw) -> None:
        await raw.handshake_as_server(secret=b"a guess")
        await raw.wait_closed()

    client = node("a")
    async with trio.open_nursery() as nursery:
        address = await fake_server(nursery, impostor)
        await expect_sent(client, address, b"hello", False, "another secret")
        assert client.statistics().peers_refused == 1
        await client.aclose()
        nursery.cancel_scope.cancel()


@bounded
async def test_a_replayed_handshake_is_refused(caplog: pytest.LogCaptureFixture) -> None:
    server = node("b")
    async with trio.open_nursery() as nursery:
        address = await serving(nursery, server)
        recorded = await Raw.connect(address)
        await recorded.handshake_as_client()
        await recorded.aclose()
        replay = await Raw.connect(address)
        await replay.receive()  # a fresh hello, with a nonce of its own
        await replay.send(recorded.sent[0])
        await replay.wait_closed()
        await replay.aclose()
        assert server.statistics().peers_refused == 1
        assert len(warnings(caplog)) == 1
        nursery.cancel_scope.cancel()


@bounded
async def test_a_peer_that_does_not_finish_the_handshake_in_time_is_closed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = node("b", handshake_timeout=0.2)
    async with trio.open_nursery() as nursery:
        address = await serving(nursery, server)
        slow = await Raw.connect(address)
        await slow.send(b"\0\0")  # two bytes of a length, then nothing
        with trio.fail_after(1):
            await slow.wait_closed()
        await slow.aclose()
        [warning] = warnings(caplog)
        assert "within 0.2 s" in warning and f"{LOCAL}:" in warning
        assert server.statistics().peers_refused == 1
        nursery.cancel_scope.cancel()


# -- frames a server refuses -----------------------------------------------------------------

HOSTILE_FRAMES = {
    "oversized": (b"\xff\xff\xff\xff", "4294967295 bytes is over the limit"),
    "too short": (frame(b"\0\0\0"), "too short to be a message"),
    "a reply to a server": (message(1, 7, b"hi"), "type 1 where a request was expected"),
    "truncated": (struct.pack(">I", 100) + b"x" * 10, "truncated frame"),
}


@pytest.mark.parametrize("case", HOSTILE_FRAMES)
@bounded
async def test_a_bad_frame_closes_that_connection_only(
    case: str, caplog: pytest.LogCaptureFixture
) -> None:
    data, reason = HOSTILE_FRAMES[case]
    server, client = node("b"), node("a")
    async with trio.open_nursery() as nursery:
        address = await serving(nursery, server)
        assert await client.request(address, b"before") == b"echo:before"
        hostile = await Raw.connect(address)
        await hostile.handshake_as_client()
        await hostile.send(data)
        await hostile.stream.send_eof()
        await hostile.wait_closed()
        await hostile.aclose()
        [warning] = warnings(caplog)
        assert reason in warning and "node 'raw'" in warning and f"{LOCAL}:" in warning
        assert server.statistics().peers_refused == 1
        assert await client.request(address, b"after") == b"echo:after"
        assert client.statistics().connections_out == 1
        await client.aclose()
        nursery.cancel_scope.cancel()


@bounded
async def test_an_oversized_hello_is_refused_before_the_handshake(
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = node("b")
    async with trio.open_nursery() as nursery:
        address = await serving(nursery, server)
        hostile = await Raw.connect(address)
        await hostile.receive()
        await hostile.send(struct.pack(">I", MAX_FRAME))  # over the handshake's own limit
        await hostile.wait_closed()
        await hostile.aclose()
        [warning] = warnings(caplog)
        assert "over the limit of 1024" in warning
        assert server.statistics().peers_refused == 1
        nursery.cancel_scope.cancel()


# -- frames a client refuses -----------------------------------------------------------------

HOSTILE_REPLIES = {
    "oversized": (b"\xff\xff\xff\xff", "over the limit"),
    "too short": (frame(b"\x01"), "too short to be a message"),
    "a request to a client": (message(0, 0, b"hi"), "where a reply was expected"),
    "truncated": (struct.pack(">I", 100) + b"x" * 10, "truncated frame"),
}


@pytest.mark.parametrize("case", HOSTILE_REPLIES)
@bounded
async def test_a_bad_reply_fails_every_pending_request_as_sent(
    case: str, caplog: pytest.LogCaptureFixture
) -> None:
    data, reason = HOSTILE_REPLIES[case]

    async def hostile(raw: Raw) -> None:
        await raw.handshake_as_server()
        await raw.receive()
        await raw.receive()
        await raw.send(data)
        await raw.stream.send_eof()
        await raw.wait_closed()

    client = node("a")
    async with trio.open_nursery() as nursery:
        address = await fake_server(nursery, hostile)
        async with trio.open_nursery() as waiting:
            for body in (b"one", b"two"):
                waiting.start_soon(expect_sent, client, address, body, True, reason)
        [warning] = warnings(caplog)
        assert reason in warning and "node 'fake'" in warning
        assert client.statistics().peers_refused == 1
        assert client.statistics().connections_out == 0
        await client.aclose()
        nursery.cancel_scope.cancel()


@bounded
async def test_a_late_reply_for_an_unknown_request_is_dropped() -> None:
    async def chatty(raw: Raw) -> None:
        await raw.handshake_as_server()
        request = await raw.receive()
        (request_id,) = struct.unpack_from(">Q", request, 1)
        await raw.send(message(1, request_id + 1000, b"nobody asked"))
        await raw.send(message(1, request_id, b"yours"))
        await raw.wait_closed()

    client = node("a")
    async with trio.open_nursery() as nursery:
        address = await fake_server(nursery, chatty)
        assert await client.request(address, b"hello") == b"yours"
        assert client.statistics().peers_refused == 0
        await client.aclose()
        nursery.cancel_scope.cancel()


# -- TLS -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def authority() -> trustme.CA:
    return trustme.CA()


def tls(authority: trustme.CA, *, trusted: bool = True) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert(LOCAL).configure_cert(server_context)
    client_context = ssl.create_default_context()
    if trusted:
        authority.configure_trust(client_context)
    return server_context, client_context


@bounded
async def test_requests_travel_over_tls(authority: trustme.CA) -> None:
    server_context, client_context = tls(authority)
    server, client = node("b", server_ssl=server_context), node("a", client_ssl=client_context)
    async with trio.open_nursery() as nursery:
        address = await serving(nursery, server)
        assert await client.request(address, b"secret stuff") == b"echo:secret stuff"
        assert await client.request(address, b"x" * 2**20) == b"echo:" + b"x" * 2**20
        await client.aclose()
        nursery.cancel_scope.cancel()


@bounded
async def test_a_client_that_does_not_trust_the_servers_certificate_is_refused(
    authority: trustme.CA, caplog: pytest.LogCaptureFixture
) -> None:
    server_context, client_context = tls(authority, trusted=False)
    server, client = node("b", server_ssl=server_context), node("a", client_ssl=client_context)
    async with trio.open_nursery() as nursery:
        address = await serving(nursery, server)
        await expect_sent(client, address, b"hello", False, "CERTIFICATE_VERIFY_FAILED")
        await settle()
        assert server.statistics().peers_refused == 1
        assert len(warnings(caplog)) == 1
        await client.aclose()
        nursery.cancel_scope.cancel()


@bounded
async def test_a_plain_client_is_refused_by_a_tls_server(authority: trustme.CA) -> None:
    server_context, _ = tls(authority)
    server, client = node("b", server_ssl=server_context), node("a")
    async with trio.open_nursery() as nursery:
        address = await serving(nursery, server)
        await expect_sent(client, address, b"hello", False)
        await settle()
        assert server.statistics().peers_refused == 1
        await client.aclose()
        nursery.cancel_scope.cancel()


# -- framing -------------------------------------------------------------------------------


@given(
    bodies=st.lists(st.binary(max_size=300), max_size=8),
    cuts=st.lists(st.integers(min_value=1, max_value=50), min_size=1),
)
async def test_frames_come_out_whole_however_the_bytes_are_split(
    bodies: list[bytes], cuts: list[int]
) -> None:
    sending, receiving = trio.testing.memory_stream_one_way_pair()
    data = b"".join(frame(body) for body in bodies)
    reader = _FrameReader(receiving)
    got: list[bytes] = []
    async with trio.open_nursery() as nursery:

        async def write() -> None:
            position, i = 0, 0
            while position < len(data):
                size = cuts[i % len(cuts)]
                await sending.send_all(data[position : position + size])
                position, i = position + size, i + 1
            await sending.aclose()

        nursery.start_soon(write)
        while (body := await reader.receive(300)) is not None:
            got.append(body)
    assert got == bodies


async def test_a_frame_over_the_limit_is_refused_before_its_body_arrives() -> None:
    sending, receiving = trio.testing.memory_stream_one_way_pair()
    await sending.send_all(struct.pack(">I", 301))
    with pytest.raises(_Refused, match="301 bytes is over the limit of 300"):
        await _FrameReader(receiving).receive(300)


BAD_HELLOS = {
    "a hang-up": (b"", "not a trio-pgs transport"),
    "another protocol": (b"HTTP/1.1 400 Bad Request\r\n\r\n", "over the limit of 1024"),
    "another version": (frame(b"TPGS\x02" + bytes(32)), "speaks version 2, not 1"),
    "a short nonce": (frame(b"TPGS\x01" + bytes(8)), "malformed hello"),
}


@pytest.mark.parametrize("case", BAD_HELLOS)
@bounded
async def test_a_server_with_a_bad_hello_is_refused_by_the_client(case: str) -> None:
    hello, reason = BAD_HELLOS[case]

    async def stranger(raw: Raw) -> None:
        await raw.send(hello)
        if hello:
            await raw.wait_closed()

    client = node("a")
    async with trio.open_nursery() as nursery:
        address = await fake_server(nursery, stranger)
        await expect_sent(client, address, b"hello", False, reason)
        assert client.statistics().peers_refused == 1
        await client.aclose()
        nursery.cancel_scope.cancel()


@bounded
async def test_a_malformed_answer_to_the_hello_is_refused(
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = node("b")
    async with trio.open_nursery() as nursery:
        address = await serving(nursery, server)
        hostile = await Raw.connect(address)
        await hostile.receive()
        await hostile.send(frame(b"too short for a nonce and a proof"))
        await hostile.wait_closed()
        await hostile.aclose()
        [warning] = warnings(caplog)
        assert "handshake failed" in warning
        assert server.statistics().peers_refused == 1
        nursery.cancel_scope.cancel()
