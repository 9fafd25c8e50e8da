"""`ServerRef`: the symbolic address of a persistent server, plain data."""

from __future__ import annotations

from typing import Any

import attrs

from ._registry import Reachable, find_supervisor

#: Longest key accepted; keys are identities written into every record.
MAX_KEY_LENGTH = 1024


def check_key(key: object) -> str:
    """Validate a server key: a non-empty `str` of at most `MAX_KEY_LENGTH` characters,
    encodable as UTF-8 (no lone surrogate: no store could hold it)."""
    if not isinstance(key, str):
        raise TypeError(f"a server key must be a str, not {type(key).__name__} ({key!r})")
    if not key:
        raise ValueError("a server key must not be empty")
    if len(key) > MAX_KEY_LENGTH:
        raise ValueError(
            f"a server key must be at most {MAX_KEY_LENGTH} characters, not {len(key)}"
        )
    if not key.isascii():
        try:
            key.encode()
        except UnicodeEncodeError:
            raise ValueError(
                f"a server key must be encodable as UTF-8 (no lone surrogate), not {key!r}"
            ) from None
    return key


@attrs.frozen(cache_hash=True)
class ServerRef:
    """Where a persistent server lives: supervisor name, kind and key.

    A ref is plain, hashable data: store it, send it, unstructure it with cattrs and
    JSON, and use it after a process restart. It does not keep the server awake; a
    message sent through it activates the server from the store when it is dormant.
    The supervisor is found by name among those open in this process.
    """

    supervisor: str
    kind: str
    key: str

    def __str__(self) -> str:
        return f"{self.kind}/{self.key}"

    def _supervisor(self) -> Reachable:
        return find_supervisor(self)

    async def call(self, request: Any) -> Any:
        """Send *request* to `handle_call` and return the reply.

        Raises `ServerCrashed`, `ServerNotFound`, `PersistenceError`,
        `CallCycleError`, `SupervisorNotRunning` (see the docs of each). Use
        `trio.fail_after` for a timeout; a cancelled call is still handled.
        """
        return await find_supervisor(self)._deliver_call(self, request)  # the hot path

    async def cast(self, message: Any) -> None:
        """Send *message* to `handle_cast`; returns once the server accepted it."""
        await self._supervisor()._deliver_async(self, "cast", message)

    async def send(self, info: Any) -> None:
        """Send *info* to `handle_info`; returns once the server accepted it."""
        await self._supervisor()._deliver_async(self, "info", info)

    async def stop(self, reason: str = "normal") -> None:
        """Stop the server after the messages already queued; ``"normal"`` wipes it."""
        await self._supervisor()._deliver_stop(self, reason)
