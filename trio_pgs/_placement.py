"""Placement: which node of a cluster owns a server, by rendezvous hashing.

Every node computes the owner of a server from the same list of live nodes and gets
the same answer, with no coordination. When a node joins or leaves, only the
servers it gains or loses move (about 1/n of them): each server's owner is the node
whose hash of (node, server) is the highest, and that does not depend on the others.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence


def weight(node: str, kind: str, key: str) -> int:
    """The rank of *node* for server (*kind*, *key*): a stable 64-bit hash."""
    digest = hashlib.blake2b(
        b"\0".join((node.encode(), kind.encode("utf-8", "surrogatepass"),
                    key.encode("utf-8", "surrogatepass"))),
        digest_size=8,
    ).digest()
    return int.from_bytes(digest, "big")


def owner(nodes: Sequence[str], kind: str, key: str) -> str:
    """The node of *nodes* (not empty) that owns server (*kind*, *key*)."""
    return max(nodes, key=lambda node: (weight(node, kind, key), node))
