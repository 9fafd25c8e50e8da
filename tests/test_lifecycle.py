"""Crashes, restart strategies, stops, quarantine, escalation, recovery (section 6)."""

from __future__ import annotations

import json

import pytest
import trio
import trio.testing

from trio_pgs import (
    ActivationFailed,
    DiskCacheStore,
    MemoryStore,
    Persistence,
    PersistentSupervisor,
    Put,
    Record,
    Restart,
    ServerCrashed,
    ServerNotFound,
    ServerQuarantined,
    StateEncodingError,
    SupervisorEscalated,
)
from trio_pgs.testing import FaultyStore, hibernate
from trio_pgs.testing import crash as simulate_crash

from .servers import TallyServer


class Temporary(TallyServer):
    kind = "temporary"
    restart = Restart.TEMPORARY


class Transient(TallyServer):
    kind = "transient"
    restart = Restart.TRANSIENT


class Permanent(TallyServer):
    kind = "permanent"
    restart = Restart.PERMANENT


ALL = [Temporary, Transient, Permanent]


async def crash(ref) -> None:
    with pytest.raises(ServerCrashed):
        await ref.call("crash")


# -- the restart table, cell by cell -----------------------------------------------------


async def test_temporary_crash_wipes_the_record(sup, store):
    ref = await sup.start(Temporary, "x", key="k")
    await crash(ref)
    assert await store.load("temporary", "k") is None
    with pytest.raises(ServerNotFound):
        await ref.call("get")


async def test_transient_crash_keeps_the_record_and_reactivates_on_the_next_message(
    sup, store, lifecycle
):
    ref = await sup.start(Transient, "x", key="k")
    await crash(ref)
    assert sup.statistics().active == 0  # dormant until a message comes
    assert await ref.call("get") == ["x"]
    assert lifecycle.activations["k"] == 2


async def test_permanent_crash_restarts_at_once(sup, lifecycle):
    ref = await sup.start(Permanent, "x", key="k")
    await crash(ref)
    await trio.testing.wait_all_tasks_blocked()
    assert sup.statistics().active == 1
    assert lifecycle.activations["k"] == 2
    assert await ref.call("get") == ["x"]


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.kind)
async def test_normal_stop_wipes_the_record_whatever_the_strategy(sup, store, cls):
    ref = await sup.start(cls, "x", key="k")
    assert await ref.call(("stop", "normal")) == "stopping"
    assert await store.load(cls.kind, "k") is None
    await trio.testing.wait_all_tasks_blocked()
    assert sup.statistics().active == 0


async def test_temporary_stop_with_another_reason_wipes_the_record(sup, store):
    ref = await sup.start(Temporary, "x", key="k")
    await ref.call(("stop", "maintenance"))
    assert await store.load("temporary", "k") is None


async def test_transient_stop_with_another_reason_keeps_it_dormant(sup, store):
    ref = await sup.start(Transient, "x", key="k")
    await ref.call(("add", "y"))
    await ref.call(("stop", "maintenance"))
    await trio.testing.wait_all_tasks_blocked()
    assert sup.statistics().active == 0
    assert (await store.load("transient", "k")).data == b'{"items":["x","y"]}'
    assert await ref.call("get") == ["x", "y"]


async def test_permanent_stop_with_another_reason_restarts_at_once(sup, lifecycle):
    ref = await sup.start(Permanent, "x", key="k")
    await ref.call(("stop", "maintenance"))
    await trio.testing.wait_all_tasks_blocked()
    assert sup.statistics().active == 1
    assert lifecycle.activations["k"] == 2
    assert lifecycle.terminations == [("k", "maintenance")]


# -- terminate and on_activate ------------------------------------------------------------


async def test_terminate_gets_each_reason(store, autojump_clock, lifecycle):
    async with PersistentSupervisor(store=store, idle_timeout=5, max_crashes=100) as sup:
        ref = await sup.start(TallyServer, key="k")
        await trio.sleep(6)  # hibernate
        await crash(ref)  # the exception
        await ref.call(("stop", "normal"))
        await sup.start(TallyServer, key="k")
    reasons = [reason for _, reason in lifecycle.terminations]
    assert reasons[0] == "hibernate"
    assert isinstance(reasons[1], RuntimeError)
    assert reasons[2:] == ["normal", "shutdown"]
    assert lifecycle.activations["k"] == 4  # start, wake, wake after crash, start again


# -- the crashing message is never committed -----------------------------------------------


@pytest.mark.parametrize("cls", [Transient, Permanent], ids=lambda c: c.kind)
async def test_in_place_mutation_before_a_crash_does_not_leak(sup, cls):
    ref = await sup.start(cls, "x", key="k")
    with pytest.raises(ServerCrashed):
        await ref.call(("mutate-then-crash", "leak"))
    assert await ref.call("get") == ["x"]


async def test_messages_queued_behind_a_crash_are_handled_by_the_next_activation(
    sup, autojump_clock
):
    ref = await sup.start(Transient, key="k")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ref.call, ("sleep", 1))
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(crash, ref)
        await trio.testing.wait_all_tasks_blocked()
        await ref.cast(("add", "after"))
    assert await ref.call("get") == ["after"]


# -- quarantine -------------------------------------------------------------------------------


async def test_too_many_crashes_quarantine_the_server(store, autojump_clock):
    async with PersistentSupervisor(store=store, max_crashes=3, crash_window=5) as sup:
        ref = await sup.start(Transient, "x", key="k")
        for _ in range(3):
            await crash(ref)
        with pytest.raises(ServerQuarantined, match=r"transient/k.*release"):
            await ref.call("get")
        assert sup.statistics().quarantined == 1
        assert (await store.load("transient", "k")).quarantined


async def test_crashes_spread_beyond_the_window_do_not_quarantine(store, monkeypatch):
    import time as time_module

    now = [1000.0]
    monkeypatch.setattr(time_module, "time", lambda: now[0])
    async with PersistentSupervisor(store=store, max_crashes=3, crash_window=5) as sup:
        ref = await sup.start(Transient, "x", key="k")
        for _ in range(5):
            await crash(ref)
            now[0] += 3  # only two crashes fall within any 5 s
        assert await ref.call("get") == ["x"]


async def test_quarantine_survives_a_process_restart(tmp_path):
    store = DiskCacheStore(tmp_path / "s")
    async with PersistentSupervisor(store=store, max_crashes=2) as sup:
        ref = await sup.start(Transient, "x", key="k")
        await crash(ref)
    async with PersistentSupervisor(store=store, max_crashes=2, servers=[Transient]) as sup:
        await crash(ref)  # the second crash, counted across the restart
        with pytest.raises(ServerQuarantined):
            await ref.call("get")
    async with PersistentSupervisor(store=store, max_crashes=2, servers=[Transient]) as sup:
        with pytest.raises(ServerQuarantined):
            await ref.call("get")


async def test_release_lifts_the_quarantine(store):
    async with PersistentSupervisor(store=store, max_crashes=1) as sup:
        ref = await sup.start(Transient, "x", key="k")
        await crash(ref)
        with pytest.raises(ServerQuarantined):
            await ref.call("get")
        await sup.release(ref)
        assert await ref.call("get") == ["x"]
        await crash(ref)  # the crash count started again: one crash quarantines again
        with pytest.raises(ServerQuarantined):
            await ref.call("get")


async def test_rollback_restores_an_earlier_state(store):
    class Historic(Transient):
        kind = "historic"
        keep_history = 2

    async with PersistentSupervisor(store=store, max_crashes=1) as sup:
        ref = await sup.start(Historic, key="k")
        for item in "abc":
            await ref.call(("add", item))
        await crash(ref)
        with pytest.raises(ValueError, match="keeps 2 earlier"):
            await sup.rollback(ref, steps=3)
        await sup.rollback(ref, steps=2)
        assert await ref.call("get") == ["a"]


@pytest.mark.parametrize("persistence", [Persistence.EACH_MESSAGE, Persistence.WRITE_BEHIND])
@pytest.mark.parametrize("rollback_first", [False, True])
async def test_a_rollback_racing_an_activation_is_refused_or_seen_by_it(
    autojump_clock, persistence, rollback_first
):
    """A call wakes a dormant server while a rollback of it runs, on a slow store:
    the rollback is refused (the server is active), or the activation runs from the
    rolled-back record. Either way every acknowledged update is stored, and nothing
    is fenced off. (The rollback's claim fenced off an activation that had claimed
    the record just before: it answered from the old state, its writes then failed
    with ConflictError, and a WRITE_BEHIND update was acknowledged and lost.) Claims
    that wake at the same instant go in an order of trio's own: 20 rounds each."""

    class Historic(Transient):
        kind = "historic"
        keep_history = 2

    outcomes = set()
    for _ in range(20):
        store = FaultyStore(MemoryStore())
        async with PersistentSupervisor(store=store, persistence=persistence) as sup:
            ref = await sup.start(Historic, key="k")
            for item in "abc":
                await ref.call(("add", item))
            await hibernate(ref)
            earlier = json.loads((await store.load(Historic.kind, "k")).history[0])["items"]
            store.load_delay = store.commit_delay = 0.1
            rolled_back = []

            async def roll_back():
                try:
                    await sup.rollback(ref)  # noqa: B023 - awaited in this round
                except ValueError as exc:
                    assert "active" in str(exc)
                else:
                    rolled_back.append(True)  # noqa: B023

            async with trio.open_nursery() as nursery:
                if rollback_first:
                    nursery.start_soon(roll_back)
                nursery.start_soon(ref.call, "get")
                if not rollback_first:
                    nursery.start_soon(roll_back)
            store.load_delay = store.commit_delay = 0.0
            expected = earlier if rolled_back else ["a", "b", "c"]
            assert await ref.call("get") == expected
            assert await ref.call(("add", "d")) == len(expected) + 1
            await hibernate(ref)
            assert await ref.call("get") == [*expected, "d"]
            assert sup.statistics().fenced_writes == 0
            outcomes.add(bool(rolled_back))
    assert outcomes == {True, False}  # both ways were taken


async def test_commits_of_reminders_alone_add_nothing_to_the_history(store, autojump_clock):
    """A commit that keeps the state (an activation re-arming a reminder) adds no copy
    of it to the states kept for rollback: rollback(steps=1) goes back one change."""

    class Rearming(Transient):
        kind = "rearming"
        keep_history = 2
        idle_timeout = 1.0

        async def on_activate(self, state):
            self.remind("tick", after=3600)
            return await super().on_activate(state)

    async with PersistentSupervisor(store=store) as sup:
        ref = await sup.start(Rearming, key="k")
        for item in "ab":
            await ref.call(("add", item))
        for _ in range(3):
            await trio.sleep(5)  # hibernates; the next call activates it again
            assert await ref.call("get") == ["a", "b"]
        await trio.sleep(5)
        await sup.rollback(ref)
        assert await ref.call("get") == ["a"]


async def test_a_rollback_during_a_reactivation_is_refused_at_once(autojump_clock):
    """A PERMANENT server re-activates after a crash, its on_activate slow; a rollback
    meanwhile is refused (the server is active) at once. It spun on the re-activation's
    event, already set: at 100 % CPU, and for ever under an autojump clock."""

    class Slow(Permanent):
        kind = "slow"
        keep_history = 2
        slow = False

        async def on_activate(self, state):
            if Slow.slow:
                await trio.sleep(2)
            return await super().on_activate(state)

    async with PersistentSupervisor(store=MemoryStore()) as sup:
        ref = await sup.start(Slow, key="k")
        await ref.call(("add", "x"))
        Slow.slow = True
        await simulate_crash(ref)  # re-activates at once, on_activate under way
        start = trio.current_time()
        with trio.fail_after(1), pytest.raises(ValueError, match="active"):
            await sup.rollback(ref)
        assert trio.current_time() - start < 1
        Slow.slow = False


async def test_rollback_and_release_refuse_an_active_server(sup):
    ref = await sup.start(Transient, key="k")
    with pytest.raises(ValueError, match="active"):
        await sup.release(ref)


async def test_a_poison_message_cannot_spin_a_permanent_server(store, autojump_clock):
    async with PersistentSupervisor(store=store, max_crashes=3) as sup:
        ref = await sup.start(Permanent, key="k")
        outcomes = []
        for _ in range(10):
            try:
                await ref.call("crash")
            except (ServerCrashed, ServerQuarantined) as exc:
                outcomes.append(type(exc).__name__)
        assert outcomes == ["ServerCrashed"] * 3 + ["ServerQuarantined"] * 7
        assert sup.statistics().crashes == 3
        await trio.testing.wait_all_tasks_blocked()
        assert sup.statistics().active == 0


# -- escalation --------------------------------------------------------------------------------


async def test_too_many_crashes_escalate_out_of_the_supervisor(store, autojump_clock, lifecycle):
    with pytest.raises(SupervisorEscalated, match=r"3 crashes within 10\.0s"):
        async with PersistentSupervisor(
            store=store, max_restarts=2, max_seconds=10, max_crashes=100
        ) as sup:
            good = await sup.start(TallyServer, key="good")
            await good.call(("add", "kept"))
            bad = await sup.start(Transient, key="bad")
            for _ in range(3):
                await crash(bad)
            await trio.sleep_forever()  # the supervisor cancels the block
    assert ("good", "shutdown") in lifecycle.terminations
    assert (await store.load("tally", "good")).data == b'{"items":["kept"]}'


async def test_crashes_slower_than_max_seconds_do_not_escalate(store, autojump_clock):
    async with PersistentSupervisor(
        store=store, max_restarts=2, max_seconds=10, max_crashes=100
    ) as sup:
        bad = await sup.start(Transient, key="bad")
        for _ in range(6):
            await crash(bad)
            await trio.sleep(6)


# -- recovery ----------------------------------------------------------------------------------


async def test_permanent_servers_are_activated_at_startup(store, autojump_clock, lifecycle):
    async with PersistentSupervisor(store=store, idle_timeout=1) as sup:
        for key in "abc":
            await sup.start(Permanent, key=key)
        await sup.start(Transient, key="t")
        await trio.sleep(2)  # all hibernate
        assert sup.statistics().active == 0
    async with PersistentSupervisor(store=store, servers=[Permanent, Transient]) as sup:
        await trio.testing.wait_all_tasks_blocked()
        assert sup.statistics().active == 3
        assert sup.statistics().activations == 3


async def test_quarantined_permanent_servers_stay_dormant_at_startup(store):
    async with PersistentSupervisor(store=store, max_crashes=1) as sup:
        await crash(await sup.start(Permanent, key="q"))
    async with PersistentSupervisor(store=store, servers=[Permanent]) as sup:
        await trio.testing.wait_all_tasks_blocked()
        assert sup.statistics().active == 0


@pytest.mark.parametrize("on_disk", [False, True], ids=["memory", "diskcache"])
async def test_records_of_unlisted_kinds_are_left_untouched_and_logged_once(
    store, tmp_path, caplog, on_disk
):
    if on_disk:
        store = DiskCacheStore(tmp_path / "s")
    async with PersistentSupervisor(store=store) as sup:
        await sup.start(Permanent, "x", key="k")
        await sup.start(Permanent, "y", key="j")
    before = [await store.load("permanent", key) for key in "jk"] if not on_disk else None
    caplog.clear()
    async with PersistentSupervisor(store=store, servers=[Transient]) as sup:
        with trio.fail_after(10):  # the startup scan runs on the store's thread
            while not any("no class" in r.message for r in caplog.records):
                await trio.sleep(0.01)
        assert sup.statistics().active == 0
    logged = [r.message for r in caplog.records if "no class" in r.message]
    assert len(logged) == 1 and "permanent" in logged[0]
    if before is not None:
        assert [await store.load("permanent", key) for key in "jk"] == before


# -- records that cannot be activated ------------------------------------------------------------


async def test_an_undecodable_record_fails_activation_without_harming_others(sup, store):
    await store.commit([Put(Record(kind="tally", key="bad", data=b'{"items": 42}'), 0)])
    good = await sup.start(TallyServer, "x", key="good")
    with pytest.raises(ActivationFailed, match="tally/bad") as info:
        await sup.ref(TallyServer, "bad").call("get")
    assert info.value.__cause__ is not None
    assert sup.statistics().crashes == 1
    assert await good.call("get") == ["x"]
    assert (await store.load("tally", "bad")).data == b'{"items": 42}'  # never overwritten


async def test_a_crash_while_100_others_work_loses_none_of_their_calls(store, autojump_clock):
    async with PersistentSupervisor(store=store, max_crashes=1000) as sup:
        refs = [await sup.start(TallyServer, key=str(i)) for i in range(100)]
        victim = await sup.start(Transient, key="victim")

        async def work(ref) -> None:
            for n in range(10):
                await ref.call(("add", str(n)))

        async def crash_often() -> None:
            for _ in range(20):
                await crash(victim)

        async with trio.open_nursery() as nursery:
            for ref in refs:
                nursery.start_soon(work, ref)
            nursery.start_soon(crash_often)
    async with PersistentSupervisor(store=store, servers=[TallyServer]) as sup:
        for ref in refs:
            assert await ref.call("get") == [str(n) for n in range(10)]


async def test_state_carries_across_a_restart_between_every_step(tmp_path):
    store = DiskCacheStore(tmp_path / "s")
    steps = [("add", "a"), ("add", "b"), "crash", ("add", "c"), ("stop", "pause"), ("add", "d")]
    async with PersistentSupervisor(store=store) as sup:
        ref = await sup.start(Transient, key="k")
    for step in steps:
        async with PersistentSupervisor(store=store, servers=[Transient]):
            try:
                await ref.call(step)
            except ServerCrashed:
                pass
    async with PersistentSupervisor(store=store, servers=[Transient]):
        assert await ref.call("get") == ["a", "b", "c", "d"]


async def test_an_unencodable_state_keeps_even_a_temporary_servers_record(sup, store):
    ref = await sup.start(Temporary, key="t")
    await ref.call(("add", "kept"))
    with pytest.raises(StateEncodingError):
        await ref.call(("unencodable", object()))
    assert await ref.call("get") == ["kept"]
    assert sup.statistics().crashes == 1


class FailsToActivate(TallyServer):
    kind = "fails"

    async def on_activate(self, state):
        raise RuntimeError("cannot activate")


async def test_start_whose_on_activate_raises_stores_nothing(sup, store):
    for _ in range(2):  # not AlreadyStarted the second time: nothing was kept
        with pytest.raises(ActivationFailed, match="Nothing was stored") as info:
            await sup.start(FailsToActivate, key="k")
        assert isinstance(info.value.__cause__, RuntimeError)
        assert await store.load("fails", "k") is None
    assert await sup.start(TallyServer, key="k")  # the supervisor goes on


async def test_testing_crash_of_a_server_that_cannot_crash_raises(sup):
    """`trio_pgs.testing.crash` of a server with no record raises `ServerNotFound`,
    of a quarantined one `ServerQuarantined`, as a call would (it returned as if the
    crash had happened)."""
    with pytest.raises(ServerNotFound):
        await simulate_crash(sup.ref(TallyServer, "never-started"))
    ref = await sup.start(TallyServer, key="k")
    for _ in range(3):
        await simulate_crash(ref)
    with pytest.raises(ServerQuarantined):
        await simulate_crash(ref)
