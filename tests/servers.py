"""Servers and stores the tests share."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import attrs
import trio

from trio_pgs import (
    Caller,
    ConflictError,
    MemoryStore,
    NoReply,
    PersistentServer,
    Record,
    Reply,
    RequestError,
    ServerRef,
    Stop,
    current_caller,
)
from trio_pgs._store import Operation


@attrs.define
class Tally:
    items: list[str] = attrs.Factory(list)


class Lifecycle:
    """What the tally servers did, across activations (class-level, reset per test)."""

    def __init__(self) -> None:
        self.active: dict[str, int] = {}
        self.max_active: dict[str, int] = {}
        self.activations: dict[str, int] = {}
        self.terminations: list[tuple[str, Any]] = []

    def activated(self, key: str) -> None:
        self.active[key] = self.active.get(key, 0) + 1
        self.max_active[key] = max(self.max_active.get(key, 0), self.active[key])
        self.activations[key] = self.activations.get(key, 0) + 1

    def terminated(self, key: str, reason: Any) -> None:
        self.active[key] -= 1
        self.terminations.append((key, reason))


LIFECYCLE = Lifecycle()
#: What `TallyServer.answer` returns for a request that needs an await.
NOT_ANSWERED = object()


class TallyServer(PersistentServer[Tally]):
    """Appends items; answers a small language of requests used across the tests."""

    kind = "tally"
    idle_timeout = 10.0

    def __init__(self) -> None:
        self.waiting: list[Caller] = []

    async def init(self, *items: str) -> Tally:
        await trio.lowlevel.checkpoint()
        return Tally(list(items))

    async def on_activate(self, state: Tally) -> Tally:
        LIFECYCLE.activated(self.ref.key)
        await trio.lowlevel.checkpoint()
        return state

    async def terminate(self, reason: Any, state: Tally) -> None:
        LIFECYCLE.terminated(self.ref.key, reason)
        await trio.lowlevel.checkpoint()

    async def handle_call(self, request: Any, state: Tally) -> Any:
        answer = self.answer(request, state)
        if answer is not NOT_ANSWERED:
            return answer
        match request:
            case ("sleep", seconds):
                await trio.sleep(seconds)
                return Reply("slept", state)
            case ("call", ref, inner):
                return Reply(await ref.call(inner), state)
            case "call-self":
                return Reply(await self.ref.call("get"), state)
            case ("add-and-reply-by-token", item):  # answered through its own token
                await current_caller().reply("early")
                return NoReply(Tally([*state.items, item]))
            case ("release-then-refuse", item):  # replies from a state it then drops
                state.items.append(item)
                for caller in self.waiting:
                    await caller.reply(list(state.items))
                self.waiting.clear()
                raise RequestError(f"refused {item}")
            case ("release", item):
                new = Tally([*state.items, item])
                for caller in self.waiting:
                    await caller.reply(item)
                self.waiting.clear()
                return Reply("released", new)
            case ("release-and-stop", reason):
                for caller in self.waiting:
                    await caller.reply("bye")
                self.waiting.clear()
                return Stop(state, reason=reason, reply="stopping")
        return await super().handle_call(request, state)

    def answer(self, request: Any, state: Tally) -> Any:
        """The requests that need no await (`InlineTally` answers only these)."""
        match request:
            case ("add", item):
                new = Tally([*state.items, item])
                return Reply(len(new.items), new)
            case ("add-volatile", item):
                new = Tally([*state.items, item])
                return Reply(len(new.items), new, persist=False)
            case "get":
                return Reply(list(state.items), state)
            case "crash":
                raise RuntimeError("asked to crash")
            case ("mutate-then-crash", item):
                state.items.append(item)
                raise RuntimeError("crashed after mutating")
            case ("mutate-then-refuse", item):
                state.items.append(item)  # a refusal must undo this
                raise RequestError(f"refused {item}")
            case ("refuse", item):
                raise RequestError(f"refused {item}")
            case ("stop", reason):
                return Stop(state, reason=reason, reply="stopping")
            case ("add-and-stop", item, reason):
                return Stop(Tally([*state.items, item]), reason=reason, reply="stopping")
            case ("return", value):
                return value
            case "wait":
                self.waiting.append(current_caller())
                return NoReply(state)
            case ("add-and-wait", item):  # committed now, answered later
                self.waiting.append(current_caller())
                return NoReply(Tally([*state.items, item]))
            case ("unencodable", value):
                return Reply(None, Tally([*state.items, value]))
            case ("timer", delay, item):
                self.send_after(delay, ("add", item))
                return Reply("armed", state)
        return NOT_ANSWERED

    async def handle_cast(self, message: Any, state: Tally) -> Any:
        match message:
            case ("add", item):
                return NoReply(Tally([*state.items, item]))
            case ("return", value):
                return value
        return await super().handle_cast(message, state)

    async def handle_info(self, message: Any, state: Tally) -> Any:
        match message:
            case ("add", item):
                return NoReply(Tally([*state.items, item]))
        return await super().handle_info(message, state)


class InlineTally(TallyServer):
    """`TallyServer`'s requests that need no await, from a ``handle_call`` with none:
    a call to it while it waits for a message is handled in the caller's task."""

    kind = "tally-inline"

    async def handle_call(self, request: Any, state: Tally) -> Any:
        answer = self.answer(request, state)
        if answer is NOT_ANSWERED:
            raise RequestError(f"{request!r} needs an await: not an InlineTally request")
        return answer


#: Makes the store of a test: a MemoryStore, or (set by conftest's `store_backend` fixture)
#: a PostgresStore in a schema of its own.
new_store: Callable[[], Any] = MemoryStore


class FaultyStore:
    """Wraps a store (`new_store()` by default): commits fail while `failing` is set,
    meet a conflict while `conflicting` is, and wait while `gate` is."""

    def __init__(self, inner: Any | None = None) -> None:
        self.inner = inner if inner is not None else new_store()
        self.failing = False
        self.conflicting = False
        self.gate: trio.Event | None = None
        self.commits: list[list[Operation]] = []
        self.loads = 0

    async def open(self) -> None:
        await self.inner.open()

    async def close(self) -> None:
        await self.inner.close()

    async def load(self, kind: str, key: str) -> Record | None:
        self.loads += 1
        result: Record | None = await self.inner.load(kind, key)
        return result

    async def commit(self, operations: Sequence[Operation]) -> None:
        if self.gate is not None:
            await self.gate.wait()
        if self.failing:
            raise OSError("injected disk failure")
        if self.conflicting:
            raise ConflictError("injected conflict: another writer changed the record")
        self.commits.append(list(operations))
        await self.inner.commit(operations)

    async def scan(self, kind: str) -> AsyncIterator[Record]:
        async for record in self.inner.scan(kind):
            yield record


def ref_of(sup: Any, key: str) -> ServerRef:
    ref: ServerRef = sup.ref(TallyServer, key)
    return ref
