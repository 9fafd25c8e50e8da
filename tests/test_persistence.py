"""EACH_MESSAGE persistence: commit before reply, group commit, failures (section 4)."""

from __future__ import annotations

import attrs
import pytest
import trio
import trio.testing

from trio_pgs import (
    PersistenceError,
    PersistentServer,
    PersistentSupervisor,
    Put,
    Reply,
    ServerCrashed,
    StateEncodingError,
)

from .servers import FaultyStore, TallyServer


async def test_reply_is_delivered_only_after_the_commit(autojump_clock):
    store = FaultyStore()
    async with PersistentSupervisor(store=store) as sup:
        ref = await sup.start(TallyServer, key="a")
        store.gate = trio.Event()
        got = []

        async def add() -> None:
            got.append(await ref.call(("add", "x")))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(add)
            await trio.sleep(5)
            assert got == []  # the commit is held: no reply yet
            assert (await store.inner.load("tally", "a")).data == b'{"items":[]}'
            store.gate.set()
        assert got == [1]
        assert (await store.inner.load("tally", "a")).data == b'{"items":["x"]}'


async def test_the_next_message_waits_for_the_previous_commit(autojump_clock):
    store = FaultyStore()
    async with PersistentSupervisor(store=store) as sup:
        ref = await sup.start(TallyServer, key="a")
        store.gate = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ref.call, ("add", "1"))
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(ref.call, ("add", "2"))
            await trio.sleep(1)
            assert sup.statistics().messages == 1  # "2" not handled while "1" commits
            store.gate.set()
        assert await ref.call("get") == ["1", "2"]


async def test_writes_of_many_servers_share_one_transaction(autojump_clock):
    store = FaultyStore()
    async with PersistentSupervisor(store=store) as sup:
        refs = [await sup.start(TallyServer, key=str(i)) for i in range(20)]
        store.gate = trio.Event()
        store.commits.clear()
        async with trio.open_nursery() as nursery:
            for ref in refs:
                nursery.start_soon(ref.call, ("add", "x"))
            await trio.sleep(1)
            store.gate.set()
        # the first commit was already waiting at the gate with one write; every
        # other write was pending meanwhile and went in the next transaction
        sizes = sorted(len(batch) for batch in store.commits)
        assert sum(sizes) == 20
        assert len(sizes) <= 3
        assert sup.statistics().mean_batch_size > 1


async def test_unchanged_state_is_not_rewritten(sup, store):
    ref = await sup.start(TallyServer, key="a")
    await ref.call(("add", "x"))
    before = sup.statistics().records_written
    for _ in range(5):
        await ref.call("get")  # returns the same state with persist=True
    assert sup.statistics().records_written == before
    assert (await store.load("tally", "a")).version == 2


async def test_persist_false_is_not_written(sup, store):
    ref = await sup.start(TallyServer, key="a")
    assert await ref.call(("add-volatile", "x")) == 1
    assert await ref.call("get") == ["x"]  # in memory: "get" persists it now
    ref2 = await sup.start(TallyServer, key="b")
    await ref2.call(("add-volatile", "y"))
    assert (await store.load("tally", "b")).data == b'{"items":[]}'


async def test_persist_false_changes_are_lost_at_hibernation(store, autojump_clock):
    async with PersistentSupervisor(store=store, idle_timeout=5) as sup:
        ref = await sup.start(TallyServer, key="a")
        await ref.call(("add-volatile", "lost"))
        await trio.sleep(6)
        assert sup.statistics().hibernations == 1
        assert await ref.call("get") == []


async def test_failed_commit_gives_persistence_error_and_keeps_the_old_state(autojump_clock):
    store = FaultyStore()
    async with PersistentSupervisor(store=store) as sup:
        ref = await sup.start(TallyServer, key="a")
        await ref.call(("add", "kept"))
        store.failing = True
        with pytest.raises(PersistenceError, match="tally/a") as info:
            await ref.call(("add", "lost"))
        assert isinstance(info.value.__cause__, OSError)
        store.failing = False
        assert await ref.call("get") == ["kept"]
        assert await ref.call(("add", "next")) == 2


async def test_failed_commit_does_not_affect_other_servers_in_the_batch(autojump_clock):
    class PickyStore(FaultyStore):
        async def commit(self, operations):
            if any(isinstance(op, Put) and op.record.key == "bad" for op in operations):
                raise OSError("this record cannot be written")
            await super().commit(operations)

    store = PickyStore()
    async with PersistentSupervisor(store=store) as sup:
        good = [await sup.start(TallyServer, key=f"g{i}") for i in range(5)]
        results = {}

        async def add(ref):
            try:
                results[ref.key] = await ref.call(("add", "x"))
            except PersistenceError:
                results[ref.key] = "failed"

        # make "bad" exist without going through the picky commit
        from trio_pgs import Record

        await store.inner.commit([Put(Record(kind="tally", key="bad", data=b'{"items":[]}'), 0)])
        async with trio.open_nursery() as nursery:
            for ref in [*good, sup.ref(TallyServer, "bad")]:
                nursery.start_soon(add, ref)
        assert results == {**{f"g{i}": 1 for i in range(5)}, "bad": "failed"}


async def test_unencodable_state_gives_state_encoding_error_and_nothing_advances(sup, store):
    ref = await sup.start(TallyServer, key="a")
    await ref.call(("add", "kept"))
    with pytest.raises(StateEncodingError, match=r"tally/a.*\$\.items\[1\]"):
        await ref.call(("unencodable", object()))
    assert await ref.call("get") == ["kept"]
    assert (await store.load("tally", "a")).data == b'{"items":["kept"]}'
    assert sup.statistics().crashes == 1


async def test_start_with_an_unencodable_state_stores_nothing(sup, store):
    with pytest.raises(StateEncodingError):
        await sup.start(TallyServer, object(), key="a")
    assert await store.load("tally", "a") is None


async def test_state_type_comes_from_the_generic_parameter(store):
    @attrs.frozen
    class Point:
        x: int
        y: int

    class PointServer(PersistentServer[Point]):
        async def handle_call(self, request, state):
            assert type(state) is Point
            return Reply(state.x + state.y, Point(state.y, state.x))

    assert PointServer.state_type is Point
    async with PersistentSupervisor(store=store) as sup:
        ref = await sup.start(PointServer, Point(1, 2), key="p")
        assert await ref.call("sum") == 3
    assert (await store.load("PointServer", "p")).data == b'{"x":2,"y":1}'
    async with PersistentSupervisor(store=store, servers=[PointServer]) as sup:
        assert await sup.ref(PointServer, "p").call("sum") == 3


async def test_crash_restarts_from_the_store_not_from_memory(autojump_clock, lifecycle):
    store = FaultyStore()
    async with PersistentSupervisor(store=store) as sup:
        ref = await sup.start(TallyServer, key="a")
        await ref.call(("add", "x"))
        loads = store.loads
        with pytest.raises(ServerCrashed):
            await ref.call(("mutate-then-crash", "y"))
        assert await ref.call("get") == ["x"]
        assert store.loads == loads + 1
        assert lifecycle.activations["a"] == 2


async def test_a_failed_commit_fails_its_caller_and_the_next_message_sees_the_stored_state(
    autojump_clock, lifecycle
):
    """The server does not wait for its commit before it takes its next message, but it
    never handles that message before the commit's outcome is known."""
    from trio_pgs.testing import FaultyStore as Faulty

    store = Faulty()
    async with PersistentSupervisor(store=store) as sup:
        ref = await sup.start(TallyServer, key="a")
        await ref.call(("add", "kept"))
        store.hold_commits()
        store.fail_next("commit")
        results = {}

        async def call(item: str) -> None:
            try:
                results[item] = await ref.call(("add", item))
            except PersistenceError as exc:
                results[item] = exc

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(call, "lost")
                await trio.testing.wait_all_tasks_blocked()
                nursery.start_soon(call, "next")  # queued while "lost" is being committed
                await trio.testing.wait_all_tasks_blocked()
                assert results == {}  # neither reply before the commit's outcome
                store.release_commits()
        assert isinstance(results["lost"], PersistenceError)
        assert results["next"] == 2  # handled from the stored state: ["kept", "next"]
        assert await ref.call("get") == ["kept", "next"]
    assert (await store.load("tally", "a")).data == b'{"items":["kept","next"]}'
    reasons = [reason for _, reason in lifecycle.terminations]
    assert isinstance(reasons[0], PersistenceError)  # terminate ran with the failure


async def test_a_server_waiting_for_messages_reloads_at_once_when_its_commit_fails(
    autojump_clock, lifecycle
):
    from trio_pgs.testing import FaultyStore as Faulty

    store = Faulty()
    async with PersistentSupervisor(store=store) as sup:
        ref = await sup.start(TallyServer, key="a")
        await ref.call(("add", "kept"))
        store.fail_next("commit")
        with trio.fail_after(10), pytest.raises(PersistenceError):
            await ref.call(("add", "lost"))
        await trio.testing.wait_all_tasks_blocked()
        assert sup.statistics().active == 0  # it went back to its stored record
        assert isinstance(lifecycle.terminations[-1][1], PersistenceError)
        assert await ref.call("get") == ["kept"]


async def test_hibernation_and_shutdown_wait_for_the_commit_in_flight(autojump_clock, lifecycle):
    from trio_pgs.testing import FaultyStore as Faulty

    store = Faulty()
    async with trio.open_nursery() as callers:
        async with PersistentSupervisor(store=store, idle_timeout=1) as sup:
            ref = await sup.start(TallyServer, key="a")
            store.hold_commits()
            callers.start_soon(ref.call, ("add", "x"))
            await trio.sleep(5)  # well past the idle timeout: the commit is still held
            assert lifecycle.terminations == []
            store.release_commits()
            await trio.sleep(0.5)
            assert lifecycle.terminations == []  # idle time counts from the commit
            await trio.sleep(1)
            assert lifecycle.terminations == [("a", "hibernate")]
            await ref.call(("add", "y"))
            store.hold_commits()
            callers.start_soon(ref.call, ("add", "z"))
            await trio.testing.wait_all_tasks_blocked()
            callers.start_soon(_release_later, store)
    # Shutdown waited for the held commit: "z" is stored.
    assert (await store.load("tally", "a")).data == b'{"items":["x","y","z"]}'
    assert lifecycle.terminations[-1] == ("a", "shutdown")


async def _release_later(store) -> None:
    await trio.sleep(2)
    store.release_commits()
