"""Edges of the persisted call's hot path: the idle deadline moved at the commit's
settle time, a failed commit, and a full mailbox with senders blocked on it."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

from trio_pgs import (
    NoReply,
    PersistenceError,
    PersistentServer,
    PersistentSupervisor,
    Reply,
    Restart,
)
from trio_pgs.testing import FaultyStore

EVENTS: list[tuple[float, str, Any]] = []


class Counter(PersistentServer[int]):
    kind = "hot-counter"
    idle_timeout = 5.0
    mailbox_size = 1

    async def init(self, start: int = 0) -> int:
        return start

    async def terminate(self, reason: Any, state: int) -> None:
        EVENTS.append((trio.current_time(), "terminate", str(reason)))

    async def handle_call(self, request: Any, state: int) -> Any:
        if request == "inc":
            return Reply(state + 1, state + 1)
        if request == "get":
            return Reply(state, state)
        if request == "tick-later":
            self.send_after(3, "tick")
            return Reply(state, state)
        return await super().handle_call(request, state)

    async def handle_cast(self, message: Any, state: int) -> Any:
        return NoReply(state + 10)

    async def handle_info(self, info: Any, state: int) -> Any:
        EVENTS.append((trio.current_time(), "info", info))
        return NoReply(state + 100)


class PermanentCounter(Counter):
    kind = "hot-permanent"
    restart = Restart.PERMANENT


@pytest.fixture(autouse=True)
def events() -> list[tuple[float, str, Any]]:
    EVENTS.clear()
    return EVENTS


def hibernated_at(events: list[tuple[float, str, Any]]) -> list[float]:
    return [t for t, what, reason in events if what == "terminate" and reason == "hibernate"]


async def test_idle_time_counts_from_a_slow_commit_not_from_the_handling(
    autojump_clock, events
):
    store = FaultyStore()
    async with PersistentSupervisor(store=store, servers=[Counter]) as sup:
        ref = await sup.start(Counter, key="a")
        await trio.sleep(4)  # 1 s left of the activation's idle time
        store.commit_delay = 3
        assert await ref.call("inc") == 1  # handled at 4, committed (answered) at 7
        store.commit_delay = 0
        assert trio.current_time() == pytest.approx(7)
        await trio.sleep(4.9)
        assert sup.statistics().active == 1  # not 5 s after the handling (9)
        await trio.sleep(0.2)
        assert sup.statistics().active == 0
        assert hibernated_at(events) == [pytest.approx(12)]


async def test_a_slow_cast_commit_keeps_the_server_awake_until_idle_after_it(
    autojump_clock, events
):
    store = FaultyStore()
    async with PersistentSupervisor(store=store, servers=[Counter]) as sup:
        ref = await sup.start(Counter, key="a")
        await trio.sleep(4)
        store.commit_delay = 3
        await ref.cast("c")  # accepted at once; its commit settles at 7
        await trio.sleep(0.5)  # the commit has started (with its delay)
        store.commit_delay = 0
        await trio.sleep(7.4)
        assert sup.statistics().active == 1
        await trio.sleep(0.2)
        assert hibernated_at(events) == [pytest.approx(12)]
        assert await ref.call("get") == 10


async def test_a_timer_info_commit_does_not_move_the_idle_deadline(autojump_clock, events):
    store = FaultyStore()
    async with PersistentSupervisor(store=store, servers=[Counter]) as sup:
        ref = await sup.start(Counter, key="a")
        await ref.call("tick-later")  # at 0: idle until 5; the timer fires at 3
        store.commit_delay = 1.5  # the timer's commit settles at 4.5
        await trio.sleep(5.1)
        assert [what for _, what, _ in events] == ["info", "terminate"]
        assert hibernated_at(events) == [pytest.approx(5)]
        store.commit_delay = 0
        assert await ref.call("get") == 100


@pytest.mark.parametrize("cls", [Counter, PermanentCounter])
async def test_failed_commit_then_idle(autojump_clock, events, cls):
    """The failed commit's caller gets PersistenceError, the call queued behind it is
    served from the stored state, and the idle time counts from its commit."""
    store = FaultyStore()
    async with PersistentSupervisor(store=store, servers=[cls]) as sup:
        ref = await sup.start(cls, key="a")
        await trio.sleep(4)
        store.fail_next("commit")
        store.commit_delay = 1
        results: dict[str, Any] = {}

        async def call(name: str) -> None:
            try:
                results[name] = (await ref.call("inc"), trio.current_time())
            except PersistenceError as exc:
                results[name] = (type(exc), trio.current_time())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(call, "first")
            await trio.sleep(0.1)
            nursery.start_soon(call, "second")  # waits behind the failing commit
        store.commit_delay = 0
        assert results["first"][0] is not None and issubclass(results["first"][0], PersistenceError)
        assert results["first"][1] == pytest.approx(5)
        assert results["second"] == (1, pytest.approx(6))  # from the stored 0, not 1
        assert next(r for _, what, r in events if what == "terminate") != "hibernate"
        await trio.sleep(4.9)
        assert sup.statistics().active == 1
        await trio.sleep(0.2)
        assert sup.statistics().active == 0
        assert hibernated_at(events) == [pytest.approx(11)]
        assert await ref.call("get") == 1


async def test_failed_commit_alone_then_idle(autojump_clock, events):
    store = FaultyStore()
    async with PersistentSupervisor(store=store, servers=[PermanentCounter]) as sup:
        ref = await sup.start(PermanentCounter, key="a")
        await trio.sleep(4)
        store.fail_next("commit")
        with pytest.raises(PersistenceError):
            await ref.call("inc")
        # PERMANENT: back at once from the stored record, idle from then (4).
        await trio.sleep(4.9)
        assert sup.statistics().active == 1
        await trio.sleep(0.2)
        assert hibernated_at(events) == [pytest.approx(9)]
        assert await ref.call("get") == 0


async def test_full_mailbox_blocked_senders_get_through_in_order_after_each_commit(
    autojump_clock,
):
    """mailbox_size=1 and commits held: every blocked sender gets through (the mailbox
    is seen non-empty with a sender blocked on it), each reply only after its commit."""
    store = FaultyStore()
    async with PersistentSupervisor(store=store, servers=[Counter]) as sup:
        ref = await sup.start(Counter, key="a")
        store.hold_commits()
        replies: list[tuple[int, int]] = []
        cast_done = trio.Event()

        async def call(i: int) -> None:
            replies.append((i, await ref.call("inc")))

        async def cast() -> None:
            await ref.cast("c")
            cast_done.set()

        async with trio.open_nursery() as nursery:
            for i in range(5):
                nursery.start_soon(call, i)
                await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(cast)
            await trio.sleep(1)
            assert replies == []  # the output gate: nothing before its commit
            assert not cast_done.is_set()  # blocked on the full mailbox
            store.release_commits()
        assert replies == [(i, i + 1) for i in range(5)]
        assert cast_done.is_set()
        assert await ref.call("get") == 15
        assert sup.statistics().queued == 0
