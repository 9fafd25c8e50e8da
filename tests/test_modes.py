"""Persistence modes and the active-server cap."""

from __future__ import annotations

import json

import pytest
import trio
import trio.testing

import trio_pgs.testing
from trio_pgs import (
    Delete,
    OutcomeUnknown,
    Persistence,
    PersistentSupervisor,
    RequestError,
    ServerCrashed,
)

from .servers import FaultyStore, TallyServer


class Behind(TallyServer):
    kind = "behind"
    persistence = Persistence.WRITE_BEHIND
    max_lag = 2.0


class OnStop(TallyServer):
    kind = "onstop"
    persistence = Persistence.ON_STOP


async def stored(store, kind: str, key: str = "k") -> bytes:
    return (await store.load(kind, key)).data


async def test_write_behind_replies_before_the_commit(autojump_clock):
    store = FaultyStore()
    async with PersistentSupervisor(store=store) as sup:
        ref = await sup.start(Behind, key="k")
        store.gate = trio.Event()  # every commit now waits
        with trio.fail_after(1):
            assert await ref.call(("add", "x")) == 1  # no commit needed for the reply
        store.gate.set()


async def test_write_behind_coalesces_and_lags_at_most_max_lag(store, autojump_clock):
    async with PersistentSupervisor(store=store) as sup:
        ref = await sup.start(Behind, key="k")
        written = sup.statistics().records_written
        for item in "abcde":
            await ref.call(("add", item))
            await trio.sleep(0.1)
        assert await stored(store, "behind") == b'{"items":[]}'  # not yet
        await trio.sleep(2)
        assert await stored(store, "behind") == b'{"items":["a","b","c","d","e"]}'
        assert sup.statistics().records_written == written + 1  # five calls, one write


async def test_write_behind_flushes_under_continuous_load(store, autojump_clock):
    async with PersistentSupervisor(store=store) as sup:
        ref = await sup.start(Behind, key="k")
        for i in range(30):
            await ref.call(("add", str(i)))
            await trio.sleep(0.25)
            items = json.loads(await stored(store, "behind"))["items"]
            assert len(items) >= (i + 1) - 9  # max_lag is 2 s: 8 calls, and the one now


@pytest.mark.parametrize("cls", [Behind, OnStop], ids=["write-behind", "on-stop"])
async def test_deferred_modes_flush_on_hibernation(store, autojump_clock, cls):
    async with PersistentSupervisor(store=store, idle_timeout=10) as sup:
        ref = await sup.start(cls, key="k")
        await ref.call(("add", "x"))
        await trio.sleep(11)
        assert sup.statistics().hibernations == 1
        assert await stored(store, cls.kind) == b'{"items":["x"]}'


@pytest.mark.parametrize("cls", [Behind, OnStop], ids=["write-behind", "on-stop"])
async def test_deferred_modes_flush_on_shutdown(store, cls):
    async with PersistentSupervisor(store=store) as sup:
        ref = await sup.start(cls, key="k")
        await ref.call(("add", "x"))
    assert await stored(store, cls.kind) == b'{"items":["x"]}'


@pytest.mark.parametrize("cls", [Behind, OnStop], ids=["write-behind", "on-stop"])
async def test_deferred_modes_flush_on_a_stop_that_keeps_the_record(store, cls):
    async with PersistentSupervisor(store=store) as sup:
        ref = await sup.start(cls, key="k")
        await ref.call(("add", "x"))
        await ref.call(("stop", "pause"))
        assert await stored(store, cls.kind) == b'{"items":["x"]}'


@pytest.mark.parametrize("cls", [Behind, OnStop], ids=["write-behind", "on-stop"])
async def test_a_crash_commits_the_state_before_it_not_the_crashing_one(store, cls):
    async with PersistentSupervisor(store=store) as sup:
        ref = await sup.start(cls, key="k")
        await ref.call(("add", "x"))
        with pytest.raises(ServerCrashed):
            await ref.call(("mutate-then-crash", "y"))
        assert await stored(store, cls.kind) == b'{"items":["x"]}'
        assert await ref.call("get") == ["x"]


async def test_on_stop_writes_nothing_while_active(store, autojump_clock):
    async with PersistentSupervisor(store=store, idle_timeout=None) as sup:
        ref = await sup.start(OnStop, key="k")
        for item in "abc":
            await ref.call(("add", item))
            await trio.sleep(100)
        assert await stored(store, "onstop") == b'{"items":[]}'


async def test_a_failed_deferred_write_keeps_the_server_awake_and_retries(autojump_clock):
    store = FaultyStore()
    async with PersistentSupervisor(store=store, idle_timeout=5) as sup:
        ref = await sup.start(Behind, key="k")
        store.failing = True
        await ref.call(("add", "x"))
        await trio.sleep(20)
        assert sup.statistics().active == 1  # it did not hibernate with a pending state
        store.failing = False
        await trio.sleep(10)
        assert sup.statistics().active == 0
        assert await stored(store.inner, "behind") == b'{"items":["x"]}'


@pytest.mark.parametrize("cls", [Behind, OnStop], ids=["write-behind", "on-stop"])
@pytest.mark.parametrize("ending", ["stop", "crash", "refuse-after-mutating"])
async def test_an_acknowledged_state_survives_a_failed_write_as_its_activation_ends(
    autojump_clock, cls, ending
):
    """A stop that keeps the record, a crash, or a refusal after an in-place change
    ends the activation, and the acknowledged state is written first; the store fails
    that write. It is retried (every max_lag seconds, the server waiting) until it
    is written: the next activation sees it (it loaded the record before: the
    acknowledged state was dropped although the store was healthy again)."""
    store = FaultyStore()
    async with PersistentSupervisor(store=store, idle_timeout=None) as sup:
        ref = await sup.start(cls, key="k")
        for item in "abc":
            await ref.call(("add", item))
        store.failing = True

        async def heal() -> None:
            await trio.sleep(5)
            store.failing = False

        async with trio.open_nursery() as nursery:
            nursery.start_soon(heal)
            if ending == "stop":
                await ref.call(("stop", "pause"))
            elif ending == "crash":
                with pytest.raises(ServerCrashed):
                    await ref.call("crash")
            else:
                with pytest.raises(RequestError):
                    await ref.call(("mutate-then-refuse", "z"))
        # (A refusal is answered at once; the next message waits for the write.)
        assert await ref.call("get") == ["a", "b", "c"]
        assert await stored(store.inner, cls.kind) == b'{"items":["a","b","c"]}'


async def test_a_write_retried_before_a_crash_is_retried_at_once_when_the_shutdown_begins(
    autojump_clock,
):
    """A crash's write of the acknowledged state fails and waits max_lag (10 s) to be
    retried; the shutdown (shutdown_timeout 5) begins meanwhile, the store healthy
    again: the write is retried then, and stored (it slept on, was cut off at the
    deadline, and the state was lost)."""

    class Lagging(Behind):
        kind = "lagging"
        max_lag = 10.0

    store = FaultyStore()
    async with PersistentSupervisor(store=store, shutdown_timeout=5) as sup:
        ref = await sup.start(Lagging, key="k")
        await ref.call(("add", "x"))  # acknowledged, pending
        store.failing = True
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio_pgs.testing.crash, ref)
            await trio.sleep(0.5)  # the write failed; the retry waits 10 s
            store.failing = False
            nursery.cancel_scope.cancel()
    assert sup.statistics().unflushed == ()
    assert await stored(store.inner, "lagging") == b'{"items":["x"]}'


async def test_a_deferred_write_never_sent_at_shutdown_is_listed_unflushed(
    autojump_clock, caplog
):
    """At the shutdown's deadline, server a's write is with a store that does not
    answer, and server b's waits behind it, never sent: b is listed in
    `statistics().unflushed` and logged as not committed (it was logged as "the
    outcome is unknown" and left out of `unflushed`, although nothing of it was
    sent); a's outcome is the one unknown."""

    class Quick(Behind):
        kind = "quick"
        max_lag = 0.5

    store = FaultyStore()
    async with PersistentSupervisor(store=store, shutdown_timeout=2) as sup:
        a, b = [await sup.start(cls, key="k") for cls in (Quick, Behind)]
        await a.call(("add", "x"))
        await b.call(("add", "y"))
        store.gate = trio.Event()  # a's write, due first, hangs; b's waits behind it
        await trio.sleep(0.6)
    assert sup.statistics().unflushed == ("behind/k",)
    assert "were still waiting for the store" in caplog.text and "quick/k" in caplog.text
    assert await stored(store.inner, "behind") == b'{"items":[]}'


class FailingDeletes(FaultyStore):
    """Every delete fails (a stop's wipe); puts go through."""

    async def commit(self, operations):
        if any(isinstance(operation, Delete) for operation in operations):
            raise OSError("injected failure of a delete")
        await super().commit(operations)


@pytest.mark.parametrize("cls", [TallyServer, Behind, OnStop],
                         ids=["each-message", "write-behind", "on-stop"])
async def test_a_normal_stop_whose_delete_fails_keeps_every_acknowledged_change(
    autojump_clock, cls
):
    """A normal stop (which wipes the record) changes the state, and the delete fails:
    the server is not stopped and goes on from its record, which holds every
    acknowledged change (a deferred mode's were dropped with the activation), the
    stop's own included; the stop's caller hears that its change was committed
    (`OutcomeUnknown`: read, do not just retry), not "not committed, retry"."""
    store = FailingDeletes()
    async with PersistentSupervisor(store=store, idle_timeout=None) as sup:
        ref = await sup.start(cls, key="k")
        for item in "ab":
            await ref.call(("add", item))
        with pytest.raises(OutcomeUnknown, match="the server was not stopped"):
            await ref.call(("add-and-stop", "c", "normal"))
        assert await ref.call("get") == ["a", "b", "c"]
        await trio_pgs.testing.hibernate(ref)
        assert await stored(store.inner, cls.kind) == b'{"items":["a","b","c"]}'


async def test_the_mode_is_overridable_per_supervisor(store):
    async with PersistentSupervisor(store=store, persistence=Persistence.ON_STOP) as sup:
        ref = await sup.start(TallyServer, key="k")
        await ref.call(("add", "x"))
        assert await stored(store, "tally") == b'{"items":[]}'


# -- max_active ----------------------------------------------------------------------------


async def test_max_active_hibernates_the_least_recently_used_idle_servers(
    store, autojump_clock, lifecycle
):
    async with PersistentSupervisor(store=store, max_active=3, idle_timeout=1000) as sup:
        refs = [await sup.start(TallyServer, key=str(i)) for i in range(3)]
        await refs[0].call(("add", "x"))  # 0 is now the most recent; 1 is the oldest
        await trio.testing.wait_all_tasks_blocked()
        await sup.start(TallyServer, key="3")
        await trio.testing.wait_all_tasks_blocked()
        assert sup.statistics().active == 3
        assert ("1", "hibernate") in lifecycle.terminations
        assert await refs[1].call("get") == []  # wakes again from the store


async def test_max_active_never_hibernates_a_busy_server(store, autojump_clock, lifecycle):
    async with PersistentSupervisor(store=store, max_active=1, idle_timeout=1000) as sup:
        busy = await sup.start(TallyServer, key="busy")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(busy.call, ("sleep", 5))
            await trio.testing.wait_all_tasks_blocked()
            await sup.start(TallyServer, key="other")
            await trio.testing.wait_all_tasks_blocked()
            # Over the cap: the idle newcomer goes, never the busy server.
            assert ("busy", "hibernate") not in lifecycle.terminations
            assert ("other", "hibernate") in lifecycle.terminations
        assert await busy.call("get") == []
        await trio_pgs.testing.wait_all_idle(sup)
        assert sup.statistics().active == 1


async def test_max_active_keeps_many_servers_within_the_cap(store, autojump_clock):
    async with PersistentSupervisor(store=store, max_active=10, idle_timeout=1000) as sup:
        for i in range(200):
            ref = await sup.start(TallyServer, key=str(i))
            await ref.call(("add", "x"))
            await trio.testing.wait_all_tasks_blocked()
            assert sup.statistics().active <= 10


async def test_a_timer_firing_while_hibernation_flushes_never_reaches_the_next_activation(
    autojump_clock, lifecycle
):
    from trio_pgs.testing import FaultyStore as SlowStore

    store = SlowStore()
    async with PersistentSupervisor(store=store, idle_timeout=5) as sup:
        ref = await sup.start(OnStop, key="k")
        await ref.call(("add", "x"))
        await ref.call(("timer", 5.5, "stale"))  # fires while the flush at 5 takes 1 s
        store.commit_delay = 1.0
        await trio.sleep(10)
        store.commit_delay = 0.0
        assert await ref.call("get") == ["x"]
    assert ("k", "hibernate") in lifecycle.terminations


async def test_a_deferred_write_that_conflicts_is_dropped_and_the_server_reloads(
    autojump_clock, lifecycle, caplog
):
    from trio_pgs import ConflictError, Put, Record

    store = FaultyStore()
    async with PersistentSupervisor(store=store) as sup:
        ref = await sup.start(Behind, key="k")
        await ref.call(("add", "mine"))  # pending for max_lag = 2 s
        current = await store.load("behind", "k")
        # Another writer (the CLI, another process) changes the record meanwhile.
        await store.commit([Put(Record(kind="behind", key="k", data=b'{"items":["theirs"]}',
                                       version=current.version + 1), current.version)])
        await trio.sleep(3)
        assert sup.statistics().active == 0  # not retrying forever
        assert await ref.call("get") == ["theirs"]
    reasons = [reason for _, reason in lifecycle.terminations]
    assert isinstance(reasons[0], ConflictError)
    assert "conflicts with the stored record" in caplog.text
