"""Calls, casts, infos and stops: what a caller observes."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from trio_pgs import (
    CallCycleError,
    NoReply,
    OutcomeUnknown,
    Persistence,
    PersistenceError,
    PersistentServer,
    PersistentSupervisor,
    Reply,
    RequestError,
    ServerCrashed,
    ServerNotFound,
    UnknownRequest,
)

from .servers import FaultyStore, Tally, TallyServer


async def test_call_returns_the_reply_and_commits_the_state(sup, store):
    ref = await sup.start(TallyServer, key="a")
    assert await ref.call(("add", "x")) == 1
    assert await ref.call(("add", "y")) == 2
    record = await store.load("tally", "a")
    assert record.data == b'{"items":["x","y"]}'


async def test_cast_and_send_are_handled_in_order(sup):
    ref = await sup.start(TallyServer, key="a")
    await ref.cast(("add", "1"))
    await ref.send(("add", "2"))
    await ref.cast(("add", "3"))
    assert await ref.call("get") == ["1", "2", "3"]


async def test_messages_are_handled_one_at_a_time(sup):
    ref = await sup.start(TallyServer, key="a")
    order = []

    async def slow_then_add(name: str, seconds: float) -> None:
        await ref.call(("sleep", seconds))
        order.append(name)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(slow_then_add, "slow", 1.0)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(slow_then_add, "fast", 0.0)
    assert order == ["slow", "fast"]


async def test_messages_from_one_sender_keep_their_order(sup, autojump_clock):
    ref = await sup.start(TallyServer, key="a")
    for i in range(50):
        await ref.cast(("add", str(i)))
    assert await ref.call("get") == [str(i) for i in range(50)]


async def test_call_of_a_never_started_key_raises_server_not_found(sup):
    with pytest.raises(ServerNotFound, match="tally/ghost"):
        await sup.ref(TallyServer, "ghost").call("get")


async def test_cast_to_a_never_started_key_raises_server_not_found(sup):
    with pytest.raises(ServerNotFound):
        await sup.ref(TallyServer, "ghost").cast(("add", "x"))


async def test_unknown_call_is_refused_with_unknown_request_not_a_crash(sup):
    ref = await sup.start(TallyServer, key="a")
    with pytest.raises(UnknownRequest):
        await ref.call(("nonsense",))
    assert await ref.call("get") == []
    assert sup.statistics().crashes == 0


async def test_handler_exception_reaches_the_caller_as_server_crashed(sup):
    ref = await sup.start(TallyServer, key="a")
    await ref.call(("add", "kept"))
    with pytest.raises(ServerCrashed, match="tally/a") as info:
        await ref.call("crash")
    assert isinstance(info.value.__cause__, RuntimeError)
    assert await ref.call("get") == ["kept"]


async def test_crash_after_in_place_mutation_does_not_leak_the_mutation(sup):
    ref = await sup.start(TallyServer, key="a")
    await ref.call(("add", "kept"))
    with pytest.raises(ServerCrashed):
        await ref.call(("mutate-then-crash", "leaked"))
    assert await ref.call("get") == ["kept"]


@pytest.mark.parametrize(
    "bad",
    [None, 42, "reply", ("reply", 1), NoReply],
    ids=["none", "int", "str", "tuple", "class"],
)
async def test_handler_returning_a_non_result_crashes_with_type_error(sup, bad):
    ref = await sup.start(TallyServer, key="a")
    with pytest.raises(ServerCrashed) as info:
        await ref.call(("return", bad))
    assert isinstance(info.value.__cause__, TypeError)
    assert "tally/a" in str(info.value.__cause__)
    assert "handle_call must return Reply / NoReply / Stop" in str(info.value.__cause__)


async def test_handler_returning_a_coroutine_crashes_and_says_await(sup):
    class Forgetful(PersistentServer[int]):
        async def helper(self, state: int) -> Reply[int]:
            return Reply(state, state)

        async def handle_call(self, request, state):
            return self.helper(state)  # forgot await

    ref = await sup.start(Forgetful, 0, key="f")
    with pytest.raises(ServerCrashed) as info:
        await ref.call("x")
    cause = info.value.__cause__
    assert isinstance(cause, TypeError)
    assert "forget 'await'" in str(cause) and "Forgetful/f" in str(cause)


async def test_reply_from_handle_cast_is_a_type_error_crash(sup, caplog):
    ref = await sup.start(TallyServer, key="a")
    await ref.cast(("return", Reply(1, Tally())))
    assert await ref.call("get") == []
    assert sup.statistics().crashes == 1
    assert "handle_cast must return NoReply / Stop" in caplog.text


def test_sync_hooks_are_refused_when_the_class_is_defined():
    with pytest.raises(TypeError, match="async def"):

        class Sync(PersistentServer[int]):
            def handle_call(self, request, state):  # type: ignore[override]
                return Reply(1, state)


async def test_self_call_raises_call_cycle_error_at_once(sup):
    ref = await sup.start(TallyServer, key="a")
    with pytest.raises(ServerCrashed) as info:
        await ref.call("call-self")
    assert isinstance(info.value.__cause__, CallCycleError)


async def test_a_b_a_call_cycle_raises_call_cycle_error_at_once(sup, autojump_clock):
    a = await sup.start(TallyServer, key="a")
    b = await sup.start(TallyServer, key="b")
    start = trio.current_time()
    with pytest.raises(ServerCrashed) as info:
        await a.call(("call", b, ("call", a, "get")))
    assert trio.current_time() == start  # no timeout was involved
    # the cycle error surfaces in b, crashing b; a's call then crashes a
    chain = info.value.__cause__
    while chain is not None and not isinstance(chain, CallCycleError):
        chain = chain.__cause__
    assert isinstance(chain, CallCycleError)
    assert "tally/a -> tally/b -> tally/a" in str(chain)


async def test_crossing_calls_raise_call_cycle_error_instead_of_deadlocking(
    sup, autojump_clock
):
    a = await sup.start(TallyServer, "in-a", key="a")
    b = await sup.start(TallyServer, "in-b", key="b")
    outcomes = {}

    async def call(name, ref, request) -> None:
        try:
            outcomes[name] = await ref.call(request)
        except ServerCrashed as exc:
            outcomes[name] = type(exc.__cause__).__name__

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(call, "sleep", b, ("sleep", 1))
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(call, "b->a", b, ("call", a, "get"))
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(call, "a->b", a, ("call", b, "get"))
    # a's handler waits on b; b's next message calls a: that call must give up
    assert outcomes == {"sleep": "slept", "b->a": "CallCycleError", "a->b": ["in-b"]}


async def test_a_call_that_returned_is_no_longer_a_wait_edge(sup, autojump_clock):
    a = await sup.start(TallyServer, "in-a", key="a")
    b = await sup.start(TallyServer, "in-b", key="b")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(a.call, ("call", b, ("sleep", 1)))
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(b.call, ("call", a, "get"))  # runs right after b replied to a
    assert await b.call(("call", a, "get")) == ["in-a"]
    assert sup.statistics().crashes == 0


async def test_calls_between_servers_work(sup):
    a = await sup.start(TallyServer, key="a")
    b = await sup.start(TallyServer, "from-b", key="b")
    assert await a.call(("call", b, "get")) == ["from-b"]


async def test_cancelled_caller_request_is_still_handled(sup, autojump_clock):
    ref = await sup.start(TallyServer, key="a")
    with trio.move_on_after(1):
        await ref.call(("sleep", 5))
    with trio.move_on_after(1):
        await ref.call(("add", "after-cancel"))  # queued behind the sleep; caller gives up
    assert await ref.call("get") == ["after-cancel"]


async def test_a_full_mailbox_makes_a_cast_wait(store, autojump_clock):
    async with PersistentSupervisor(store=store, mailbox_size=2) as sup:
        ref = await sup.start(TallyServer, key="a")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ref.call, ("sleep", 10))
            await trio.testing.wait_all_tasks_blocked()
            await ref.cast(("add", "1"))
            await ref.cast(("add", "2"))
            with trio.move_on_after(1) as scope:
                await ref.cast(("add", "3"))  # mailbox full: waits
            assert scope.cancelled_caught
            await ref.cast(("add", "4"))  # waits until the sleep ends, then goes in
        assert await ref.call("get") == ["1", "2", "4"]


async def test_stop_normal_wipes_the_record(sup, store):
    ref = await sup.start(TallyServer, key="a")
    assert await ref.call(("stop", "normal")) == "stopping"
    assert await store.load("tally", "a") is None
    with pytest.raises(ServerNotFound):
        await ref.call("get")


async def test_start_right_after_a_normal_stop_succeeds(sup):
    ref = await sup.start(TallyServer, "old", key="a")
    await ref.call(("stop", "normal"))
    again = await sup.start(TallyServer, "new", key="a")
    assert await again.call("get") == ["new"]


async def test_ref_stop_stops_after_queued_messages(sup, store):
    ref = await sup.start(TallyServer, key="a")
    await ref.cast(("add", "x"))
    await ref.stop()
    assert await store.load("tally", "a") is None


async def test_messages_queued_behind_a_normal_stop_get_server_not_found(sup, autojump_clock):
    ref = await sup.start(TallyServer, key="a")
    results = []

    async def call_get() -> None:
        try:
            results.append(await ref.call("get"))
        except ServerNotFound:
            results.append("not found")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ref.call, ("sleep", 1))
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(ref.stop)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(call_get)
    assert results == ["not found"]


async def test_deferred_reply_reaches_the_waiting_caller(sup):
    ref = await sup.start(TallyServer, key="a")
    async with trio.open_nursery() as nursery:
        got = []

        async def wait() -> None:
            got.append(await ref.call("wait"))

        nursery.start_soon(wait)
        nursery.start_soon(wait)
        await trio.testing.wait_all_tasks_blocked()
        assert got == []
        assert await ref.call(("release", "go")) == "released"
    assert got == ["go", "go"]


@pytest.mark.parametrize("replied", [True, False], ids=["replied", "still-owed"])
async def test_a_deferred_caller_whose_request_committed_is_not_told_to_retry(replied):
    """A caller's request is committed, its reply deferred; a later message (which
    gives that reply, or not) fails to commit its own change. The later message's
    caller gets `PersistenceError` (not committed: retry), the deferred caller
    `OutcomeUnknown` (its request was handled and committed: read before retrying):
    it was told "not committed, retry", and a retry applied its change twice."""
    store = FaultyStore()
    async with PersistentSupervisor(store=store) as sup:
        ref = await sup.start(TallyServer, key="a")
        errors: list[BaseException] = []

        async def deposit() -> None:
            try:
                await ref.call(("add-and-wait", "deposit"))
            except PersistenceError as exc:
                errors.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(deposit)
            await trio.testing.wait_all_tasks_blocked()
            assert (await store.load(TallyServer.kind, "a")).data == b'{"items":["deposit"]}'
            store.failing = True
            with pytest.raises(PersistenceError) as later:
                await ref.call(("release", "go") if replied else ("add", "other"))
            store.failing = False
        assert type(later.value) is PersistenceError
        [error] = errors
        assert isinstance(error, OutcomeUnknown), error
        assert "handled and committed" in str(error)
        assert await ref.call("get") == ["deposit"]


async def test_a_deferred_caller_whose_own_request_failed_to_commit_may_retry():
    """The other side of the test above: a request whose reply is deferred and whose
    own commit fails is not committed: `PersistenceError`, not `OutcomeUnknown`."""
    store = FaultyStore()
    async with PersistentSupervisor(store=store) as sup:
        ref = await sup.start(TallyServer, key="a")
        store.failing = True
        with pytest.raises(PersistenceError) as failed:
            await ref.call(("add-and-wait", "deposit"))
        store.failing = False
        assert type(failed.value) is PersistenceError
        assert await ref.call("get") == []


async def test_a_reply_through_the_callers_own_token_then_a_failed_commit_is_not_committed():
    """The handler replies through its own caller's token, then returns `NoReply`
    with a new state whose commit fails: the caller gets `PersistenceError` (not
    committed), not the `OutcomeUnknown` of a reply deferred from an earlier message."""
    store = FaultyStore()
    async with PersistentSupervisor(store=store) as sup:
        ref = await sup.start(TallyServer, key="a")
        store.failing = True
        with pytest.raises(PersistenceError) as failed:
            await ref.call(("add-and-reply-by-token", "x"))
        store.failing = False
        assert type(failed.value) is PersistenceError, failed.value
        assert await ref.call("get") == []


async def test_a_deferred_reply_given_while_its_own_commit_fails_is_not_committed():
    """A caller's request defers its reply; the reply is given by another task while
    that request's own commit is in flight, and the commit fails: the caller gets
    `PersistenceError` (not committed), not the `OutcomeUnknown` of a reply deferred
    from an earlier, committed message."""
    store = FaultyStore()
    async with PersistentSupervisor(store=store) as sup:
        ref = await sup.start(TallyServer, key="a")
        store.gate, store.failing = trio.Event(), True
        async with trio.open_nursery() as nursery:
            failed: list[BaseException] = []

            async def deposit() -> None:
                try:
                    await ref.call(("add-and-wait", "deposit"))
                except PersistenceError as exc:
                    failed.append(exc)

            nursery.start_soon(deposit)
            await trio.testing.wait_all_tasks_blocked()  # its commit waits at the gate
            [caller] = sup._entries[ref].activation.server.waiting
            await caller.reply("early")  # held until that commit's outcome
            store.gate.set()
        store.failing = False
        [error] = failed
        assert type(error) is PersistenceError, error
        assert await ref.call("get") == []


@pytest.mark.parametrize("how", ["refused-after-an-in-place-change", "write-conflict"])
async def test_a_caller_owed_a_reply_is_answered_when_its_server_goes_back_to_its_record(
    autojump_clock, how
):
    """A caller waits for a deferred reply; then its server goes back to its stored
    record, ending the activation that held the caller's token: a request refused after
    changing the state in place, or a WRITE_BEHIND write that meets a conflict. The
    caller gets `OutcomeUnknown` (its change may well be stored: read before
    retrying); it was never answered."""

    class Behind(TallyServer):
        kind = "behind"
        persistence = Persistence.WRITE_BEHIND
        max_lag = 1.0

    cls = TallyServer if how.startswith("refused") else Behind
    store = FaultyStore()
    async with PersistentSupervisor(store=store) as sup:
        ref = await sup.start(cls, key="a")
        got: list[BaseException] = []

        async def wait() -> None:
            try:
                with trio.fail_after(30):
                    await ref.call(("add-and-wait", "w"))
            except (OutcomeUnknown, trio.TooSlowError) as exc:
                got.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait)
            await trio.testing.wait_all_tasks_blocked()
            if cls is TallyServer:
                with pytest.raises(RequestError):
                    await ref.call(("mutate-then-refuse", "x"))
            else:
                await ref.call(("add", "y"))
                store.conflicting = True  # the deferred write meets a conflict
                await trio.sleep(2)
                store.conflicting = False
        [error] = got
        assert isinstance(error, OutcomeUnknown), error


async def test_a_deferred_reply_given_by_a_handler_that_then_refuses_in_place_is_not_released(
    sup,
):
    """A handler changes the state in place, replies to an earlier caller from it,
    then refuses: the server goes back to its stored state, so that reply (telling of
    a state that never was) is not released: the caller gets `OutcomeUnknown`; the
    refused caller its `RequestError`."""
    ref = await sup.start(TallyServer, key="a")
    got: list[BaseException] = []

    async def wait() -> None:
        try:
            await ref.call(("add-and-wait", "w"))
        except OutcomeUnknown as exc:
            got.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(RequestError, match="refused x"):
            await ref.call(("release-then-refuse", "x"))
    assert len(got) == 1
    assert await ref.call("get") == ["w"]


@pytest.mark.parametrize("reason", ["normal", "other"])
async def test_deferred_replies_given_by_a_stopping_handler_are_delivered(sup, reason):
    ref = await sup.start(TallyServer, key="a")
    got = []

    async def wait() -> None:
        got.append(await ref.call("wait"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait)
        nursery.start_soon(wait)
        await trio.testing.wait_all_tasks_blocked()
        assert await ref.call(("release-and-stop", reason)) == "stopping"
    assert got == ["bye", "bye"]


async def test_current_caller_outside_handle_call_is_a_runtime_error():
    from trio_pgs import current_caller

    with pytest.raises(RuntimeError, match="inside handle_call"):
        current_caller()


async def test_send_after_delivers_an_info_later(sup, autojump_clock):
    ref = await sup.start(TallyServer, key="a")
    assert await ref.call(("timer", 3, "tick")) == "armed"
    await trio.sleep(2)
    assert await ref.call("get") == []
    await trio.sleep(2)
    assert await ref.call("get") == ["tick"]


async def test_unknown_info_is_logged_and_ignored(sup, caplog):
    ref = await sup.start(TallyServer, key="a")
    await ref.send("what?")
    assert await ref.call("get") == []
    assert "ignored the info 'what?'" in caplog.text
    assert sup.statistics().crashes == 0
