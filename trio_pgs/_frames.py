"""The transport's wire format below requests: frames, and the handshake that opens a link.

The rule of this module: every byte that crosses a connection before the first request,
and the framing of every byte after it, is decided here; what a frame's body means once
the connection is authenticated is not. An unauthenticated peer is held to small frames
(``_HANDSHAKE_LIMIT``), and every way a peer breaks the framing or the handshake raises
`Refused`.

Wire format (every frame is a 4-byte big-endian length, then that many bytes)::

    server -> client   b"TPGS" version(1) server_nonce(32)
    client -> server   client_nonce(32) client_proof(32) client_node(utf-8)
    server -> client   server_proof(32) server_node(utf-8)

A proof is HMAC-SHA256, keyed by the secret, over: the label (``_CLIENT_LABEL`` or
``_SERVER_LABEL``), the version byte, the server's nonce, the client's nonce, then each of
the cluster name, the client's node id and (server proof only) the server's node id as a
4-byte length and UTF-8. Fresh nonces on both sides make a recorded handshake worthless.
"""

from __future__ import annotations

import hmac
import secrets
import struct

import trio

__all__ = [
    "MAX_NODE_ID",
    "FrameReader",
    "Refused",
    "prove_as_client",
    "prove_as_server",
]

_VERSION = 1
_MAGIC = b"TPGS"
_NONCE = 32
_PROOF = 32
#: Handshake frames are small: an unauthenticated peer must not make us buffer much.
_HANDSHAKE_LIMIT = 1024
#: The longest node id (in UTF-8) that fits in a handshake frame.
MAX_NODE_ID = _HANDSHAKE_LIMIT - _NONCE - _PROOF
_CLIENT_LABEL = b"trio-pgs transport: client proof"
_SERVER_LABEL = b"trio-pgs transport: server proof"

_LENGTH = struct.Struct(">I")
#: The most one read asks of the stream, so that a large frame takes few reads.
_READ_BYTES = 256 * 1024


class Refused(Exception):
    """The peer broke the protocol; the message says how."""


class FrameReader:
    """Whole frames out of a byte stream."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._buffer = bytearray()

    async def receive(self, limit: int) -> bytes | None:
        """The next frame's body; None at a clean end of the stream.

        A length over ``limit`` raises `Refused` before any of the body is read.
        """
        if not await self._fill(_LENGTH.size):
            return None
        (length,) = _LENGTH.unpack_from(self._buffer)
        if length > limit:
            raise Refused(f"a frame of {length} bytes is over the limit of {limit}")
        end = _LENGTH.size + length
        await self._fill(end)
        with memoryview(self._buffer) as view:
            body = bytes(view[_LENGTH.size : end])  # one copy, not two
        del self._buffer[:end]
        return body

    async def _fill(self, size: int) -> bool:
        while len(self._buffer) < size:
            # Large enough to take a big frame in few reads, small enough that a
            # claimed length does not allocate a huge buffer by itself.
            wanted = min(max(size - len(self._buffer), 65536), _READ_BYTES)
            chunk = await self._stream.receive_some(wanted)
            if not chunk:
                if not self._buffer:
                    return False
                raise Refused(
                    f"truncated frame: the stream ended {size - len(self._buffer)} bytes short"
                )
            self._buffer += chunk
        return True


def _frame(body: bytes) -> bytes:
    return _LENGTH.pack(len(body)) + body


def _proof(secret: bytes, label: bytes, nonces: bytes, *fields: str) -> bytes:
    mac = hmac.new(secret, label + bytes([_VERSION]) + nonces, "sha256")
    for field in fields:
        encoded = field.encode()
        mac.update(_LENGTH.pack(len(encoded)) + encoded)
    return mac.digest()


def _server_nonce(hello: bytes | None) -> bytes:
    if hello is None or len(hello) <= len(_MAGIC) or not hello.startswith(_MAGIC):
        raise Refused("handshake failed: the peer is not a trio-pgs transport")
    version = hello[len(_MAGIC)]
    if version != _VERSION:
        raise Refused(f"handshake failed: the peer speaks version {version}, not {_VERSION}")
    nonce = hello[len(_MAGIC) + 1 :]
    if len(nonce) != _NONCE:
        raise Refused("handshake failed: a malformed hello")
    return nonce


def _node_id(raw: bytes) -> str:
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise Refused("the peer's node id is not UTF-8") from None


async def prove_as_server(
    stream: trio.abc.Stream, reader: FrameReader, *, secret: bytes, cluster: str, node: str
) -> str:
    """The server's side of the handshake; returns the client's node id once proven.

    Raises `Refused` when the client is not a transport of ``cluster`` with ``secret``.
    """
    server_nonce = secrets.token_bytes(_NONCE)
    await stream.send_all(_frame(_MAGIC + bytes([_VERSION]) + server_nonce))
    answer = await reader.receive(_HANDSHAKE_LIMIT)
    if answer is None or len(answer) < _NONCE + _PROOF:
        raise Refused("handshake failed: no valid answer to the server's hello")
    client_nonce, proof = answer[:_NONCE], answer[_NONCE : _NONCE + _PROOF]
    client = _node_id(answer[_NONCE + _PROOF :])
    nonces = server_nonce + client_nonce
    expected = _proof(secret, _CLIENT_LABEL, nonces, cluster, client)
    if not hmac.compare_digest(proof, expected):
        raise Refused(f"handshake failed: node {client!r} has another secret or cluster")
    mine = _proof(secret, _SERVER_LABEL, nonces, cluster, client, node)
    await stream.send_all(_frame(mine + node.encode()))
    return client


async def prove_as_client(
    stream: trio.abc.Stream, reader: FrameReader, *, secret: bytes, cluster: str, node: str
) -> str:
    """The client's side of the handshake; returns the server's node id once proven.

    Raises `Refused` when the server is not a transport of ``cluster`` with ``secret``.
    """
    server_nonce = _server_nonce(await reader.receive(_HANDSHAKE_LIMIT))
    client_nonce = secrets.token_bytes(_NONCE)
    nonces = server_nonce + client_nonce
    proof = _proof(secret, _CLIENT_LABEL, nonces, cluster, node)
    await stream.send_all(_frame(client_nonce + proof + node.encode()))
    answer = await reader.receive(_HANDSHAKE_LIMIT)
    if answer is None:
        raise Refused("handshake failed: the peer hung up (another secret or cluster?)")
    server = _node_id(answer[_PROOF:])
    expected = _proof(secret, _SERVER_LABEL, nonces, cluster, node, server)
    if not hmac.compare_digest(answer[:_PROOF], expected):
        raise Refused(f"handshake failed: node {server!r} has another secret or cluster")
    return server
