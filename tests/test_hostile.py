"""What a hostile review found in the runtime's edges, each a test that failed before
its fix: stores and handlers raising BaseExceptions, Ctrl-C in odd places, casts that
wait on an activation that waits on them, max_active after concurrent activity, calls
refused by a supervisor that is shutting down, and `wait_all_idle` with a slow store."""

from __future__ import annotations

import sys
from typing import Any

import pytest
import trio
import trio.lowlevel
import trio.testing

import trio_pgs
from trio_pgs import (
    MemoryStore,
    NoReply,
    OutcomeUnknown,
    Persistence,
    PersistentServer,
    PersistentSupervisor,
    Reply,
    Restart,
    ServerRef,
)
from trio_pgs.testing import FaultyStore, hibernate, wait_all_idle

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup


class Count(PersistentServer[int]):
    kind = "hostile.count"

    async def handle_call(self, request: Any, n: int) -> Any:
        if request == "get":
            return Reply(n, n, persist=False)
        return Reply(n + 1, n + 1)

    async def handle_cast(self, message: Any, n: int) -> Any:
        return NoReply(n + 1)


class WriteBehind(Count):
    kind = "hostile.write-behind"
    persistence = Persistence.WRITE_BEHIND
    max_lag = 1000.0

    async def handle_call(self, request: Any, n: int) -> Any:
        if request == "fan out":  # a child task of the handler gets the Ctrl-C
            async def child() -> None:
                await trio.sleep(0.1)
                raise KeyboardInterrupt

            async with trio.open_nursery() as nursery:
                nursery.start_soon(child)
        return await super().handle_call(request, n)


async def stored(store: FaultyStore, kind: str, key: str) -> bytes:
    record = await store.inner.load(kind, key)
    assert record is not None
    return record.data


@pytest.mark.parametrize("error", [KeyboardInterrupt(), SystemExit(1)], ids=repr)
async def test_a_commit_raising_a_base_exception_is_never_reported_as_committed(
    error, autojump_clock
):
    store = FaultyStore()
    got: dict[str, Any] = {}
    with pytest.raises(type(error)):
        async with PersistentSupervisor(store=store) as sup:
            refs = [await sup.start(Count, 0, key=key) for key in "ab"]
            store.fail_next("commit", error=error)

            async def call(ref: ServerRef) -> None:
                try:
                    got[ref.key] = await ref.call("add")
                except trio_pgs.TrioPGSError as exc:
                    got[ref.key] = exc

            async with trio.open_nursery() as nursery:
                for ref in refs:
                    nursery.start_soon(call, ref)
    # A caller may have been cancelled with the block (the supervisor shuts down):
    # every answer given must be true.
    for key, answer in got.items():
        if answer == 1:  # told committed: it must be
            assert await stored(store, Count.kind, key) == b"1"
        else:
            assert isinstance(answer, OutcomeUnknown), repr(answer)


async def test_ctrl_c_inside_a_call_leaves_trio_and_the_acknowledged_states_intact(
    autojump_clock, monkeypatch
):
    """The signal lands in the caller's task just as `ReplySlot.wait` blocks."""
    real_wait = trio.lowlevel.wait_task_rescheduled
    armed = False

    async def interrupted_wait(abort: Any) -> Any:
        nonlocal armed
        if armed and sys._getframe(1).f_code.co_name == "wait":
            armed = False
            raise KeyboardInterrupt
        return await real_wait(abort)

    monkeypatch.setattr(trio.lowlevel, "wait_task_rescheduled", interrupted_wait)
    store = FaultyStore()
    with pytest.raises(KeyboardInterrupt):
        async with PersistentSupervisor(store=store, shutdown_timeout=2) as sup:
            ref = await sup.start(WriteBehind, 0, key="a")
            for _ in range(3):
                await ref.call("add")  # acknowledged, pending
            armed = True
            try:
                async with trio.open_nursery() as nursery:  # a caller of its own
                    nursery.start_soon(ref.call, "add")
            except BaseExceptionGroup as group:  # our nursery wraps the lone Ctrl-C
                assert group.subgroup(KeyboardInterrupt) is not None
                raise KeyboardInterrupt from None
    assert await stored(store, WriteBehind.kind, "a") in (b"3", b"4")


async def test_ctrl_c_in_a_handlers_child_task_shuts_down_in_order(autojump_clock):
    store = FaultyStore()
    with pytest.raises(KeyboardInterrupt):  # the bare interrupt, not a group
        async with PersistentSupervisor(store=store, shutdown_timeout=2) as sup:
            a = await sup.start(WriteBehind, 0, key="a")
            b = await sup.start(WriteBehind, 0, key="b")
            for _ in range(3):
                await a.call("add")
                await b.call("add")
            with pytest.raises(trio_pgs.SupervisorNotRunning):
                await a.call("fan out")
    assert await stored(store, WriteBehind.kind, "a") == b"3"
    assert await stored(store, WriteBehind.kind, "b") == b"3"


async def test_max_active_is_a_bound_again_after_concurrent_calls(autojump_clock):
    async with PersistentSupervisor(store=MemoryStore(), max_active=2, idle_timeout=3600) as sup:
        refs = [await sup.start(Count, 0, key=f"k{i}") for i in range(20)]
        async with trio.open_nursery() as nursery:
            for ref in refs:
                nursery.start_soon(ref.call, "add")
        await wait_all_idle(sup)
        assert sup.statistics().active <= 2


class Waker(PersistentServer[int]):
    """Its on_activate calls the caller back (armed), or casts to itself (kick)."""

    kind = "hostile.waker"
    armed = False
    kick = False

    async def on_activate(self, n: int) -> int:
        if Waker.armed:
            await ServerRef(self.ref.supervisor, Asker.kind, "b").call("ping")
        if Waker.kick:
            await self.ref.cast("resume")
        return n

    async def handle_cast(self, message: Any, n: int) -> Any:
        return NoReply(n + 1)

    async def handle_call(self, request: Any, n: int) -> Any:
        return Reply(n, n, persist=False)


class Asker(PersistentServer[int]):
    kind = "hostile.asker"

    async def handle_call(self, request: Any, n: int) -> Any:
        if request == "wake by cast":
            await ServerRef(self.ref.supervisor, Waker.kind, "a").cast("hello")
            return Reply("done", n)
        if request == "ask peer":
            return Reply(await ServerRef(self.ref.supervisor, Count.kind, "p").call("get"), n)
        if request == "slow":
            await trio.sleep(0.5)
        return Reply("pong", n, persist=False)


async def test_a_cast_to_a_dormant_server_whose_on_activate_calls_back_does_not_hang(
    autojump_clock,
):
    Waker.armed = False
    async with PersistentSupervisor(store=MemoryStore(), servers=[Waker, Asker]) as sup:
        a = await sup.start(Waker, 0, key="a")
        b = await sup.start(Asker, 0, key="b")
        await hibernate(a)
        Waker.armed = True
        try:
            with trio.fail_after(60), pytest.raises(trio_pgs.ServerCrashed) as info:
                await b.call("wake by cast")
        finally:
            Waker.armed = False
        # B waited for A's activation while A's on_activate called B: a cycle, found
        # at once (A's call raised CallCycleError, so A's activation failed).
        causes = []
        error: BaseException | None = info.value
        while error is not None:
            causes.append(type(error))
            error = error.__cause__
        assert trio_pgs.CallCycleError in causes, causes
        assert await a.call("get") == 0  # A itself is fine once the cycle is gone


async def test_a_cast_to_itself_from_on_activate_does_not_hang_its_start(autojump_clock):
    Waker.kick = True
    try:
        async with PersistentSupervisor(store=MemoryStore()) as sup:
            with trio.fail_after(60):
                ref = await sup.start(Waker, 0, key="k")
                await wait_all_idle(sup)
            assert await ref.call("get") == 1
    finally:
        Waker.kick = False


@pytest.mark.parametrize("restart", [Restart.TEMPORARY, Restart.TRANSIENT])
async def test_a_call_refused_because_the_supervisor_shuts_down_is_not_a_crash(
    restart, autojump_clock, monkeypatch
):
    monkeypatch.setattr(Asker, "restart", restart)
    store = FaultyStore()
    got: dict[str, Any] = {}
    async with trio.open_nursery() as callers:
        async with PersistentSupervisor(
            store=store, servers=[Count, Asker], shutdown_timeout=5
        ) as sup:
            await sup.start(Count, 7, key="p")
            asker = await sup.start(Asker, 0, key="a")
            await hibernate(sup.ref(Count, "p"))

            async def call(request: str) -> None:
                try:
                    got[request] = await asker.call(request)
                except trio_pgs.TrioPGSError as exc:
                    got[request] = exc

            callers.start_soon(call, "slow")
            await trio.sleep(0.01)
            callers.start_soon(call, "ask peer")  # handled during the shutdown
            await trio.sleep(0.01)
    assert got["slow"] == "pong"
    assert isinstance(got["ask peer"], trio_pgs.SupervisorNotRunning), repr(got["ask peer"])
    assert sup.statistics().crashes == 0
    record = await store.inner.load(Asker.kind, "a")
    assert record is not None and record.crashes == ()  # nothing wiped, nothing counted


@pytest.mark.parametrize("idle_timeout", [60.0, None])
async def test_wait_all_idle_returns_once_a_slow_commit_finishes(idle_timeout, autojump_clock):
    store = FaultyStore()
    async with PersistentSupervisor(store=store, idle_timeout=idle_timeout) as sup:
        ref = await sup.start(Count, 0, key="c")
        store.commit_delay = 0.3
        await ref.cast("add")
        started = trio.current_time()
        with trio.fail_after(30):
            await wait_all_idle(sup)
        assert trio.current_time() - started < 1
        assert await stored(store, Count.kind, "c") == b"1"
