"""Edge cases of the runtime: deferred replies and the output gate, shutdown with a slow
store, BaseExceptions, deadlocks nothing else detects, the max_active cap, memory
kept after a commit, and refusals.

Every test here is bounded in time: under ``autojump_clock`` a hang fails with
`trio.TooSlowError` after a few virtual seconds instead of blocking the suite.
"""

from __future__ import annotations

import collections
import contextlib
import gc
import json
import logging
import weakref
from typing import Any

import attrs
import pytest
import trio
import trio.testing

import trio_pgs
from trio_pgs import (
    CallCycleError,
    EventType,
    MemoryStore,
    NoReply,
    OutcomeUnknown,
    Persistence,
    PersistenceError,
    PersistentServer,
    PersistentSupervisor,
    Reply,
    RequestError,
    ServerCrashed,
    ServerRef,
    Stop,
    TrioPGSError,
    UnknownRequest,
    current_caller,
)
from trio_pgs.testing import FaultyStore, hibernate, wait_all_idle

from .servers import Tally, TallyServer

# -- helpers ---------------------------------------------------------------------------


async def capture(results: list[Any], fn: Any, *args: Any) -> None:
    """Append what ``await fn(*args)`` returned, or the exception it raised."""
    try:
        results.append(await fn(*args))
    except Exception as exc:
        results.append(exc)


def causes(exc: BaseException | None) -> list[BaseException]:
    """*exc* and its chain of causes and contexts."""
    seen: list[BaseException] = []
    while exc is not None and exc not in seen:
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    return seen


def caused_by_cycle(result: Any) -> bool:
    return isinstance(result, BaseException) and any(
        isinstance(e, CallCycleError) for e in causes(result)
    )


class SentStore(FaultyStore):
    """A `FaultyStore` that records which keys were handed to ``commit`` (before any
    hold or delay): the store was asked, whatever it answered."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[str] = []

    async def commit(self, operations: Any) -> None:
        for operation in operations:
            record = getattr(operation, "record", None)
            self.sent.append(record.key if record is not None else operation.key)
        await super().commit(operations)


#: Deferred-reply tokens taken by `Deferring` servers (reset for every test).
CALLERS: list[trio_pgs.Caller] = []


@pytest.fixture(autouse=True)
def _reset_globals() -> None:
    CALLERS.clear()
    SPAWNED.clear()
    CYCLE_SEEN.clear()
    BOXES.clear()


class Deferring(PersistentServer[int]):
    """An int counter whose "defer" call changes the state and answers later."""

    kind = "edges.deferring"

    async def handle_call(self, request: Any, state: int) -> Any:
        match request:
            case "defer":  # the new state must be committed before any reply
                CALLERS.append(current_caller())
                return NoReply(state + 1)
            case "get":
                return Reply(state, state)
        return await super().handle_call(request, state)


async def stored_int(store: Any, kind: str, key: str) -> int:
    record = await store.load(kind, key)
    return int(record.data)


# -- 1. deferred replies obey the output gate ---------------------------------------------


async def test_a_deferred_reply_given_by_another_task_waits_for_the_commit(autojump_clock):
    store = FaultyStore()
    async with PersistentSupervisor(store=store) as sup:
        ref = await sup.start(Deferring, 0, key="d")
        store.hold_commits()
        got: list[Any] = []
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(capture, got, ref.call, "defer")
                await trio.testing.wait_all_tasks_blocked()
                [caller] = CALLERS
                # Another task answers while the state 1 is still being committed.
                nursery.start_soon(caller.reply, "done")
                await trio.sleep(1)
                assert got == []  # not before the commit of the state it answers for
                assert await stored_int(store, "edges.deferring", "d") == 0
                store.release_commits()
        assert got == ["done"]
        assert await stored_int(store, "edges.deferring", "d") == 1


async def test_a_deferred_reply_whose_commit_fails_gives_persistence_error(autojump_clock):
    store = FaultyStore()
    async with PersistentSupervisor(store=store) as sup:
        ref = await sup.start(Deferring, 0, key="d")
        store.hold_commits()
        store.fail_next("commit")
        got: list[Any] = []
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(capture, got, ref.call, "defer")
                await trio.testing.wait_all_tasks_blocked()
                [caller] = CALLERS
                nursery.start_soon(caller.reply, "done")  # its commit will fail
                await trio.testing.wait_all_tasks_blocked()
                store.release_commits()
        assert len(got) == 1
        assert isinstance(got[0], PersistenceError), got
        assert await ref.call("get") == 0  # the server went back to its stored state
        assert await stored_int(store, "edges.deferring", "d") == 0


# -- 2. shutdown with a slow writer ---------------------------------------------------------


async def test_a_caller_whose_commit_never_completes_at_shutdown_gets_outcome_unknown(
    autojump_clock,
):
    store = SentStore()
    got: list[Any] = []
    with trio.fail_after(30):
        async with trio.open_nursery() as callers:
            async with PersistentSupervisor(store=store, shutdown_timeout=1) as sup:
                ref = await sup.start(TallyServer, key="a")
                store.hold_commits()  # the store never answers again
                sent = len(store.sent)
                callers.start_soon(capture, got, ref.call, ("add", "x"))
                await trio.testing.wait_all_tasks_blocked()
                assert store.sent[sent:] == ["a"]  # its commit was handed to the store
                start = trio.current_time()
            elapsed = trio.current_time() - start
    assert len(got) == 1  # exactly one answer, and it tells the truth
    assert isinstance(got[0], OutcomeUnknown), repr(got[0])
    assert elapsed <= 1 + 1


async def test_a_caller_queued_behind_a_commit_that_never_completes_is_answered_at_shutdown(
    autojump_clock,
):
    store = FaultyStore()
    handled: list[Any] = []
    queued: list[Any] = []
    with trio.fail_after(30):
        async with trio.open_nursery() as callers:
            async with PersistentSupervisor(store=store, shutdown_timeout=1) as sup:
                ref = await sup.start(TallyServer, key="a")
                store.hold_commits()
                callers.start_soon(capture, handled, ref.call, ("add", "x"))
                await trio.testing.wait_all_tasks_blocked()
                callers.start_soon(capture, queued, ref.call, ("add", "y"))
                await trio.testing.wait_all_tasks_blocked()
                start = trio.current_time()
            elapsed = trio.current_time() - start
    assert len(handled) == 1 and len(queued) == 1
    assert isinstance(handled[0], TrioPGSError), repr(handled[0])
    # "y" was never handled (the output gate holds it behind "x"): an error, no success.
    assert isinstance(queued[0], TrioPGSError), repr(queued[0])
    assert not isinstance(queued[0], OutcomeUnknown), repr(queued[0])
    assert elapsed <= 1 + 1


async def test_a_deferred_reply_whose_commit_is_still_held_at_shutdown_is_not_a_success(
    autojump_clock,
):
    store = FaultyStore()
    got: list[Any] = []
    with trio.fail_after(30):
        async with trio.open_nursery() as callers:
            async with PersistentSupervisor(store=store, shutdown_timeout=1) as sup:
                ref = await sup.start(Deferring, 0, key="d")
                store.hold_commits()
                callers.start_soon(capture, got, ref.call, "defer")
                await trio.testing.wait_all_tasks_blocked()
                [caller] = CALLERS
                callers.start_soon(caller.reply, "done")
                await trio.testing.wait_all_tasks_blocked()
                start = trio.current_time()
            elapsed = trio.current_time() - start
    assert len(got) == 1
    assert got[0] != "done"  # its state was never committed: no success
    assert isinstance(got[0], OutcomeUnknown), repr(got[0])
    assert elapsed <= 1 + 1


async def test_a_caller_owed_a_reply_whose_state_commit_is_cut_off_gets_outcome_unknown(
    autojump_clock,
):
    store = FaultyStore()
    got: list[Any] = []
    with trio.fail_after(30):
        async with trio.open_nursery() as callers:
            async with PersistentSupervisor(store=store, shutdown_timeout=1) as sup:
                ref = await sup.start(Deferring, 0, key="d")
                store.hold_commits()
                callers.start_soon(capture, got, ref.call, "defer")  # no reply given
                await trio.testing.wait_all_tasks_blocked()
                start = trio.current_time()
            elapsed = trio.current_time() - start
    # Its request was handled and the new state handed to the store: committed or
    # not, nobody knows. "Not handled" or "not committed" would be a lie.
    assert len(got) == 1
    assert isinstance(got[0], OutcomeUnknown), repr(got[0])
    assert elapsed <= 1 + 1


class SlowToTerminate(TallyServer):
    kind = "edges.slow-terminate"

    async def terminate(self, reason: Any, state: Tally) -> None:
        if reason == "shutdown":
            await trio.sleep(100)


async def test_unflushed_does_not_list_a_server_whose_caller_was_told_success(
    autojump_clock,
):
    store = MemoryStore()
    with trio.fail_after(30):
        async with PersistentSupervisor(store=store, shutdown_timeout=1) as sup:
            ref = await sup.start(SlowToTerminate, key="a")
            assert await ref.call(("add", "x")) == 1  # acknowledged: committed
    assert (await store.load("edges.slow-terminate", "a")).data == b'{"items":["x"]}'
    # Its terminate was cut off, but no message of it was lost.
    assert "edges.slow-terminate/a" not in sup.statistics().unflushed


# -- 3. a Stop cut off at shutdown ----------------------------------------------------------


def stop_request(item: str) -> Any:
    # TallyServer returns ("return", value) as is: a Stop with a changed state.
    return ("return", Stop(Tally([item]), reason="other", reply="bye"))


async def test_a_stop_whose_commit_never_completes_at_shutdown_gets_outcome_unknown(
    autojump_clock,
):
    store = FaultyStore()
    got: list[Any] = []
    with trio.fail_after(30):
        async with trio.open_nursery() as callers:
            async with PersistentSupervisor(store=store, shutdown_timeout=1) as sup:
                ref = await sup.start(TallyServer, key="a")
                store.hold_commits()
                callers.start_soon(capture, got, ref.call, stop_request("z"))
                await trio.testing.wait_all_tasks_blocked()
                start = trio.current_time()
            elapsed = trio.current_time() - start
    assert len(got) == 1
    # Not SupervisorNotRunning nor a plain PersistenceError: both say "not committed".
    assert isinstance(got[0], OutcomeUnknown), repr(got[0])
    assert elapsed <= 1 + 1


async def test_a_stop_whose_commit_lands_within_the_grace_is_not_reported_as_lost(
    autojump_clock,
):
    store = FaultyStore()
    got: list[Any] = []
    with trio.fail_after(30):
        async with trio.open_nursery() as callers:
            async with PersistentSupervisor(store=store, shutdown_timeout=1) as sup:
                ref = await sup.start(TallyServer, key="a")
                store.commit_delay = 1.5  # lands after shutdown_timeout, within +1 s
                callers.start_soon(capture, got, ref.call, stop_request("z"))
                await trio.testing.wait_all_tasks_blocked()
                start = trio.current_time()
            elapsed = trio.current_time() - start
    assert len(got) == 1
    assert got[0] == "bye" or isinstance(got[0], OutcomeUnknown), repr(got[0])
    if got[0] == "bye":
        assert (await store.load("tally", "a")).data == b'{"items":["z"]}'
    assert elapsed <= 1 + 1


# -- 4. KeyboardInterrupt and SystemExit ----------------------------------------------------


class Interruptible(TallyServer):
    kind = "edges.interruptible"
    persistence = Persistence.WRITE_BEHIND
    max_lag = 60.0

    async def handle_call(self, request: Any, state: Tally) -> Any:
        match request:
            case ("raise", exc_type):
                raise exc_type("from a handler")
        return await super().handle_call(request, state)


@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, SystemExit])
async def test_a_handler_raising_a_base_exception_comes_out_as_itself_and_keeps_acked_state(
    autojump_clock, exc_type
):
    store = MemoryStore()
    with trio.fail_after(30), pytest.raises(BaseException) as info:
        async with PersistentSupervisor(store=store) as sup:
            ref = await sup.start(Interruptible, key="k")
            assert await ref.call(("add", "x")) == 1  # acknowledged, pending (max_lag)
            assert await ref.call(("add", "y")) == 2
            with contextlib.suppress(TrioPGSError):  # what this caller gets is not the point
                await ref.call(("raise", exc_type))
            await trio.sleep_forever()
    assert type(info.value) is exc_type, repr(info.value)  # not an exception group
    async with PersistentSupervisor(store=store, servers=[Interruptible]) as sup:
        assert await sup.ref(Interruptible, "k").call("get") == ["x", "y"]


async def test_on_event_raising_keyboard_interrupt_does_not_stop_the_writer(autojump_clock):
    store = MemoryStore()
    armed = False
    acked: list[str] = []
    refused: list[tuple[str, Exception]] = []

    def on_event(event: trio_pgs.ServerEvent) -> None:
        nonlocal armed
        if armed and event.type is EventType.COMMITTED:
            armed = False
            raise KeyboardInterrupt("from on_event")

    with trio.fail_after(30), pytest.raises(BaseException) as info:
        async with PersistentSupervisor(store=store, on_event=on_event) as sup:
            ref = await sup.start(TallyServer, key="k")
            armed = True  # the commit of "x" raises KeyboardInterrupt in on_event
            for item in "xyz":
                try:
                    await ref.call(("add", item))
                except TrioPGSError as exc:
                    refused.append((item, exc))
                    break
                acked.append(item)
            await trio.sleep_forever()
    assert type(info.value) is KeyboardInterrupt, repr(info.value)
    items = json.loads((await store.load("tally", "k")).data)["items"]
    assert items[: len(acked)] == acked  # every acknowledged update is stored
    for item, exc in refused:
        # "x" was committed: its caller must not hear "not committed".
        assert item not in items or isinstance(exc, OutcomeUnknown), (item, exc)


# -- 5. deadlocks through full mailboxes and on_activate -------------------------------------


class Caster(TallyServer):
    kind = "edges.caster"
    mailbox_size = 1

    async def handle_call(self, request: Any, state: Tally) -> Any:
        match request:
            case ("sleep-then-cast", seconds, ref, message):
                await trio.sleep(seconds)
                await ref.cast(message)
                return Reply("cast", state)
            case ("sleep-then-cast-self", seconds):
                await trio.sleep(seconds)
                await self.ref.cast(("add", "self"))
                return Reply("cast", state)
        return await super().handle_call(request, state)


async def test_a_cast_to_its_own_full_mailbox_raises_call_cycle_error(autojump_clock):
    async with PersistentSupervisor(store=MemoryStore()) as sup:
        ref = await sup.start(Caster, key="a")
        got: list[Any] = []
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(capture, got, ref.call, ("sleep-then-cast-self", 1))
                await trio.testing.wait_all_tasks_blocked()
                await ref.cast(("add", "queued"))  # the mailbox (size 1) is now full
        assert len(got) == 1
        assert isinstance(got[0], ServerCrashed) and caused_by_cycle(got[0]), repr(got[0])


async def test_a_cast_to_a_full_server_that_is_calling_back_raises_call_cycle_error(
    autojump_clock,
):
    async with PersistentSupervisor(store=MemoryStore()) as sup:
        a = await sup.start(Caster, "in-a", key="a")
        b = await sup.start(Caster, "in-b", key="b")
        got: dict[str, list[Any]] = {"a": [], "b": []}
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                # a sleeps, then casts to b
                nursery.start_soon(
                    capture, got["a"], a.call, ("sleep-then-cast", 1, b, ("add", "from-a"))
                )
                await trio.testing.wait_all_tasks_blocked()
                # b calls a (queued behind a's sleep): b waits on a
                nursery.start_soon(capture, got["b"], b.call, ("call", a, "get"))
                await trio.testing.wait_all_tasks_blocked()
                await b.cast(("add", "queued"))  # b's mailbox (size 1) is now full
        assert len(got["a"]) == 1 and len(got["b"]) == 1
        assert caused_by_cycle(got["a"][0]) or caused_by_cycle(got["b"][0]), got


@attrs.define
class Peer:
    ref: ServerRef | None = None


class CallsOnActivate(PersistentServer[Peer]):
    """on_activate calls its peer (if any), which calls back."""

    kind = "edges.calls-on-activate"

    async def on_activate(self, state: Peer) -> Peer:
        if state.ref is not None:
            await state.ref.call(("record-call", self.ref))
        return state

    async def handle_call(self, request: Any, state: Peer) -> Any:
        match request:
            case ("set", ref):
                return Reply(None, Peer(ref))
            case "get":
                return Reply(None, state)
        return await super().handle_call(request, state)


#: What `CallsBack` saw when it called back (reset for every test).
CYCLE_SEEN: list[BaseException] = []


class CallsBack(TallyServer):
    kind = "edges.calls-back"

    async def handle_call(self, request: Any, state: Tally) -> Any:
        match request:
            case ("record-call", ref):
                try:
                    return Reply(await ref.call("get"), state)
                except Exception as exc:
                    CYCLE_SEEN.append(exc)
                    raise
        return await super().handle_call(request, state)


async def test_on_activate_calling_a_server_that_calls_back_does_not_hang_start(
    autojump_clock,
):
    async with PersistentSupervisor(store=MemoryStore()) as sup:
        b = await sup.start(CallsBack, key="b")
        with trio.fail_after(10), pytest.raises(TrioPGSError):
            await sup.start(CallsOnActivate, Peer(b), key="a")
        assert len(CYCLE_SEEN) == 1 and isinstance(CYCLE_SEEN[0], CallCycleError)


async def test_on_activate_calling_a_server_that_calls_back_does_not_hang_a_call(
    autojump_clock,
):
    async with PersistentSupervisor(store=MemoryStore()) as sup:
        b = await sup.start(CallsBack, key="b")
        a = await sup.start(CallsOnActivate, Peer(), key="a")
        await a.call(("set", b))
        await hibernate(a)
        with trio.fail_after(10), pytest.raises(TrioPGSError):
            await a.call("get")  # activates a: on_activate calls b, b calls a
        assert len(CYCLE_SEEN) == 1 and isinstance(CYCLE_SEEN[0], CallCycleError)


# -- 6. max_active ---------------------------------------------------------------------------


async def test_max_active_does_not_reactivate_a_hot_server_for_every_call(autojump_clock):
    store = FaultyStore()
    activations: collections.Counter[str] = collections.Counter()

    def on_event(event: trio_pgs.ServerEvent) -> None:
        if event.type is EventType.ACTIVATED:
            activations[event.ref.key] += 1

    async with PersistentSupervisor(
        store=store, max_active=1, idle_timeout=1000, on_event=on_event
    ) as sup:
        a = await sup.start(TallyServer, key="a")
        b = await sup.start(TallyServer, key="b")  # a hibernates (over the cap)
        await wait_all_idle(sup)
        activations.clear()
        store.commit_delay = 0.1  # every commit takes a while: a waits on its own

        async def hot() -> None:
            for i in range(300):
                await a.call(("add", str(i)))

        with trio.fail_after(600):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(hot)
                await trio.sleep(1.05)  # a is waiting for its commit now
                assert await b.call("get") == []  # b activates: a is asked to hibernate
            await wait_all_idle(sup)
        assert activations["a"] <= 3, dict(activations)
        assert sup.statistics().active <= 1
        assert len(await a.call("get")) == 300


async def test_max_active_hibernates_a_server_that_was_busy_once_it_is_idle(autojump_clock):
    async with PersistentSupervisor(store=MemoryStore(), max_active=1, idle_timeout=1000) as sup:
        a = await sup.start(TallyServer, key="a")
        b = await sup.start(TallyServer, key="b")
        await wait_all_idle(sup)
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(a.call, ("sleep", 5))  # a activates, b hibernates
                await trio.testing.wait_all_tasks_blocked()
                assert await b.call("get") == []  # b activates while a is busy
            await wait_all_idle(sup)
        assert sup.statistics().active <= 1


# -- 7. a task spawned by a handler is not in its call chain ---------------------------------


#: What tasks spawned by `Spawner` got (reset for every test).
SPAWNED: list[Any] = []


class Spawner(TallyServer):
    kind = "edges.spawner"

    async def handle_call(self, request: Any, state: Tally) -> Any:
        match request:
            case ("spawn", nursery):
                nursery.start_soon(self._later, self.ref)
                return Reply("spawned", state)
        return await super().handle_call(request, state)

    @staticmethod
    async def _later(ref: ServerRef) -> None:
        await trio.sleep(1)  # the handler has long returned
        await capture(SPAWNED, ref.call, ("add", "later"))


async def test_a_task_spawned_by_a_handler_can_call_that_server_later(autojump_clock):
    async with PersistentSupervisor(store=MemoryStore()) as sup:
        ref = await sup.start(Spawner, key="a")
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                assert await ref.call(("spawn", nursery)) == "spawned"
        assert SPAWNED == [1]


# -- 8. release and rollback racing shutdown --------------------------------------------------


async def quarantined(store: Any, sup: PersistentSupervisor) -> ServerRef:
    ref = await sup.start(TallyServer, key="q")
    await ref.call(("add", "x"))
    for _ in range(3):  # max_crashes
        with contextlib.suppress(ServerCrashed):
            await ref.call("crash")
    await trio.testing.wait_all_tasks_blocked()
    assert (await store.load("tally", "q")).quarantined
    return ref


async def check_repair_outcome(store: Any, repair: str, result: Any) -> None:
    """A repair raced by shutdown either failed (an error says so) or is stored."""
    if isinstance(result, TrioPGSError):
        return
    assert result is None, repr(result)
    assert not (await store.load("tally", "q")).quarantined, (
        f"{repair}() returned None (success) but the record is still quarantined"
    )


@pytest.mark.parametrize("repair", ["release", "rollback"])
async def test_a_repair_cut_off_by_shutdown_does_not_report_success(autojump_clock, repair):
    store = FaultyStore()
    got: list[Any] = []
    with trio.fail_after(30):
        async with trio.open_nursery() as outside:
            async with PersistentSupervisor(store=store, keep_history=2, shutdown_timeout=1) as sup:
                ref = await quarantined(store, sup)
                store.hold_commits()  # the repair's commit never completes
                outside.start_soon(capture, got, getattr(sup, repair), ref)
                await trio.testing.wait_all_tasks_blocked()
                start = trio.current_time()
            elapsed = trio.current_time() - start
    assert len(got) == 1
    await check_repair_outcome(store, repair, got[0])
    assert elapsed <= 1 + 1


@pytest.mark.parametrize("repair", ["release", "rollback"])
async def test_a_repair_still_loading_at_shutdown_does_not_hang(autojump_clock, repair):
    store = FaultyStore()
    got: list[Any] = []
    with trio.fail_after(30):
        async with trio.open_nursery() as outside:
            async with PersistentSupervisor(store=store, keep_history=2, shutdown_timeout=1) as sup:
                ref = await quarantined(store, sup)
                store.load_delay = 1.0  # the repair's load is still running at exit
                outside.start_soon(capture, got, getattr(sup, repair), ref)
                await trio.testing.wait_all_tasks_blocked()
                start = trio.current_time()
            elapsed = trio.current_time() - start
    assert len(got) == 1
    await check_repair_outcome(store, repair, got[0])
    assert elapsed <= 1 + 1


# -- 9. nothing keeps a committed state alive after hibernation ------------------------------


@attrs.define
class Box:
    n: int = 0


#: Weak references to the states `Boxing` produced (reset for every test).
BOXES: list[weakref.ref[Box]] = []


class Boxing(PersistentServer[Box]):
    kind = "edges.boxing"
    idle_timeout = None

    async def handle_call(self, request: Any, state: Box) -> Any:
        new = Box(state.n + 1)
        BOXES.append(weakref.ref(new))
        return Reply(new.n, new)


async def test_a_committed_state_is_garbage_once_its_server_hibernated():
    async with PersistentSupervisor(store=MemoryStore()) as sup:
        ref = await sup.start(Boxing, Box(), key="b")
        assert await ref.call("bump") == 1
        assert await ref.call("bump") == 2
        await hibernate(ref)
        await wait_all_idle(sup)
        assert sup.statistics().active == 0
        gc.collect()
        alive = [state for state in (box() for box in BOXES) if state is not None]
        holders = sorted(
            {type(r).__name__ for state in alive for r in gc.get_referrers(state)}
            - {"list"}  # alive itself
        )
        assert alive == [], f"kept alive by: {', '.join(holders)}"
        del alive
        assert await ref.call("bump") == 3  # from the store


# -- 10. refusals are not crashes ----------------------------------------------------------


class InsufficientFunds(RequestError):
    pass


@attrs.define
class Account:
    balance: int = 0
    log: list[str] = attrs.Factory(list)


class AccountServer(PersistentServer[Account]):
    kind = "edges.account"

    async def handle_call(self, request: Any, state: Account) -> Any:
        match request:
            case ("deposit", int(n)):
                new = Account(state.balance + n, [*state.log, f"+{n}"])
                return Reply(new.balance, new)
            case ("withdraw", int(n)):
                if n > state.balance:
                    raise InsufficientFunds(f"balance {state.balance} < {n}")
                new = Account(state.balance - n, [*state.log, f"-{n}"])
                return Reply(new.balance, new)
            case ("scribble-then-withdraw", int(n)):
                state.log.append(f"-{n}")  # in place, before refusing
                if n > state.balance:
                    raise InsufficientFunds(f"balance {state.balance} < {n}")
                return Reply(state.balance - n, Account(state.balance - n, state.log))
            case "get":
                return Reply(attrs.asdict(state), state)
        return await super().handle_call(request, state)

    async def handle_cast(self, message: Any, state: Account) -> Any:
        match message:
            case ("withdraw", int(n)):
                if n > state.balance:
                    raise InsufficientFunds(f"balance {state.balance} < {n} (cast)")
                return NoReply(Account(state.balance - n, [*state.log, f"-{n}"]))
        return await super().handle_cast(message, state)


async def test_a_request_error_reaches_the_caller_as_itself_and_is_not_a_crash(store):
    async with PersistentSupervisor(store=store) as sup:
        ref = await sup.start(AccountServer, Account(10), key="acc")
        with pytest.raises(InsufficientFunds, match="balance 10 < 50"):
            await ref.call(("withdraw", 50))
        assert await ref.call("get") == {"balance": 10, "log": []}
        assert sup.statistics().crashes == 0
        assert (await store.load("edges.account", "acc")).crashes == ()
        assert await ref.call(("withdraw", 4)) == 6


async def test_a_refusal_after_an_in_place_mutation_leaves_the_state_unchanged(store):
    async with PersistentSupervisor(store=store) as sup:
        ref = await sup.start(AccountServer, Account(10), key="acc")
        with pytest.raises(InsufficientFunds):
            await ref.call(("scribble-then-withdraw", 50))
        assert await ref.call("get") == {"balance": 10, "log": []}


async def test_request_errors_never_quarantine_a_server(store):
    async with PersistentSupervisor(store=store, max_crashes=3) as sup:
        ref = await sup.start(AccountServer, Account(10), key="acc")
        for _ in range(3 + 1):
            with contextlib.suppress(TrioPGSError):
                await ref.call(("withdraw", 50))
        assert await ref.call(("deposit", 5)) == 15
        assert sup.statistics().quarantined == 0


async def test_an_unknown_call_is_refused_with_unknown_request_not_a_crash(store):
    async with PersistentSupervisor(store=store) as sup:
        ref = await sup.start(AccountServer, Account(10), key="acc")
        with pytest.raises(UnknownRequest):
            await ref.call("what?")
        assert sup.statistics().crashes == 0
        assert await ref.call(("deposit", 1)) == 11


async def test_unknown_calls_never_quarantine_a_server_even_across_a_restart(store):
    async with PersistentSupervisor(store=store, max_crashes=3) as sup:
        ref = await sup.start(AccountServer, Account(10), key="acc")
        for i in range(3 + 1):
            with contextlib.suppress(TrioPGSError):
                await ref.call(("garbage", i))
    record = await store.load("edges.account", "acc")
    assert not record.quarantined and record.crashes == ()
    async with PersistentSupervisor(store=store, servers=[AccountServer], max_crashes=3) as sup:
        with pytest.raises(UnknownRequest):
            await ref.call("garbage")
        assert await ref.call(("deposit", 1)) == 11
        assert sup.statistics().crashes == 0


async def test_a_cast_refused_with_a_request_error_is_logged_and_dropped(store, caplog):
    caplog.set_level(logging.DEBUG, logger="trio_pgs")
    async with PersistentSupervisor(store=store) as sup:
        ref = await sup.start(AccountServer, Account(10), key="acc")
        await ref.cast(("withdraw", 50))
        assert await ref.call("get") == {"balance": 10, "log": []}
        assert sup.statistics().crashes == 0
        assert "balance 10 < 50 (cast)" in caplog.text
        await ref.cast(("withdraw", 5))  # the server goes on
        assert await ref.call("get") == {"balance": 5, "log": ["-5"]}


async def test_an_unknown_cast_is_logged_and_dropped_not_a_crash(store, caplog):
    caplog.set_level(logging.DEBUG, logger="trio_pgs")
    async with PersistentSupervisor(store=store) as sup:
        ref = await sup.start(AccountServer, Account(10), key="acc")
        await ref.cast("what?")
        assert await ref.call("get") == {"balance": 10, "log": []}
        assert sup.statistics().crashes == 0
        assert "what?" in caplog.text


# -- 2, on a real store: another connection holds SQLite's write lock -----------------------


async def test_shutdown_with_sqlite_locked_by_another_connection_is_bounded_and_truthful(
    tmp_path,
):
    """A 20 s write lock held by another process's connection: leaving the supervisor
    takes about shutdown_timeout + 1 s, not 20 s, and the caller whose commit the
    store thread is stuck on hears that its outcome is unknown."""
    import sqlite3

    from trio_pgs import DiskCacheStore

    directory = tmp_path / "state"
    got: list[Any] = []
    locker = None
    try:
        with trio.fail_after(10):  # the lock is held for 20 s
            async with trio.open_nursery() as callers:
                async with PersistentSupervisor(
                    store=DiskCacheStore(directory), shutdown_timeout=1
                ) as sup:
                    ref = await sup.start(TallyServer, key="a")
                    locker = sqlite3.connect(directory / "cache.db", timeout=0)
                    locker.execute("BEGIN IMMEDIATE")  # the write lock, for good
                    callers.start_soon(capture, got, ref.call, ("add", "x"))
                    await trio.sleep(0.2)  # the store thread is now waiting on the lock
                    started = trio.current_time()
                elapsed = trio.current_time() - started
    finally:
        if locker is not None:
            locker.rollback()
            locker.close()
    assert len(got) == 1
    assert isinstance(got[0], OutcomeUnknown), repr(got[0])
    assert elapsed < 1 + 1 + 1  # shutdown_timeout, the store's close grace, slack


class SlowToClose(MemoryStore):
    async def close(self) -> None:
        await trio.sleep(10)
        await super().close()


class SlowEverywhere(PersistentServer[int]):
    kind = "edges.slow-everywhere"

    async def handle_call(self, request: Any, n: int) -> Any:
        await trio.sleep(100)  # cut off at the deadline
        return Reply(n, n)

    async def terminate(self, reason: Any, n: int) -> None:
        await trio.sleep(100)  # cut off by the grace


async def test_the_whole_exit_is_bounded_by_shutdown_timeout_plus_one_second(autojump_clock):
    async with trio.open_nursery() as callers:
        async with PersistentSupervisor(store=SlowToClose(), shutdown_timeout=1) as sup:
            ref = await sup.start(SlowEverywhere, 0, key="s")
            callers.start_soon(capture, [], ref.call, "go")
            await trio.testing.wait_all_tasks_blocked()
            started = trio.current_time()
        elapsed = trio.current_time() - started
    assert elapsed <= 1 + 1 + 0.1
