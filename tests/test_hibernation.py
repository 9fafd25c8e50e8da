"""Hibernation and activation."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import pytest
import trio
import trio.testing

from trio_pgs import NoReply, PersistentSupervisor, Reply, current_caller, testing

from .servers import FaultyStore, Tally, TallyServer


async def test_idle_server_hibernates_after_idle_timeout(store, autojump_clock, lifecycle):
    async with PersistentSupervisor(store=store, idle_timeout=5) as sup:
        ref = await sup.start(TallyServer, key="a")
        await ref.call(("add", "x"))
        await trio.sleep(4.9)
        assert sup.statistics().active == 1
        await trio.sleep(0.2)
        assert sup.statistics().active == 0
        assert sup.statistics().hibernations == 1
        assert lifecycle.terminations == [("a", "hibernate")]


async def test_call_after_hibernation_reactivates_from_store(store, autojump_clock, lifecycle):
    async with PersistentSupervisor(store=store, idle_timeout=5) as sup:
        ref = await sup.start(TallyServer, key="a")
        await ref.call(("add", "x"))
        await trio.sleep(10)
        assert await ref.call(("add", "y")) == 2
        assert lifecycle.activations["a"] == 2
        assert sup.statistics().activations == 2


async def test_each_message_resets_the_idle_deadline(store, autojump_clock):
    async with PersistentSupervisor(store=store, idle_timeout=5) as sup:
        ref = await sup.start(TallyServer, key="a")
        for _ in range(5):
            await trio.sleep(4)
            await ref.call("get")
        assert sup.statistics().hibernations == 0


async def test_idle_timeout_none_never_hibernates(store, autojump_clock):
    async with PersistentSupervisor(store=store, idle_timeout=None) as sup:
        await sup.start(TallyServer, key="a")
        await trio.sleep(3_600)  # 12 x the default idle_timeout
        assert sup.statistics().active == 1


async def test_idle_timeout_is_a_class_attribute(store, autojump_clock):
    class Quick(TallyServer):
        kind = "quick"
        idle_timeout = 1.0

    async with PersistentSupervisor(store=store) as sup:
        await sup.start(Quick, key="q")
        await sup.start(TallyServer, key="t")
        await trio.sleep(2)
        assert sup.statistics().active == 1  # the tally (10 s) is still up


async def test_timers_do_not_keep_a_server_awake_and_are_dropped(store, autojump_clock):
    async with PersistentSupervisor(store=store, idle_timeout=5) as sup:
        ref = await sup.start(TallyServer, key="a")
        await ref.call(("timer", 3, "tick"))  # fires at 3, idle deadline stays at 5
        await ref.call(("timer", 8, "never"))
        await trio.sleep(6)
        assert sup.statistics().active == 0
        await trio.sleep(10)
        assert await ref.call("get") == ["tick"]


async def test_many_callers_waking_one_server_share_one_activation(
    store, autojump_clock, lifecycle
):
    async with PersistentSupervisor(store=store, idle_timeout=5) as sup:
        ref = await sup.start(TallyServer, key="a")
        await trio.sleep(6)
        assert sup.statistics().active == 0
        got = []

        async def add(i: int) -> None:
            got.append(await ref.call(("add", str(i))))

        async with trio.open_nursery() as nursery:
            for i in range(100):
                nursery.start_soon(add, i)
        assert sorted(got) == list(range(1, 101))
        assert lifecycle.activations["a"] == 2
        assert lifecycle.max_active["a"] == 1


async def test_message_arriving_during_hibernation_is_handled_by_the_next_activation(
    autojump_clock, lifecycle
):
    store = FaultyStore()

    class SlowTerminate(TallyServer):
        kind = "slow"

        async def terminate(self, reason, state):
            await super().terminate(reason, state)
            await trio.sleep(1)  # messages arrive while it hibernates

    async with PersistentSupervisor(store=store, idle_timeout=5) as sup:
        ref = await sup.start(SlowTerminate, key="a")
        await trio.sleep(5.5)  # hibernating: terminate is running
        assert await ref.call(("add", "during")) == 1
        assert lifecycle.terminations[0] == ("a", "hibernate")
        assert lifecycle.activations["a"] == 2
        assert lifecycle.max_active["a"] == 1


async def test_a_server_owing_replies_does_not_hibernate(store, autojump_clock):
    async with PersistentSupervisor(store=store, idle_timeout=5) as sup:
        ref = await sup.start(TallyServer, key="a")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ref.call, "wait")
            await trio.sleep(60)
            assert sup.statistics().active == 1
            await ref.call(("release", "done"))
        await trio.sleep(6)
        assert sup.statistics().active == 0


async def test_dormant_servers_cost_nothing_in_memory(store, autojump_clock):
    async with PersistentSupervisor(store=store, idle_timeout=1) as sup:
        for i in range(200):
            await sup.start(TallyServer, key=str(i))
        await trio.sleep(2)
        stats = sup.statistics()
        assert stats.active == 0 and stats.hibernations == 200
        assert sup._entries == {}
        # nothing per dormant server is left: no task, no timer, no idle deadline
        # the writer, the idle reaper, the reminders' wakeups (on a store with a due
        # index) and, on a store that keeps members, the lease: one each, in all
        tasks = {task.name.rsplit(".", 1)[-1] for task in sup._nursery.child_tasks}
        assert tasks <= {"_run_writer", "run"}
        expected = 2 + (sup._node is not None) + (sup._wakeups is not None)
        assert len(sup._nursery.child_tasks) == expected
        assert all(not group for group in sup._reaper._groups.values())
        assert sup._reaper._irregular == []


async def test_one_senders_messages_keep_their_order_across_hibernation(
    store, autojump_clock
):
    class SlowTerminate(TallyServer):
        kind = "slow"

        async def terminate(self, reason, state):
            await trio.sleep(0.5)

    async with PersistentSupervisor(store=store, idle_timeout=1) as sup:
        ref = await sup.start(SlowTerminate, key="a")
        sent = []
        for i in range(30):
            await ref.cast(("add", str(i)))  # some land while it hibernates
            sent.append(str(i))
            await trio.sleep([0.1, 1.2, 1.6][i % 3])  # during and after hibernation
        assert await ref.call("get") == sent
        assert sup.statistics().hibernations >= 1


# -- the idle reaper -------------------------------------------------------------------


class Quick2(TallyServer):
    kind = "quick2"
    idle_timeout = 2.0


class Napper(TallyServer):
    kind = "napper"
    idle_timeout = 5.0
    waiting_callers: list = []

    async def handle_call(self, request, state):
        if request == "later":
            Napper.waiting_callers.append(current_caller())
            return NoReply(state)
        if request == "nap at 3":
            self.send_after(3, "nap")
            return Reply("armed", state)
        return await super().handle_call(request, state)

    async def handle_info(self, message, state):
        if message == "nap":
            await trio.sleep(4)
            return NoReply(state)
        return await super().handle_info(message, state)


async def test_each_idle_timeout_is_kept_on_time(store, autojump_clock):
    async with PersistentSupervisor(store=store) as sup:
        slow = await sup.start(TallyServer, key="slow")  # idle_timeout 10 (servers.py)
        quick = await sup.start(Quick2, key="quick")
        await trio.sleep(2.1)
        assert [e.ref for e in sup._entries.values()] == [slow]
        await quick.call("get")  # wakes it: its deadline starts again
        await trio.sleep(1.9)
        assert len(sup._entries) == 2
        await trio.sleep(0.2)
        assert [e.ref for e in sup._entries.values()] == [slow]


async def test_a_server_busy_at_its_deadline_hibernates_once_idle(store, autojump_clock):
    async with PersistentSupervisor(store=store) as sup:
        ref = await sup.start(Napper, key="n")
        await ref.call("nap at 3")  # busy from 3 to 7; the deadline is at 5
        await trio.sleep(6.9)
        assert sup.statistics().active == 1
        await trio.sleep(0.2)  # a timer info does not move the deadline: due already
        assert sup.statistics().active == 0


async def test_a_server_hibernates_once_another_task_gives_its_last_owed_reply(
    store, autojump_clock
):
    Napper.waiting_callers.clear()
    async with PersistentSupervisor(store=store) as sup:
        ref = await sup.start(Napper, key="n")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ref.call, "later")
            await trio.sleep(10)  # past its deadline: it owes a reply, so it stays
            assert sup.statistics().active == 1
            await Napper.waiting_callers.pop().reply("done")  # from this task
        await trio.sleep(0)
        await trio.testing.wait_all_tasks_blocked()
        assert sup.statistics().active == 0
        assert sup.statistics().hibernations == 1


class Sleeper(TallyServer):
    kind = "sleeper"
    idle_timeout = 100.0

    async def handle_call(self, request, state):
        if request == "sleep 4":
            await trio.sleep(4)
            return Reply("slept", Tally([*state.items, "slept"]))
        return await super().handle_call(request, state)


@contextlib.contextmanager
def hang_guard(seconds: float = 10.0) -> Iterator[None]:
    """Fail, rather than hang, a block whose tasks never all wait: under
    autojump_clock virtual time then stands still. A thread cancels the block after
    *seconds* of real time."""
    token = trio.lowlevel.current_trio_token()
    done = threading.Event()
    with trio.CancelScope() as scope:

        def watch() -> None:
            if not done.wait(seconds):
                token.run_sync_soon(scope.cancel)

        threading.Thread(target=watch, daemon=True).start()
        try:
            yield
        finally:
            done.set()
    assert not scope.cancelled_caught, f"still running after {seconds} s of real time"


async def test_testing_hibernate_of_a_busy_server_returns_once_it_has_hibernated(
    store, autojump_clock
):
    """`testing.hibernate` asked while the handler runs: the server hibernates as soon
    as that message is handled and committed (not at its idle timeout), and the
    helper waits for it without keeping virtual time from passing."""
    async with PersistentSupervisor(store=store) as sup:
        ref = await sup.start(Sleeper, key="s")
        with hang_guard():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ref.call, "sleep 4")
                await trio.testing.wait_all_tasks_blocked()
                await testing.hibernate(ref)
        assert 4 <= trio.current_time() < 5
        assert sup.statistics().active == 0
        assert sup.statistics().hibernations == 1
        assert (await ref.call("get")) == ["slept"]


@pytest.mark.parametrize("how", ["release", "hand_off"])
async def test_a_busy_server_handed_to_another_node_hibernates_once_its_message_is_done(
    store, autojump_clock, how
):
    """A cluster node gives a server to another one (`_release` when the other takes
    it, `_hand_off` when the members change) while its handler runs: the server
    hibernates as soon as that message is handled and committed, not at its idle
    timeout (which would hold the other node's activation for that long)."""
    async with PersistentSupervisor(store=store) as sup:
        ref = await sup.start(Sleeper, key="s")
        with hang_guard():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ref.call, "sleep 4")
                await trio.testing.wait_all_tasks_blocked()
                if how == "release":
                    await sup._release(ref, 30.0)
                else:
                    assert sup._hand_off(lambda ref: False) == 1
                    await trio.sleep(5)
        assert trio.current_time() < 6
        assert sup.statistics().active == 0
        assert sup.statistics().hibernations == 1
        assert (await ref.call("get")) == ["slept"]
