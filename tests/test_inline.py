"""Calls handled in the caller's task (docs/internals.md, "What a call costs").

A call to a server that only waits for a message, whose ``handle_call`` has no
``await``, runs that handler in the caller's task. Everything a user can see must be
as when the server's task handles it: each scenario below runs on `TallyServer`
(whose ``handle_call`` awaits, so its server's task always handles it) and on
`InlineTally` (the same answers, no await), and expects the same outcome.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import json
import sys
from typing import Any

import pytest
import trio
import trio.testing

from trio_pgs import (
    MemoryStore,
    NoReply,
    Persistence,
    PersistenceError,
    PersistentServer,
    PersistentSupervisor,
    Reply,
    RequestError,
    Restart,
    ServerCrashed,
    ServerNotFound,
    StateEncodingError,
    TrioPGSError,
)
from trio_pgs._inline import cannot_suspend
from trio_pgs.testing import FaultyStore, wait_all_idle

from .servers import InlineTally, TallyServer

BOTH = pytest.mark.parametrize("cls", [TallyServer, InlineTally], ids=["task", "inline"])


async def items_in(store: Any, cls: type[TallyServer], key: str) -> list[str] | None:
    """What is committed for *key*."""
    record = await store.load(cls.kind, key)
    return None if record is None else json.loads(record.data)["items"]


# -- which handlers ---------------------------------------------------------------------


class Shapes:
    async def plain(self) -> int:
        return 1

    async def awaits(self) -> int:
        await trio.lowlevel.checkpoint()
        return 1

    async def uses_async_with(self) -> int:
        async with trio.open_nursery():
            return 1

    async def uses_async_for(self) -> int:
        async for _ in self.generator():
            return 1
        return 0

    async def awaits_in_a_comprehension(self) -> list[int]:
        return [await trio.sleep(0) or 1 for _ in range(2)]

    async def defines_an_awaiting_function(self) -> Any:
        async def inner() -> None:
            await trio.sleep(0)
        return inner  # defined, not awaited: this frame cannot suspend

    async def generator(self) -> Any:
        yield 1

    def synchronous(self) -> int:
        return 1


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("plain", True),
        ("defines_an_awaiting_function", True),
        ("awaits", False),
        ("uses_async_with", False),
        ("uses_async_for", False),
        ("awaits_in_a_comprehension", False),
        ("generator", False),
        ("synchronous", False),
    ],
)
def test_cannot_suspend_reads_the_code(name: str, expected: bool) -> None:
    assert cannot_suspend(getattr(Shapes(), name)) is expected


def test_cannot_suspend_refuses_what_is_not_a_plain_method() -> None:
    shapes = Shapes()
    assert not cannot_suspend(Shapes.plain)  # a function, not bound
    assert not cannot_suspend(functools.partial(Shapes.plain, shapes))
    assert not cannot_suspend(lambda: shapes.plain())


# -- where it runs ----------------------------------------------------------------------


TASKS: list[trio.lowlevel.Task] = []
SEEN: list[Any] = []
VAR: contextvars.ContextVar[str] = contextvars.ContextVar("test_inline.VAR", default="unset")


class Where(PersistentServer[int]):
    kind = "inline.where"

    async def on_activate(self, state: int) -> int:
        VAR.set("the server's")
        return state

    async def handle_call(self, request: Any, state: int) -> Any:
        TASKS.append(trio.lowlevel.current_task())
        SEEN.append((VAR.get(), trio.lowlevel.currently_ki_protected()))
        VAR.set(f"set by {request}")
        return Reply(state + 1, state + 1)


class AwaitingWhere(Where):
    kind = "inline.awaiting-where"

    async def handle_call(self, request: Any, state: int) -> Any:
        await trio.lowlevel.checkpoint()
        return await super().handle_call(request, state)


@pytest.fixture(autouse=True)
def clear() -> None:
    TASKS.clear()
    SEEN.clear()


async def test_a_waiting_servers_call_runs_in_the_callers_task_with_the_servers_context(
    autojump_clock,
):
    async with PersistentSupervisor(store=MemoryStore()) as sup:
        ref = await sup.start(Where, 0, key="k")
        await wait_all_idle(sup)
        assert await ref.call("a") == 1
        assert await ref.call("b") == 2
        me = trio.lowlevel.current_task()
        assert TASKS == [me, me]
        # The server's context variables, as its own task would see them (what the
        # previous handler set included), and never the caller's; KeyboardInterrupt-
        # protected, as a server task's handlers are (a Ctrl-C goes to the main task).
        assert SEEN == [("the server's", True), ("set by a", True)]
        assert VAR.get() == "unset"


async def test_a_handler_that_awaits_runs_in_the_servers_task(autojump_clock):
    async with PersistentSupervisor(store=MemoryStore()) as sup:
        ref = await sup.start(AwaitingWhere, 0, key="k")
        await wait_all_idle(sup)
        assert await ref.call("a") == 1
        assert TASKS[0] is not trio.lowlevel.current_task()
        assert SEEN == [("the server's", True)]


async def test_a_call_while_a_commit_is_in_flight_waits_for_the_servers_task(autojump_clock):
    store = FaultyStore()
    async with PersistentSupervisor(store=store) as sup:
        ref = await sup.start(Where, 0, key="k")
        await wait_all_idle(sup)
        store.commit_delay = 1
        callers: list[trio.lowlevel.Task] = []
        replies: list[int] = []

        async def call(request: str) -> None:
            callers.append(trio.lowlevel.current_task())
            replies.append(await ref.call(request))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(call, "a")
            await trio.testing.wait_all_tasks_blocked()  # "a" handled, its commit slow
            nursery.start_soon(call, "b")
        assert replies == [1, 2]
        assert TASKS[0] is callers[0]  # handled at once, by its caller
        assert TASKS[1] is not callers[1]  # after the commit of "a", by the server's task


# -- the same outcomes as the server's task gives ------------------------------------------


@BOTH
async def test_a_call_commits_before_its_reply(autojump_clock, cls):
    store = FaultyStore(MemoryStore())
    async with PersistentSupervisor(store=store) as sup:
        ref = await sup.start(cls, key="k")
        await wait_all_idle(sup)
        store.commit_delay = 2
        assert await ref.call(("add", "x")) == 1
        assert trio.current_time() >= 2
        assert await items_in(store.inner, cls, "k") == ["x"]


@BOTH
async def test_a_cancelled_caller_leaves_its_update_committed(autojump_clock, cls):
    store = FaultyStore(MemoryStore())
    async with PersistentSupervisor(store=store) as sup:
        ref = await sup.start(cls, key="k")
        await wait_all_idle(sup)
        store.commit_delay = 3
        with trio.move_on_after(1) as scope:
            await ref.call(("add", "x"))
        assert scope.cancelled_caught
        assert await ref.call("get") == ["x"]


@BOTH
async def test_a_failed_commit_fails_the_call_and_the_server_goes_on_from_its_record(
    autojump_clock, cls
):
    store = FaultyStore(MemoryStore())
    async with PersistentSupervisor(store=store) as sup:
        ref = await sup.start(cls, "a", key="k")
        await wait_all_idle(sup)
        store.fail_next("commit")
        with pytest.raises(PersistenceError):
            await ref.call(("add", "x"))
        assert await ref.call(("add", "y")) == 2
        assert await ref.call("get") == ["a", "y"]


@BOTH
@pytest.mark.parametrize("request_", ["crash", ("mutate-then-crash", "x")])
async def test_a_crash_answers_with_server_crashed_and_restarts_from_the_record(
    autojump_clock, cls, request_
):
    store = MemoryStore()
    async with PersistentSupervisor(store=store, restart=Restart.PERMANENT) as sup:
        ref = await sup.start(cls, "a", key="k")
        await wait_all_idle(sup)
        with pytest.raises(ServerCrashed):
            await ref.call(request_)
        assert await ref.call("get") == ["a"]
        assert sup.statistics().crashes == 1
        assert json.loads((await store.load(cls.kind, "k")).data)["items"] == ["a"]


@BOTH
async def test_a_crash_of_a_temporary_server_wipes_it(autojump_clock, cls):
    store = MemoryStore()
    async with PersistentSupervisor(store=store, restart=Restart.TEMPORARY) as sup:
        ref = await sup.start(cls, "a", key="k")
        await wait_all_idle(sup)
        with pytest.raises(ServerCrashed):
            await ref.call("crash")
        with pytest.raises(ServerNotFound):
            await ref.call("get")
        assert await store.load(cls.kind, "k") is None


@BOTH
@pytest.mark.parametrize("mutate", [False, True])
async def test_a_refusal_commits_nothing_and_undoes_an_in_place_change(
    autojump_clock, cls, mutate
):
    async with PersistentSupervisor(store=MemoryStore()) as sup:
        ref = await sup.start(cls, "a", key="k")
        await wait_all_idle(sup)
        with pytest.raises(RequestError):
            await ref.call(("mutate-then-refuse" if mutate else "refuse", "x"))
        assert await ref.call("get") == ["a"]
        assert sup.statistics().crashes == 0


@BOTH
@pytest.mark.parametrize(("reason", "kept"), [("normal", False), ("pause", True)])
async def test_a_stop_replies_then_wipes_or_keeps_the_record(autojump_clock, cls, reason, kept):
    store = MemoryStore()
    async with PersistentSupervisor(store=store) as sup:
        ref = await sup.start(cls, "a", key="k")
        await wait_all_idle(sup)
        assert await ref.call(("add-and-stop", "b", reason)) == "stopping"
        assert (await store.load(cls.kind, "k") is not None) is kept
        if kept:
            assert await ref.call("get") == ["a", "b"]  # activated again
        else:
            with pytest.raises(ServerNotFound):
                await ref.call("get")


@BOTH
async def test_an_unencodable_state_is_a_crash_that_keeps_the_record(autojump_clock, cls):
    store = MemoryStore()
    async with PersistentSupervisor(store=store, restart=Restart.TEMPORARY) as sup:
        ref = await sup.start(cls, "a", key="k")
        await wait_all_idle(sup)
        with pytest.raises(StateEncodingError):
            await ref.call(("unencodable", object()))
        assert await ref.call("get") == ["a"]


@BOTH
async def test_a_bad_result_is_a_crash(autojump_clock, cls):
    async with PersistentSupervisor(store=MemoryStore()) as sup:
        ref = await sup.start(cls, "a", key="k")
        await wait_all_idle(sup)
        with pytest.raises(ServerCrashed) as info:
            await ref.call(("return", "not a Reply"))
        assert isinstance(info.value.__cause__, TypeError)
        assert await ref.call("get") == ["a"]


@BOTH
async def test_a_timer_armed_by_the_handler_fires(autojump_clock, cls):
    async with PersistentSupervisor(store=MemoryStore()) as sup:
        ref = await sup.start(cls, key="k")
        await wait_all_idle(sup)
        assert await ref.call(("timer", 2, "x")) == "armed"
        await trio.sleep(1)
        assert await ref.call("get") == []
        await trio.sleep(2)
        assert await ref.call("get") == ["x"]


@BOTH
@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, SystemExit])
async def test_a_handler_raising_a_base_exception_shuts_the_supervisor_down_with_it(
    autojump_clock, cls, exc_type
):
    class Raises(cls):  # type: ignore[valid-type, misc]
        kind = f"inline.raises-{cls.kind}"

        async def handle_call(self, request: Any, state: Any) -> Any:
            if request == "raise":
                raise exc_type("from a handler")
            return await super().handle_call(request, state)

    if cls is InlineTally:
        class Raises(InlineTally):  # type: ignore[no-redef]
            kind = "inline.raises-inline"

            async def handle_call(self, request: Any, state: Any) -> Any:
                if request == "raise":
                    raise exc_type("from a handler")
                return self.answer(request, state)

    store = MemoryStore()
    with trio.fail_after(30), pytest.raises(BaseException) as info:
        async with PersistentSupervisor(store=store) as sup:
            ref = await sup.start(Raises, key="k")
            await wait_all_idle(sup)
            assert await ref.call(("add", "x")) == 1
            with contextlib.suppress(TrioPGSError):
                await ref.call("raise")
            await trio.sleep_forever()
    assert type(info.value) is exc_type, repr(info.value)
    assert json.loads((await store.load(Raises.kind, "k")).data)["items"] == ["x"]


# -- what the server's task must still do after a call handled inline -----------------------


class Lagging(InlineTally):
    kind = "inline.lagging"
    persistence = Persistence.WRITE_BEHIND
    max_lag = 2.0
    idle_timeout = 100.0


class Reminded(PersistentServer[list[str]]):
    kind = "inline.reminded"
    idle_timeout = 100.0

    async def init(self) -> list[str]:
        return []

    async def handle_call(self, request: Any, state: list[str]) -> Any:
        self.remind("r", after=request)
        return Reply("set", state)

    async def handle_info(self, info: Any, state: list[str]) -> Any:
        return NoReply([*state, f"reminded at {trio.current_time():.0f}"])


async def test_a_deferred_write_begun_inline_is_written_after_max_lag(autojump_clock):
    store = MemoryStore()
    async with PersistentSupervisor(store=store) as sup:
        ref = await sup.start(Lagging, key="k")
        await wait_all_idle(sup)
        start = trio.current_time()
        assert await ref.call(("add", "x")) == 1
        assert trio.current_time() == start  # acknowledged at once (WRITE_BEHIND)
        assert await items_in(store, Lagging, "k") == []
        await trio.sleep(2.5)
        assert await items_in(store, Lagging, "k") == ["x"]  # not only at the idle timeout


async def test_a_reminder_set_inline_comes_when_due(autojump_clock):
    async with PersistentSupervisor(store=MemoryStore()) as sup:
        ref = await sup.start(Reminded, key="k")
        await wait_all_idle(sup)
        start = trio.current_time()
        assert await ref.call(3.0) == "set"  # the server waited with no deadline
        await trio.sleep(4)
        record = await sup.store.load(Reminded.kind, "k")
        assert json.loads(record.data) == [f"reminded at {start + 3:.0f}"]


@BOTH
async def test_max_active_still_bounds_the_active_servers(autojump_clock, cls):
    async with PersistentSupervisor(store=MemoryStore(), max_active=1, idle_timeout=1000) as sup:
        a = await sup.start(cls, key="a")
        b = await sup.start(cls, key="b")
        await wait_all_idle(sup)
        for i in range(5):
            assert await a.call(("add", str(i))) == i + 1
            assert await b.call(("add", str(i))) == i + 1
            await wait_all_idle(sup)
            assert sup.statistics().active <= 1


async def test_metrics_only_telemetry_keeps_calls_inline_and_tracing_does_not(autojump_clock):
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider

    from trio_pgs.otel import Telemetry

    me = trio.lowlevel.current_task()
    for provider, inline in [(trace.NoOpTracerProvider(), True), (TracerProvider(), False)]:
        TASKS.clear()
        telemetry = Telemetry(tracer_provider=provider)
        async with PersistentSupervisor(store=MemoryStore(), on_event=telemetry) as sup:
            ref = await sup.start(Where, 0, key="k")
            await wait_all_idle(sup)
            assert await ref.call("a") == 1
        assert (TASKS == [me]) is inline, provider


class Failing(PersistentServer[int]):
    kind = "inline.failing"

    async def init(self) -> int:
        return 0

    async def handle_call(self, request: Any, state: int) -> Any:
        if request == "boom":
            raise RuntimeError("handler bug")
        return Reply(repr(sys.exc_info()[1]), state)  # the exception it is handling


class AwaitingFailing(Failing):
    async def handle_call(self, request: Any, state: int) -> Any:
        await trio.lowlevel.checkpoint()
        return await super().handle_call(request, state)


@pytest.mark.parametrize("cls", [AwaitingFailing, Failing], ids=["task", "inline"])
async def test_a_caller_handling_an_exception_does_not_lend_it_to_the_handler(
    autojump_clock, cls
):
    async with PersistentSupervisor(store=MemoryStore()) as sup:
        ref = await sup.start(cls, key="k")
        await wait_all_idle(sup)
        try:
            raise KeyError("the caller's")
        except KeyError:
            assert await ref.call("look") == "None"
            with pytest.raises(ServerCrashed) as info:
                await ref.call("boom")
        cause = info.value.__cause__
        assert isinstance(cause, RuntimeError)
        assert cause.__context__ is None


class Becoming(PersistentServer[int]):
    """A state machine that swaps its own handle_call for one that awaits."""

    kind = "inline.becoming"

    async def init(self) -> int:
        return 0

    async def handle_call(self, request: Any, state: int) -> Any:
        self.handle_call = self.connected  # type: ignore[method-assign]
        return Reply("switched", state)

    async def connected(self, request: Any, state: int) -> Any:
        await trio.lowlevel.checkpoint()
        return Reply(("connected", request), state + 1)


async def test_a_handle_call_replaced_by_one_that_awaits_runs_in_the_servers_task(
    autojump_clock,
):
    async with PersistentSupervisor(store=MemoryStore()) as sup:
        ref = await sup.start(Becoming, key="k")
        await wait_all_idle(sup)
        assert await ref.call("a") == "switched"
        assert await ref.call("b") == ("connected", "b")
        assert await ref.call("c") == ("connected", "c")
        assert sup.statistics().crashes == 0
