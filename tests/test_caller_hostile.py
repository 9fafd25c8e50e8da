"""Hostile tests of deferred replies (`current_caller`, `NoReply`) and call-cycle
detection, written from docs/guide.md ("Deferred replies", "No deadlocks"),
docs/lifecycle.md and the API docstrings only.

The caller token and the call chain are made lazily (only when asked for): these
tests take them late, twice, from other tasks, from the wrong hooks, after the owner
is gone, and build the cycles the docs promise to detect.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

import trio_pgs
from trio_pgs import (
    ActivationFailed,
    CallCycleError,
    NoReply,
    OutcomeUnknown,
    PersistentServer,
    PersistentSupervisor,
    Reply,
    ServerCrashed,
    Stop,
    current_caller,
    testing,
)

#: Tokens and observations, shared between handlers, tasks and the test body.
TOKENS: dict[str, Any] = {}
SEEN: list[tuple[str, str]] = []
EVENTS: dict[str, trio.Event] = {}
SUP: dict[str, PersistentSupervisor] = {}
NURSERY: dict[str, trio.Nursery] = {}


@pytest.fixture(autouse=True)
def _reset() -> None:
    TOKENS.clear()
    SEEN.clear()
    EVENTS.clear()
    SUP.clear()
    NURSERY.clear()


def event(name: str) -> trio.Event:
    if name not in EVENTS:
        EVENTS[name] = trio.Event()
    return EVENTS[name]


def probe(where: str) -> None:
    """Record what `current_caller()` does here: "token" or "RuntimeError"."""
    try:
        token = current_caller()
    except RuntimeError:
        SEEN.append((where, "RuntimeError"))
    else:
        TOKENS.setdefault(f"probe:{where}", token)
        SEEN.append((where, "token"))


def outcome(where: str) -> str:
    found = [result for name, result in SEEN if name == where]
    assert found, f"{where} was never probed; seen: {SEEN}"
    assert len(set(found)) == 1, found
    return found[0]


async def quiet() -> None:
    await trio.testing.wait_all_tasks_blocked()


async def call_into(got: list[Any], ref: trio_pgs.ServerRef, request: Any) -> None:
    """Call *ref*; append its reply, or the trio-pgs error it raised, to *got*."""
    try:
        got.append(await ref.call(request))
    except trio_pgs.TrioPGSError as exc:
        got.append(exc)


# --------------------------------------------------------------------------- servers


class Deferrer(PersistentServer[int]):
    """A call server whose requests script what it does with its caller."""

    kind = "hostile.deferrer"
    idle_timeout = 5.0

    async def handle_call(self, request: Any, state: int) -> Any:
        match request:
            case ("twice", str(name)):
                TOKENS[name + ":1"] = current_caller()
                await trio.sleep(1)
                TOKENS[name + ":2"] = current_caller()
                return NoReply(state + 1)
            case ("twice-around-call", str(name), other):
                TOKENS[name + ":1"] = current_caller()
                assert await other.call(("reply-now", "inner")) == "inner"
                TOKENS[name + ":2"] = current_caller()
                return NoReply(state + 1)
            case ("reply-now", value):
                await current_caller().reply(value)
                return NoReply(state + 1)
            case ("token-and-reply", str(name), token_value, returned):
                caller = current_caller()
                TOKENS[name] = caller
                await caller.reply(token_value)
                return Reply(returned, state + 1)
            case ("keep", str(name)):
                TOKENS[name] = current_caller()
                return NoReply(state + 1)
            case ("take-but-reply", str(name), value):
                TOKENS[name] = current_caller()
                return Reply(value, state)
            case "noreply-no-token":
                return NoReply(state + 1)
            case ("reply-then-crash", value):
                await current_caller().reply(value)
                raise ValueError("crash after replying")
            case ("answer", str(name), value):
                await TOKENS[name].reply(value)
                return Reply("answered", state)
            case ("answer-and-stop", str(name), value):
                await TOKENS[name].reply(value)
                return Stop(state, reason="normal", reply="stopping")
            case "state":
                return Reply(state, state)
            case "boom":
                raise ValueError("boom")
        return await super().handle_call(request, state)


class Prober(PersistentServer[int]):
    """Probes `current_caller()` in every hook that is not `handle_call`."""

    kind = "hostile.prober"
    idle_timeout = 5.0

    async def init(self, value: int) -> int:
        probe("init")
        self.remind("r", after=2.0)
        return value

    async def on_activate(self, state: int) -> int:
        probe(f"on_activate:{state}")
        return state

    async def handle_call(self, request: Any, state: int) -> Any:
        match request:
            case "probe":
                probe("handle_call")
                return Reply("ok", state)
            case "arm-timer":
                self.send_after(1.0, "timer")
                return Reply("armed", state)
            case ("bump", int(n)):
                return Reply("bumped", n)
            case "stop-me":
                return Stop(state, reason="normal", reply="stopped")
            case "stop-keep":
                return Stop(state, reason="kept", reply="stopped")
        return await super().handle_call(request, state)

    async def handle_cast(self, message: Any, state: int) -> Any:
        probe(f"handle_cast:{message}")
        if message == "crash":
            raise ValueError("crash in cast")
        return NoReply(state)

    async def handle_info(self, message: Any, state: int) -> Any:
        if isinstance(message, trio_pgs.Reminder):
            probe("reminder")
        else:
            probe(f"handle_info:{message}")
        return NoReply(state)

    async def terminate(self, reason: Any, state: int) -> None:
        probe(f"terminate:{reason if isinstance(reason, str) else 'crash'}")


# ----------------------------------------------------------------- the token itself


@pytest.mark.parametrize("through", ["first", "second"])
async def test_current_caller_twice_around_an_await_is_one_caller(
    store, autojump_clock, through
):
    async with PersistentSupervisor(store=store) as sup:
        ref = await sup.start(Deferrer, 0, key="a")
        async with trio.open_nursery() as nursery:
            got: list[Any] = []
            nursery.start_soon(call_into, got, ref, ("twice", "t"))
            await trio.sleep(2)
            first, second = TOKENS["t:1"], TOKENS["t:2"]
            used, other = (first, second) if through == "first" else (second, first)
            assert not used.replied and not other.replied
            await used.reply("one")
            assert used.replied
            assert other.replied  # the same caller: the other token knows
            await other.reply("two")  # a second reply: ignored
        assert got == ["one"]
        assert await ref.call("state") == 1


async def test_current_caller_around_a_nested_deferred_call_is_still_ours(
    store, autojump_clock
):
    async with PersistentSupervisor(store=store) as sup:
        a = await sup.start(Deferrer, 0, key="a")
        b = await sup.start(Deferrer, 0, key="b")
        async with trio.open_nursery() as nursery:
            got: list[Any] = []
            nursery.start_soon(call_into, got, a, ("twice-around-call", "n", b))
            await quiet()
            first, second = TOKENS["n:1"], TOKENS["n:2"]
            assert not first.replied and not second.replied
            await second.reply("outer")
            assert first.replied
            await first.reply("again")
        assert got == ["outer"]


async def test_reply_through_token_and_returned_reply_gives_one_answer(
    store, autojump_clock
):
    async with PersistentSupervisor(store=store) as sup:
        ref = await sup.start(Deferrer, 0, key="a")
        result = await ref.call(("token-and-reply", "x", "by-token", "by-result"))
        # The token's reply was given first; later replies are ignored.
        assert result == "by-token"
        assert TOKENS["x"].replied
        assert await ref.call("state") == 1
        assert sup.statistics().crashes == 0


async def test_reply_through_token_then_noreply_is_released_after_commit(autojump_clock):
    inner = trio_pgs.MemoryStore()
    store = testing.FaultyStore(inner)
    async with PersistentSupervisor(store=store) as sup:
        ref = await sup.start(Deferrer, 0, key="a")
        got: list[Any] = []
        async with trio.open_nursery() as nursery:
            store.hold_commits()
            nursery.start_soon(call_into, got, ref, ("reply-now", "v"))
            await trio.sleep(10)
            assert got == []  # the commit is held: the reply is not released
            store.release_commits()
        assert got == ["v"]
        record = await inner.load("hostile.deferrer", "a")
        assert record is not None and record.data == b"1"


async def test_reply_through_token_then_crash_is_never_released(store, autojump_clock):
    async with PersistentSupervisor(store=store) as sup:
        ref = await sup.start(Deferrer, 0, key="a")
        with pytest.raises(ServerCrashed):
            await ref.call(("reply-then-crash", "leaked"))
        assert await ref.call("state") == 0


async def test_token_taken_but_reply_returned_lets_the_server_hibernate(
    store, autojump_clock
):
    async with PersistentSupervisor(store=store) as sup:
        ref = await sup.start(Deferrer, 0, key="a")
        assert await ref.call(("take-but-reply", "t", "v")) == "v"
        assert TOKENS["t"].replied
        await TOKENS["t"].reply("late")  # ignored
        await trio.sleep(Deferrer.idle_timeout * 3)
        assert sup.statistics().hibernations == 1
        assert sup.statistics().active == 0


async def test_token_replied_inside_handler_lets_the_server_hibernate(
    store, autojump_clock
):
    async with PersistentSupervisor(store=store) as sup:
        ref = await sup.start(Deferrer, 0, key="a")
        assert await ref.call(("reply-now", "v")) == "v"
        await trio.sleep(Deferrer.idle_timeout * 3)
        assert sup.statistics().hibernations == 1


async def test_stale_token_of_an_answered_call_does_not_answer_the_next(
    store, autojump_clock
):
    async with PersistentSupervisor(store=store) as sup:
        ref = await sup.start(Deferrer, 0, key="a")
        assert await ref.call(("take-but-reply", "old", "first")) == "first"
        got: list[Any] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(call_into, got, ref, ("keep", "new"))
            await quiet()
            await TOKENS["old"].reply("stale")
            await trio.sleep(1)
            assert got == []
            assert not TOKENS["new"].replied
            await TOKENS["new"].reply("fresh")
        assert got == ["fresh"]


async def test_stale_token_does_not_answer_a_noreply_without_token(
    store, autojump_clock
):
    async with PersistentSupervisor(store=store) as sup:
        ref = await sup.start(Deferrer, 0, key="a")
        assert await ref.call(("take-but-reply", "old", "first")) == "first"
        got: list[Any] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(call_into, got, ref, "noreply-no-token")
            await quiet()
            await TOKENS["old"].reply("stale")
            await trio.sleep(1)
            assert got == []
            await testing.crash(ref)
        assert len(got) == 1 and isinstance(got[0], ServerCrashed)


# --------------------------------------------- NoReply without ever taking the token


async def test_noreply_without_token_owes_a_reply_and_never_hibernates(
    store, autojump_clock
):
    async with PersistentSupervisor(store=store) as sup:
        ref = await sup.start(Deferrer, 0, key="a")
        got: list[Any] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(call_into, got, ref, "noreply-no-token")
            await trio.sleep(Deferrer.idle_timeout * 10)
            assert got == []
            assert sup.statistics().hibernations == 0
            assert sup.statistics().active == 1
            await testing.crash(ref)
        assert len(got) == 1 and isinstance(got[0], ServerCrashed)


async def test_noreply_without_token_then_stop_gives_server_crashed(
    store, autojump_clock
):
    async with PersistentSupervisor(store=store) as sup:
        ref = await sup.start(Deferrer, 0, key="a")
        got: list[Any] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(call_into, got, ref, "noreply-no-token")
            await quiet()
            await ref.stop(reason="kept")
        assert len(got) == 1 and isinstance(got[0], ServerCrashed)


async def test_noreply_without_token_at_shutdown_gives_outcome_unknown(
    store, autojump_clock
):
    got: list[Any] = []
    async with trio.open_nursery() as nursery:
        async with PersistentSupervisor(store=store) as sup:
            ref = await sup.start(Deferrer, 0, key="a")
            nursery.start_soon(call_into, got, ref, "noreply-no-token")
            await quiet()
        await quiet()
    assert len(got) == 1 and isinstance(got[0], OutcomeUnknown), got


async def test_kept_token_at_shutdown_gives_outcome_unknown_and_late_reply_is_ignored(
    store, autojump_clock
):
    got: list[Any] = []
    async with trio.open_nursery() as nursery:
        async with PersistentSupervisor(store=store) as sup:
            ref = await sup.start(Deferrer, 0, key="a")
            nursery.start_soon(call_into, got, ref, ("keep", "k"))
            await quiet()
        await quiet()
    assert len(got) == 1 and isinstance(got[0], OutcomeUnknown), got
    assert TOKENS["k"].replied  # an error was given to this caller
    await TOKENS["k"].reply("after close")  # later replies are ignored
    assert len(got) == 1


# ------------------------------------------------- replying from elsewhere, or late


async def test_reply_from_another_servers_handler(store, autojump_clock):
    async with PersistentSupervisor(store=store) as sup:
        a = await sup.start(Deferrer, 0, key="a")
        b = await sup.start(Deferrer, 0, key="b")
        got: list[Any] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(call_into, got, a, ("keep", "k"))
            await quiet()
            assert await b.call(("answer", "k", "from-b")) == "answered"
        assert got == ["from-b"]
        assert await a.call("state") == 1


async def test_reply_from_the_same_servers_later_message(store, autojump_clock):
    async with PersistentSupervisor(store=store) as sup:
        a = await sup.start(Deferrer, 0, key="a")
        got: list[Any] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(call_into, got, a, ("keep", "k"))
            await quiet()
            assert await a.call(("answer", "k", "later")) == "answered"
        assert got == ["later"]


async def test_late_reply_after_owner_crashed_is_ignored(store, autojump_clock):
    async with PersistentSupervisor(store=store) as sup:
        ref = await sup.start(Deferrer, 0, key="a")
        got: list[Any] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(call_into, got, ref, ("keep", "k"))
            await quiet()
            with pytest.raises(ServerCrashed):
                await ref.call("boom")
        assert len(got) == 1 and isinstance(got[0], ServerCrashed)
        assert TOKENS["k"].replied
        await TOKENS["k"].reply("too late")
        assert await ref.call("state") == 1  # the NoReply's state was committed
        assert len(got) == 1


async def test_late_reply_after_owner_stopped_is_ignored(store, autojump_clock):
    async with PersistentSupervisor(store=store) as sup:
        ref = await sup.start(Deferrer, 0, key="a")
        got: list[Any] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(call_into, got, ref, ("keep", "k"))
            await quiet()
            await ref.stop()
        assert len(got) == 1 and isinstance(got[0], ServerCrashed)
        assert TOKENS["k"].replied
        await TOKENS["k"].reply("too late")


async def test_reply_by_the_handler_that_stops_is_delivered(store, autojump_clock):
    async with PersistentSupervisor(store=store) as sup:
        ref = await sup.start(Deferrer, 0, key="a")
        got: dict[str, Any] = {}
        async with trio.open_nursery() as nursery:

            async def call(name: str) -> None:
                try:
                    got[name] = await ref.call(("keep", name))
                except ServerCrashed as exc:
                    got[name] = exc

            nursery.start_soon(call, "answered")
            await quiet()
            nursery.start_soon(call, "owed")
            await quiet()
            assert await ref.call(("answer-and-stop", "answered", "bye")) == "stopping"
        assert got["answered"] == "bye"
        assert isinstance(got["owed"], ServerCrashed)


# ------------------------------------------------- current_caller outside handle_call


async def test_current_caller_outside_any_server_raises_runtime_error():
    with pytest.raises(RuntimeError):
        current_caller()


async def test_current_caller_in_init_and_on_activate_raises(store, autojump_clock):
    async with PersistentSupervisor(store=store) as sup:
        await sup.start(Prober, 0, key="p")
        assert outcome("init") == "RuntimeError"
        assert outcome("on_activate:0") == "RuntimeError"


async def test_current_caller_in_on_activate_woken_by_a_call_raises(store, autojump_clock):
    async with PersistentSupervisor(store=store) as sup:
        ref = await sup.start(Prober, 0, key="p")
        assert await ref.call(("bump", 7)) == "bumped"
        await testing.hibernate(ref)
        assert outcome("terminate:hibernate") == "RuntimeError"
        assert await ref.call("probe") == "ok"  # wakes it: on_activate runs for a call
        assert outcome("on_activate:7") == "RuntimeError"
        assert outcome("handle_call") == "token"


async def test_current_caller_in_cast_and_info_after_a_call_raises(store, autojump_clock):
    async with PersistentSupervisor(store=store) as sup:
        ref = await sup.start(Prober, 0, key="p")
        assert await ref.call("probe") == "ok"
        await ref.cast("after-call")
        await ref.send("after-call")
        assert await ref.call("probe") == "ok"
        assert outcome("handle_cast:after-call") == "RuntimeError"
        assert outcome("handle_info:after-call") == "RuntimeError"


async def test_current_caller_in_cast_sent_from_a_handle_call_raises(
    store, autojump_clock
):
    class Caster(PersistentServer[int]):
        kind = "hostile.caster"

        async def handle_call(self, request: Any, state: int) -> Any:
            await request.cast("from-call")
            await request.send("from-call")
            return Reply("cast", state)

    async with PersistentSupervisor(store=store) as sup:
        prober = await sup.start(Prober, 0, key="p")
        caster = await sup.start(Caster, 0, key="c")
        assert await caster.call(prober) == "cast"
        assert await prober.call("probe") == "ok"
        assert outcome("handle_cast:from-call") == "RuntimeError"
        assert outcome("handle_info:from-call") == "RuntimeError"


async def test_current_caller_in_timer_and_reminder_raises(store, autojump_clock):
    async with PersistentSupervisor(store=store) as sup:
        ref = await sup.start(Prober, 0, key="p")
        assert await ref.call("arm-timer") == "armed"
        await trio.sleep(3)
        assert outcome("handle_info:timer") == "RuntimeError"
        assert outcome("reminder") == "RuntimeError"


@pytest.mark.parametrize(
    ("how", "where"),
    [
        ("stop-me", "terminate:normal"),
        ("stop-keep", "terminate:kept"),
        ("ref.stop", "terminate:normal"),
        ("crash-cast", "terminate:crash"),
        ("shutdown", "terminate:shutdown"),
    ],
)
async def test_current_caller_in_terminate_raises(store, autojump_clock, how, where):
    async with PersistentSupervisor(store=store) as sup:
        ref = await sup.start(Prober, 0, key="p")
        assert await ref.call("probe") == "ok"
        if how in ("stop-me", "stop-keep"):
            assert await ref.call(how) == "stopped"
        elif how == "ref.stop":
            await ref.stop()
        elif how == "crash-cast":
            await ref.cast("crash")
            await quiet()
    assert outcome(where) == "RuntimeError"


# ------------------------------------------------------------- tasks of a handler


async def test_task_in_handlers_own_nursery_sees_and_uses_the_token(
    store, autojump_clock
):
    class Spawner(PersistentServer[int]):
        kind = "hostile.spawner"

        async def handle_call(self, request: Any, state: int) -> Any:
            async def helper() -> None:
                await trio.sleep(1)
                await current_caller().reply("from-task")

            async with trio.open_nursery() as nursery:
                nursery.start_soon(helper)
            return NoReply(state + 1)

    async with PersistentSupervisor(store=store) as sup:
        ref = await sup.start(Spawner, 0, key="s")
        assert await ref.call("go") == "from-task"


async def test_task_in_outer_nursery_sees_token_only_while_handler_runs(
    store, autojump_clock
):
    class Spawner(PersistentServer[int]):
        kind = "hostile.outer-spawner"

        async def handle_call(self, request: Any, state: int) -> Any:
            if request == "go":
                NURSERY["outer"].start_soon(outer_task)
                await event("task-probed").wait()
                return NoReply(state + 1)
            return Reply(state, state)

    async def outer_task() -> None:
        probe("task-during")
        event("task-probed").set()
        await event("handler-returned").wait()
        probe("task-after")
        if "probe:task-during" in TOKENS:
            await TOKENS["probe:task-during"].reply("kept-by-task")

    async with PersistentSupervisor(store=store) as sup:
        ref = await sup.start(Spawner, 0, key="s")
        got: list[Any] = []
        async with trio.open_nursery() as nursery:
            NURSERY["outer"] = nursery
            nursery.start_soon(call_into, got, ref, "go")
            await event("task-probed").wait()
            await quiet()
            assert await ref.call("state") == 1  # the "go" handler has returned
            event("handler-returned").set()
        assert outcome("task-during") == "token"
        assert outcome("task-after") == "RuntimeError"
        assert got == ["kept-by-task"]


async def test_task_in_outer_nursery_calling_its_server_after_return_is_no_cycle(
    store, autojump_clock
):
    class Spawner(PersistentServer[int]):
        kind = "hostile.outer-caller"

        async def handle_call(self, request: Any, state: int) -> Any:
            if request == "go":
                NURSERY["outer"].start_soon(call_back, self.ref)
                return Reply("spawned", state)
            return Reply("pong", state)

    got: list[Any] = []

    async def call_back(ref: Any) -> None:
        try:
            got.append(await ref.call("ping"))
        except CallCycleError as exc:
            got.append(exc)

    async with PersistentSupervisor(store=store) as sup:
        ref = await sup.start(Spawner, 0, key="s")
        async with trio.open_nursery() as nursery:
            NURSERY["outer"] = nursery
            assert await ref.call("go") == "spawned"
    assert got == ["pong"]


async def test_task_in_handlers_own_nursery_calling_its_server_is_a_cycle(
    store, autojump_clock
):
    class Spawner(PersistentServer[int]):
        kind = "hostile.inner-caller"

        async def handle_call(self, request: Any, state: int) -> Any:
            if request != "go":
                return Reply("pong", state)
            got: list[Any] = []

            async def call_back() -> None:
                try:
                    got.append(await self.ref.call("ping"))
                except CallCycleError as exc:
                    got.append(type(exc).__name__)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(call_back)
            return Reply(got, state)

    async with PersistentSupervisor(store=store) as sup:
        ref = await sup.start(Spawner, 0, key="s")
        with trio.fail_after(60):
            assert await ref.call("go") == ["CallCycleError"]


# ------------------------------------------------------------------- call cycles


class Relay(PersistentServer[int]):
    """("via", [ref, ...], last): call the first ref with the rest; a CallCycleError
    is caught and answered as "cycle"."""

    kind = "hostile.relay"
    idle_timeout = 5.0

    async def on_activate(self, state: int) -> int:
        target = TOKENS.get(f"activate:{self.ref.key}")
        if target is not None:
            try:
                SEEN.append(("on_activate", await target.call(("hop",))))
            except CallCycleError:
                SEEN.append(("on_activate", "cycle"))
        return state

    async def handle_call(self, request: Any, state: int) -> Any:
        match request:
            case ("via", [first, *rest]):
                try:
                    return Reply(await first.call(("via", rest)), state + 1)
                except CallCycleError:
                    return Reply(f"cycle at {self.ref.key}", state)
            case ("via", []):
                return Reply(f"end at {self.ref.key}", state + 1)
            case ("twice", other):
                one = await other.call(("via", []))
                two = await other.call(("via", []))
                return Reply([one, two], state)
            case ("wait-then", str(name), target):
                await event(name).wait()
                try:
                    return Reply(await target.call(("via", [])), state)
                except CallCycleError:
                    return Reply("cycle", state)
            case ("send", target, inner):
                return Reply(await target.call(inner), state)
            case ("cast-then-wait", target):
                await target.cast(("call", "cast", self.ref))
                await target.send(("call", "send", self.ref))
                await trio.sleep(2)
                return Reply("done", state + 1)
            case ("cast-to", target, message):
                await target.cast(message)
                return Reply("cast", state)
            case ("cast-and-return", target):
                await target.cast(("call-later", "cast", self.ref))
                await target.send(("call-later", "send", self.ref))
                return Reply("done", state + 1)
            case ("arm-timers", target):
                self.send_after(1.0, ("call", "timer", target))
                TOKENS["reminder-target"] = target
                self.remind("r", after=1.0)
                return Reply("armed", state + 1)
            case ("tasks", list(requests)):
                results: list[Any] = [None] * len(requests)

                async def one(i: int, target: Any, inner: Any) -> None:
                    try:
                        results[i] = await target.call(inner)
                    except CallCycleError:
                        results[i] = "cycle"

                async with trio.open_nursery() as nursery:
                    for i, (target, inner) in enumerate(requests):
                        nursery.start_soon(one, i, target, inner)
                return Reply(results, state)
            case "outer-task-calls-me":
                done = trio.Event()
                results = []

                async def call_me() -> None:
                    try:
                        results.append(await self.ref.call(("via", [])))
                    except CallCycleError:
                        results.append("cycle")
                    done.set()

                NURSERY["outer"].start_soon(call_me)
                await done.wait()  # waits on a task that calls this very server
                return Reply(results, state)
            case ("hop",):
                return Reply("hopped", state)
            case ("start", str(key)):
                try:
                    await SUP["sup"].start(Relay, 0, key=key)
                except ServerCrashed as exc:
                    return Reply(type(exc.__cause__).__name__, state)
                return Reply("started", state)
            case ("call-dormant", target):
                try:
                    return Reply(await target.call(("via", [])), state)
                except ActivationFailed as exc:
                    return Reply(f"activation failed: {exc.__cause__!r}", state)
            case ("defer", str(name)):
                TOKENS[name] = current_caller()
                return NoReply(state)
            case ("answer", str(name)):
                await TOKENS[name].reply("deferred-answer")
                return Reply("answered", state)
            case ("timeout-call", target, float(seconds)):
                with trio.move_on_after(seconds):
                    await target.call(("wait-then-call", self.ref))
                return Reply("gave up", state)
            case ("wait-then-call", target):
                await trio.sleep(5)
                try:
                    result = await target.call(("via", []))
                except CallCycleError:
                    result = "cycle"
                SEEN.append(("wait-then-call", result))
                return Reply(result, state)
        return await super().handle_call(request, state)

    async def handle_cast(self, message: Any, state: int) -> Any:
        return await self._call_from_async(message, state)

    async def handle_info(self, message: Any, state: int) -> Any:
        return await self._call_from_async(message, state)

    async def _call_from_async(self, message: Any, state: int) -> Any:
        if isinstance(message, trio_pgs.Reminder):
            message = ("call", "reminder", TOKENS["reminder-target"])
        match message:
            case ("call-later", str(tag), target):
                await trio.sleep(5)  # the sender's handler has long returned
                try:
                    SEEN.append((tag, await target.call(("via", []))))
                except CallCycleError:
                    SEEN.append((tag, "cycle"))
                return NoReply(state)
            case ("call", str(tag), target):
                try:
                    SEEN.append((tag, await target.call(("via", []))))
                except CallCycleError:
                    SEEN.append((tag, "cycle"))
                return NoReply(state)
        return await super().handle_cast(message, state)

    async def init(self, state: int) -> int:
        if "init" in TOKENS:
            target, request = TOKENS["init"]
            SEEN.append(("init", await target.call(request)))  # uncaught: crashes init
        return state


async def relays(sup: PersistentSupervisor, *keys: str) -> list[Any]:
    return [await sup.start(Relay, 0, key=key) for key in keys]


async def test_server_calling_itself_is_a_cycle(store, autojump_clock):
    async with PersistentSupervisor(store=store) as sup:
        [a] = await relays(sup, "a")
        with trio.fail_after(60):
            assert await a.call(("via", [a])) == "cycle at a"


async def test_a_b_a_is_a_cycle(store, autojump_clock):
    async with PersistentSupervisor(store=store) as sup:
        a, b = await relays(sup, "a", "b")
        with trio.fail_after(60):
            assert await a.call(("via", [b, a])) == "cycle at b"


async def test_a_b_c_a_is_a_cycle(store, autojump_clock):
    async with PersistentSupervisor(store=store) as sup:
        a, b, c = await relays(sup, "a", "b", "c")
        with trio.fail_after(60):
            assert await a.call(("via", [b, c, a])) == "cycle at c"
            # and once more from the middle of the ring
            assert await b.call(("via", [c, a, b])) == "cycle at a"


async def test_uncaught_cycle_crashes_the_calling_server(store, autojump_clock):
    class Plain(PersistentServer[int]):
        kind = "hostile.plain"

        async def handle_call(self, request: Any, state: int) -> Any:
            return Reply(await self.ref.call("again"), state)

    async with PersistentSupervisor(store=store) as sup:
        ref = await sup.start(Plain, 0, key="p")
        with trio.fail_after(60), pytest.raises(ServerCrashed) as info:
            await ref.call("go")
        assert isinstance(info.value.__cause__, CallCycleError)


async def test_a_calls_b_while_b_waits_on_a_is_a_cycle(store, autojump_clock):
    async with PersistentSupervisor(store=store) as sup:
        a, b = await relays(sup, "a", "b")
        got: dict[str, Any] = {}
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:

                async def call(name: str, ref: Any, request: Any) -> None:
                    got[name] = await ref.call(request)

                # A is busy until "go-a"; meanwhile B's handler calls A and waits.
                nursery.start_soon(call, "a", a, ("wait-then", "go-a", b))
                await quiet()
                nursery.start_soon(call, "b", b, ("via", [a]))
                await quiet()
                event("go-a").set()  # now A calls B, which waits on A
        assert got["a"] == "cycle"
        assert got["b"] == "end at a"


async def test_on_activate_calling_an_idle_server_is_not_a_cycle(store, autojump_clock):
    async with PersistentSupervisor(store=store) as sup:
        a, b = await relays(sup, "a", "b")
        await testing.hibernate(a)
        TOKENS["activate:a"] = b
        with trio.fail_after(60):
            # B's handler gets ("hop",) from on_activate: no cycle there.
            assert await a.call(("via", [])) == "end at a"
        assert SEEN == [("on_activate", "hopped")]


async def test_call_from_callee_back_into_activating_server_is_a_cycle(
    store, autojump_clock
):
    class Back(PersistentServer[int]):
        kind = "hostile.back"

        async def handle_call(self, request: Any, state: int) -> Any:
            try:
                return Reply(await request.call(("via", [])), state)
            except CallCycleError:
                return Reply("cycle", state)

    async with PersistentSupervisor(store=store) as sup:
        [a] = await relays(sup, "a")
        back = await sup.start(Back, 0, key="back")
        await testing.hibernate(a)

        class Target:
            async def call(self, request: Any) -> Any:
                return await back.call(a)

        TOKENS["activate:a"] = Target()
        with trio.fail_after(60):
            assert await a.call(("via", [])) == "end at a"
        assert SEEN == [("on_activate", "cycle")]


async def test_on_activate_calling_back_the_server_that_woke_it_is_a_cycle(
    store, autojump_clock
):
    async with PersistentSupervisor(store=store) as sup:
        a, b = await relays(sup, "a", "b")
        await testing.hibernate(a)
        TOKENS["activate:a"] = b  # A's on_activate calls B, which is calling A
        with trio.fail_after(60):
            result = await b.call(("call-dormant", a))
        assert result == "end at a"
        assert SEEN == [("on_activate", "cycle")]


# Was a bug (fixed): B's handler starts A, A's init calls B: deadlock (the caller hangs until the
# shutdown deadline) instead of CallCycleError; `start` does not carry the call chain
# into init, though "init and on_activate are part of the call chain".
async def test_init_calling_back_the_server_that_starts_it_is_a_cycle(
    store, autojump_clock
):
    async with PersistentSupervisor(store=store) as sup:
        SUP["sup"] = sup
        [b] = await relays(sup, "b")
        TOKENS["init"] = (b, ("via", []))  # A's init calls B, which is starting A
        with trio.fail_after(60):
            assert await b.call(("start", "a")) == "CallCycleError"


# Was a bug (fixed): B's handler starts A, A's first on_activate calls B: deadlock, no
# CallCycleError (the same call from the on_activate of a woken A is detected).
async def test_on_activate_of_a_server_started_by_a_handler_calling_back_is_a_cycle(
    store, autojump_clock
):
    async with PersistentSupervisor(store=store) as sup:
        SUP["sup"] = sup
        [b] = await relays(sup, "b")
        TOKENS["activate:a"] = b  # A's first on_activate calls B, which is starting A
        with trio.fail_after(60):
            assert await b.call(("start", "a")) == "started"
        assert SEEN == [("on_activate", "cycle")]


async def test_call_into_a_server_whose_init_is_calling_is_a_cycle(
    store, autojump_clock
):
    """The docs' own case, for init: while A's init calls B, a call from B's handler
    to A raises CallCycleError in B."""
    async with PersistentSupervisor(store=store) as sup:
        [b] = await relays(sup, "b")
        TOKENS["init"] = (b, ("via", [sup.ref(Relay, "a")]))
        with trio.fail_after(60):
            await sup.start(Relay, 0, key="a")
        assert SEEN == [("init", "cycle at b")]


async def test_outside_caller_of_a_waiting_handler_is_no_cycle(store, autojump_clock):
    """Control for the test below: B's handler calls A 5 s later, nobody waits on B."""
    async with PersistentSupervisor(store=store) as sup:
        a, b = await relays(sup, "a", "b")
        with trio.fail_after(60):
            assert await b.call(("wait-then-call", a)) == "end at a"


async def test_chain_of_twenty_servers_is_not_a_cycle(store, autojump_clock):
    async with PersistentSupervisor(store=store) as sup:
        refs = await relays(sup, *[str(i) for i in range(20)])
        with trio.fail_after(60):
            assert await refs[0].call(("via", refs[1:])) == "end at 19"


async def test_same_server_twice_in_one_handler_is_not_a_cycle(store, autojump_clock):
    async with PersistentSupervisor(store=store) as sup:
        a, b = await relays(sup, "a", "b")
        with trio.fail_after(60):
            assert await a.call(("twice", b)) == ["end at b", "end at b"]
            # and the chain A -> B that returned leaves no trace: B may call A now
            assert await b.call(("via", [a])) == "end at a"


async def test_diamond_is_not_a_cycle(store, autojump_clock):
    async with PersistentSupervisor(store=store) as sup:
        a, b, c, d = await relays(sup, "a", "b", "c", "d")
        with trio.fail_after(60):
            assert await a.call(("via", [b, d])) == "end at d"
            assert await a.call(("via", [c, d])) == "end at d"
            assert await b.call(("via", [c, d])) == "end at d"


async def test_deferred_reply_owner_calling_the_waiting_caller_is_a_cycle(
    store, autojump_clock
):
    """A's handler waits on B, which deferred its reply (NoReply, token kept); B's
    handler, on another message, calls A: A waits on B, so that call would wait for
    ever."""
    async with PersistentSupervisor(store=store) as sup:
        a, b = await relays(sup, "a", "b")
        got: dict[str, Any] = {}
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:

                async def call(name: str, ref: Any, request: Any) -> None:
                    got[name] = await ref.call(request)

                nursery.start_soon(call, "a", a, ("send", b, ("defer", "bt")))
                await quiet()
                assert "bt" in TOKENS and "a" not in got
                got["b"] = await b.call(("via", [a]))
                await TOKENS["bt"].reply("late")
        assert got["b"] == "cycle at b"
        assert got["a"] == "late"


async def test_after_deferred_reply_is_given_no_cycle_remains(store, autojump_clock):
    async with PersistentSupervisor(store=store) as sup:
        a, b = await relays(sup, "a", "b")
        got: dict[str, Any] = {}
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:

                async def call(name: str, ref: Any, request: Any) -> None:
                    got[name] = await ref.call(request)

                nursery.start_soon(call, "a", a, ("send", b, ("defer", "bt")))
                await quiet()
                assert await b.call(("answer", "bt")) == "answered"
            # A no longer waits on B: B may call A, and A may call B.
            assert await b.call(("via", [a])) == "end at a"
            assert await a.call(("via", [b])) == "end at b"
        assert got["a"] == "deferred-answer"


# Was a bug (fixed): a call A gave up on (cancelled) still counts: B's later call to the idle A
# raises CallCycleError (and crashes B if uncaught), though it would not wait at all.
async def test_cancelled_inner_call_no_longer_waits(store, autojump_clock):
    """A's handler gives up on B after 1 s and returns; B, still handling, calls A 5 s
    later: A no longer waits on B, so this is no cycle."""
    async with PersistentSupervisor(store=store) as sup:
        a, b = await relays(sup, "a", "b")
        with trio.fail_after(60):
            assert await a.call(("timeout-call", b, 1.0)) == "gave up"
            await trio.sleep(10)
            await testing.wait_all_idle(sup)
            assert await b.call(("via", [])) == "end at b"
        # B's "wait-then-call" handler, after 5 s, called A: which answered.
        assert SEEN == [("wait-then-call", "end at a")]
        assert sup.statistics().crashes == 0


# ------------------------------------------------------------------- cancellation


async def test_cancelled_caller_with_pending_deferred_reply(store, autojump_clock):
    async with PersistentSupervisor(store=store) as sup:
        ref = await sup.start(Deferrer, 0, key="a")
        with pytest.raises(trio.TooSlowError):
            with trio.fail_after(2):
                await ref.call(("keep", "gone"))
        await TOKENS["gone"].reply("nobody listens")  # no error
        got: list[Any] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(call_into, got, ref, ("keep", "next"))
            await quiet()
            await TOKENS["gone"].reply("stale again")
            await trio.sleep(1)
            assert got == []
            await TOKENS["next"].reply("fresh")
        assert got == ["fresh"]
        assert await ref.call("state") == 2
        assert sup.statistics().crashes == 0


async def test_move_on_after_while_deferred_then_server_goes_on(store, autojump_clock):
    async with PersistentSupervisor(store=store) as sup:
        ref = await sup.start(Deferrer, 0, key="a")
        with trio.move_on_after(1) as scope:
            await ref.call("noreply-no-token")
        assert scope.cancelled_caught
        assert await ref.call(("reply-now", "alive")) == "alive"
        assert await ref.call("state") == 2


# Was a bug (fixed): a cast/send carried the sender's call chain: B's handle_cast/handle_info
# calling A got CallCycleError although A does not wait on B.
async def test_cast_and_send_from_a_handler_carry_no_call_chain(store, autojump_clock):
    """A's handler casts (and sends) to B and goes on; B's handlers then call A. A does
    not wait on B, so those calls just wait for A's handler to finish."""
    async with PersistentSupervisor(store=store) as sup:
        a, b = await relays(sup, "a", "b")
        with trio.fail_after(60):
            assert await a.call(("cast-then-wait", b)) == "done"
            await testing.wait_all_idle(sup)
        assert sorted(SEEN) == [("cast", "end at a"), ("send", "end at a")]


# Was a bug (fixed): even once the casting handler returned and A is idle, B's cast handler
# calling A got CallCycleError ("... use cast ..." says the message).
async def test_call_back_after_the_casting_handler_returned_is_no_cycle(
    store, autojump_clock
):
    """A's handler casts (and sends) to B and returns. 5 s later, A idle, B's handlers
    call A: nobody waits on anybody, the docs' own advice ("cast") to talk back."""
    async with PersistentSupervisor(store=store) as sup:
        a, b = await relays(sup, "a", "b")
        with trio.fail_after(60):
            assert await a.call(("cast-and-return", b)) == "done"
            await trio.sleep(10)
            await testing.wait_all_idle(sup)
        assert sorted(SEEN) == [("cast", "end at a"), ("send", "end at a")]


# Was a bug (fixed): the docs' own "talk back by cast" pattern: A's handle_cast of B's cast cannot
# call the idle B (CallCycleError), the cast carried B's call chain [A, B].
async def test_talk_back_by_cast_then_call_is_no_cycle(store, autojump_clock):
    """The docs' advice: A calls B; B talks back to A by a cast and replies. Later A's
    handle_cast calls B, which is idle: no cycle."""
    async with PersistentSupervisor(store=store) as sup:
        a, b = await relays(sup, "a", "b")
        with trio.fail_after(60):
            talk_back = ("cast-to", a, ("call", "talk-back", b))
            assert await a.call(("send", b, talk_back)) == "cast"
            await testing.wait_all_idle(sup)
        assert SEEN == [("talk-back", "end at b")]


async def test_timer_and_reminder_handlers_carry_no_call_chain(store, autojump_clock):
    """Z calls A, whose handler arms a timer and a reminder and returns; when they fire,
    A's handle_info calls Z, which is idle by then."""
    async with PersistentSupervisor(store=store) as sup:
        z, a = await relays(sup, "z", "a")
        with trio.fail_after(60):
            assert await z.call(("send", a, ("arm-timers", z))) == "armed"
            await trio.sleep(3)
            await testing.wait_all_idle(sup)
        assert sorted(SEEN) == [("reminder", "end at z"), ("timer", "end at z")]


async def test_tasks_of_a_handler_calling_other_servers_are_no_cycle(
    store, autojump_clock
):
    async with PersistentSupervisor(store=store) as sup:
        a, b, c = await relays(sup, "a", "b", "c")
        requests = [(b, ("via", [])), (b, ("via", [])), (c, ("via", [b]))]
        with trio.fail_after(60):
            assert await a.call(("tasks", requests)) == ["end at b"] * 3


async def test_task_of_a_handler_whose_callee_calls_back_is_a_cycle(
    store, autojump_clock
):
    async with PersistentSupervisor(store=store) as sup:
        a, b = await relays(sup, "a", "b")
        with trio.fail_after(60):
            # the task calls B, whose handler calls A: A waits on its task
            assert await a.call(("tasks", [(b, ("via", [a]))])) == ["cycle at b"]
            # the task calls A itself
            assert await a.call(("tasks", [(a, ("via", []))])) == ["cycle"]


async def test_outer_task_calling_its_server_while_handler_waits_on_it_is_a_cycle(
    store, autojump_clock
):
    async with PersistentSupervisor(store=store) as sup:
        [a] = await relays(sup, "a")
        async with trio.open_nursery() as nursery:
            NURSERY["outer"] = nursery
            with trio.fail_after(60):
                assert await a.call("outer-task-calls-me") == ["cycle"]


async def test_many_deferred_callers_each_get_their_own_reply(store, autojump_clock):
    async with PersistentSupervisor(store=store) as sup:
        ref = await sup.start(Deferrer, 0, key="a")
        got: dict[int, Any] = {}
        async with trio.open_nursery() as nursery:

            async def call(i: int) -> None:
                got[i] = await ref.call(("keep", f"k{i}"))

            for i in range(30):
                nursery.start_soon(call, i)
                await quiet()
            for i in reversed(range(30)):
                await TOKENS[f"k{i}"].reply(i * 10)
                assert TOKENS[f"k{i}"].replied
        assert got == {i: i * 10 for i in range(30)}


@pytest.mark.parametrize("request_", [("keep", "k"), "noreply-no-token"])
async def test_forced_hibernation_waits_while_a_reply_is_owed(
    store, autojump_clock, request_
):
    async with PersistentSupervisor(store=store) as sup:
        ref = await sup.start(Deferrer, 0, key="a")
        got: list[Any] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(call_into, got, ref, request_)
            await quiet()
            nursery.start_soon(testing.hibernate, ref)
            await trio.sleep(Deferrer.idle_timeout * 4)
            assert sup.statistics().hibernations == 0
            assert got == []
            if "k" in TOKENS:
                await TOKENS["k"].reply("owed")
            else:
                await testing.crash(ref)
        assert len(got) == 1
        if "k" in TOKENS:
            assert got == ["owed"]
            assert sup.statistics().hibernations == 1  # idle now: it hibernated


@pytest.mark.parametrize("request_", [("keep", "k"), "noreply-no-token"])
async def test_max_active_never_hibernates_a_server_that_owes(
    store, autojump_clock, request_
):
    async with PersistentSupervisor(store=store, max_active=1) as sup:
        ref = await sup.start(Deferrer, 0, key="a")
        got: list[Any] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(call_into, got, ref, request_)
            await quiet()
            others = [await sup.start(Deferrer, 0, key=f"o{i}") for i in range(3)]
            for other in others:
                assert await other.call("state") == 0
            await trio.sleep(1)
            assert got == []
            assert sup.statistics().active >= 1
            # the owing server is still the same activation: its reply still comes
            if "k" in TOKENS:
                await TOKENS["k"].reply("still here")
            else:
                await testing.crash(ref)
        assert len(got) == 1
        if "k" in TOKENS:
            assert got == ["still here"]
        else:
            assert isinstance(got[0], ServerCrashed)


async def test_handler_of_a_cancelled_queued_caller_can_take_and_use_its_token(
    store, autojump_clock
):
    async with PersistentSupervisor(store=store) as sup:
        ref = await sup.start(Deferrer, 0, key="a")
        async with trio.open_nursery() as nursery:

            async def busy() -> None:
                await ref.call(("twice", "busy"))

            nursery.start_soon(busy)  # handler busy for 1 s, then owes a reply
            await quiet()
            with trio.move_on_after(0.5):
                await ref.call(("reply-now", "nobody"))  # queued, caller gives up
            await trio.sleep(2)
            await TOKENS["busy:1"].reply("done")
        assert await ref.call("state") == 2  # both handled, committed
        assert sup.statistics().crashes == 0
