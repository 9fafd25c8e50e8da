"""`PersistentSupervisor.start` type-checks its arguments against the class's ``init``.

Each line marked ``# error`` must be reported by ``mypy --strict``, and no other line
(tests/typecheck_user_code.py checks both).
"""

from __future__ import annotations

from typing import Any, cast

import attrs

from trio_pgs import PersistentServer, PersistentSupervisor, Restart


@attrs.define
class Player:
    name: str
    level: int = 1


class WithInit(PersistentServer[Player]):
    async def init(self, name: str, level: int = 1) -> Player:
        return Player(name, level)


class WithStarArgs(PersistentServer[list[str]]):
    async def init(self, *names: str) -> list[str]:
        return list(names)


class WithKeywordOnly(PersistentServer[Player]):
    async def init(self, name: str, *, level: int = 1) -> Player:
        return Player(name, level)


class DefaultInit(PersistentServer[Player]):
    """No init: the default takes the first state as its one argument."""


class WithOptions(PersistentServer[Player]):
    restart = Restart.PERMANENT

    async def init(self, name: str) -> Player:
        return Player(name)


async def start_all(sup: PersistentSupervisor, cls: type[PersistentServer[Any]]) -> None:
    """A helper that takes any server class: its init is not known, nothing is checked."""
    for key in ("a", "b"):
        await sup.start(cls, key, key=key)


class NotAServer:  # not a PersistentServer: refused too
    async def init(self, name: str) -> Player:
        return Player(name)


async def starts(sup: PersistentSupervisor) -> None:
    await sup.start(WithInit, "alice")
    await sup.start(WithInit, "alice", 3, key="alice")
    await sup.start(WithInit, 123)  # error
    await sup.start(WithInit)  # error
    await sup.start(WithInit, "alice", "3")  # error
    await sup.start(WithInit, "alice", 3, 4)  # error
    await sup.start(WithStarArgs, "a", "b", "c")
    await sup.start(WithStarArgs)
    await sup.start(WithStarArgs, "a", 1)  # error
    await sup.start(WithKeywordOnly, "alice", key="k")
    await sup.start(DefaultInit, Player("alice"), key="alice")
    await sup.start(int, 1)  # error
    await sup.start(NotAServer, "alice")  # error
    await sup.start(WithInit, "alice", key=1)  # error
    await sup.start(WithOptions, "alice")
    await sup.start(WithOptions, 1)  # error
    names = ["alice", "bob"]
    await sup.start(WithStarArgs, *names)
    # A list unpacked for fixed parameters: its length is not known, so it is refused
    # (as by trio's start_soon). A tuple's length is known; or cast it to Any.
    await sup.start(WithInit, *names[:1])  # error
    await sup.start(WithInit, *("alice", 3))
    await sup.start(WithInit, *cast(Any, names[:1]))
