"""A hostile user's attacks on the bounded mailbox (mailbox_size=1 and friends), through
the public API only: every sender waiting on a full mailbox must get one outcome,
handled exactly once or an error, never a hang, a second handling or a silent loss."""

from __future__ import annotations

import math
import random
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from trio_pgs import (
    CallCycleError,
    MemoryStore,
    NoReply,
    PersistentServer,
    PersistentSupervisor,
    Reply,
    Restart,
    ServerCrashed,
    ServerNotFound,
    ServerQuarantined,
    ServerRef,
    Stop,
    SupervisorNotRunning,
)
from trio_pgs.testing import hibernate

#: Every item a handler took in, in the order handled (a second handling shows twice).
HANDLED: list[str] = []
#: What each activation's end was, as "key:reason".
TERMINATED: list[str] = []
#: Gates the handlers wait on, by name, and cancel scopes they may cancel.
GATES: dict[str, trio.Event] = {}
SCOPES: dict[str, trio.CancelScope] = {}


def gate(name: str) -> trio.Event:
    return GATES.setdefault(name, trio.Event())


@attrs.define
class Items:
    items: list[str] = attrs.Factory(list)


class Box(PersistentServer[Items]):
    """One message in its mailbox at most; handlers that hold, sleep, crash, stop."""

    kind = "hostile-box"
    mailbox_size = 1
    idle_timeout = 10.0

    async def init(self) -> Items:
        return Items()

    async def terminate(self, reason: Any, state: Items) -> None:
        TERMINATED.append(f"{self.ref.key}:{reason}")

    def _took(self, item: str, state: Items) -> Items:
        HANDLED.append(item)
        return Items([*state.items, item])

    async def handle_call(self, request: Any, state: Items) -> Any:
        match request:
            case "slow-crash":
                await trio.sleep(0.5)
                raise RuntimeError("asked to crash")
            case ("add", item):
                return Reply(item, self._took(item, state))
            case ("slow-add", item):
                await trio.sleep(1)
                return Reply(item, self._took(item, state))
            case "get":
                return Reply(list(state.items), state)
            case ("hold", name):
                await gate(name).wait()
                return Reply("held", state)
            case ("crash-after", name):
                await gate(name).wait()
                raise RuntimeError("asked to crash")
            case ("stop-after", name):
                await gate(name).wait()
                return Stop(state, reason="normal", reply="stopped")
            case ("cancel", name, item):
                SCOPES[name].cancel()  # its sender was let in just before this message
                return Reply(item, self._took(item, state))
            case ("self-cast-after", name, item):
                await gate(name).wait()
                await self.ref.cast(("add", item))
                return Reply("cast", state)
            case ("cast-to", ref, item):
                await ref.cast(("add", item))
                return Reply("cast", state)
            case ("call-after", name, ref, inner):
                await gate(name).wait()
                return Reply(await ref.call(inner), state)
            case ("arm", count, delay):
                for i in range(count):
                    self.send_after(delay, ("add", f"timer-{i}"))
                return Reply("armed", state)
        return await super().handle_call(request, state)

    async def handle_cast(self, message: Any, state: Items) -> Any:
        match message:
            case ("add", item):
                return NoReply(self._took(item, state))
            case ("slow-add", item):
                await trio.sleep(1)
                return NoReply(self._took(item, state))
        return await super().handle_cast(message, state)

    async def handle_info(self, info: Any, state: Items) -> Any:
        match info:
            case ("add", item):
                return NoReply(self._took(item, state))
            case ("slow-add", item):
                await trio.sleep(1)
                return NoReply(self._took(item, state))
        return await super().handle_info(info, state)


class TemporaryBox(Box):
    kind = "hostile-box-temporary"
    restart = Restart.TEMPORARY


class FragileBox(Box):
    kind = "hostile-box-fragile"
    max_crashes = 1


class RoomyBox(Box):
    kind = "hostile-box-roomy"
    mailbox_size = 3


class SturdyBox(Box):
    kind = "hostile-box-sturdy"
    max_crashes = 1_000


ALL = [Box, TemporaryBox, FragileBox, RoomyBox, SturdyBox]


@pytest.fixture(autouse=True)
def _reset() -> None:
    HANDLED.clear()
    TERMINATED.clear()
    GATES.clear()
    SCOPES.clear()


def supervisor(store: MemoryStore | None = None, **options: Any) -> PersistentSupervisor:
    store = MemoryStore() if store is None else store
    return PersistentSupervisor(store=store, servers=ALL, **options)


def via(ref: ServerRef, how: str) -> Callable[[Any], Awaitable[Any]]:
    """The ref's `call`, `cast` or `send`."""
    send: Callable[[Any], Awaitable[Any]] = getattr(ref, how)
    return send


async def hold_full(nursery: trio.Nursery, ref: ServerRef, request: Any) -> list[Any]:
    """Make *ref* handle *request* (which waits on a gate), then fill its mailbox with
    the cast of "fill"; returns where the held call's outcome lands."""
    outcome: list[Any] = []

    async def held() -> None:
        try:
            outcome.append(await ref.call(request))
        except Exception as exc:
            outcome.append(exc)

    nursery.start_soon(held)
    await trio.testing.wait_all_tasks_blocked()
    await ref.cast(("add", "fill"))  # room for one: queued at once
    return outcome


class Sender:
    """One message sent in a task of its own, with its outcome kept."""

    def __init__(self, ref: ServerRef, how: str, item: str) -> None:
        self.ref, self.how, self.item = ref, how, item
        self.scope = trio.CancelScope()
        self.result: Any = None
        self.error: BaseException | None = None
        self.done = False

    async def run(self) -> None:
        with self.scope:
            try:
                self.result = await via(self.ref, self.how)(("add", self.item))
            except Exception as exc:
                self.error = exc
            self.done = True

    @property
    def cancelled(self) -> bool:
        return self.scope.cancelled_caught


async def start_blocked(nursery: trio.Nursery, senders: list[Sender]) -> None:
    """Start each sender in turn, each one blocked before the next starts."""
    for sender in senders:
        nursery.start_soon(sender.run)
        await trio.testing.wait_all_tasks_blocked()
        assert not sender.done, f"{sender.item} was not blocked"


async def test_many_senders_on_a_one_message_mailbox_each_handled_once_in_order(
    autojump_clock,
):
    """Eight senders mixing call, cast and send into mailbox_size=1, a slow handler."""
    peak = 0
    async with supervisor() as sup:
        ref = await sup.start(Box, key="a")
        sent: dict[int, list[str]] = {}

        async def sender(n: int) -> None:
            sent[n] = []
            for i in range(12):
                item = f"{n}.{i}"
                await via(ref, ("call", "cast", "send")[(n + i) % 3])(("slow-add", item))
                sent[n].append(item)

        async def watch() -> None:
            nonlocal peak
            while True:
                peak = max(peak, sup.statistics().queued)
                await trio.sleep(0.25)

        with trio.fail_after(1000):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch)
                async with trio.open_nursery() as senders:
                    for n in range(8):
                        senders.start_soon(sender, n)
                nursery.cancel_scope.cancel()
        assert await ref.call("get") == HANDLED
        assert sup.statistics().queued == 0
    assert 1 == peak
    assert sorted(HANDLED) == sorted(item for items in sent.values() for item in items)
    for n, items in sent.items():
        assert [item for item in HANDLED if item.startswith(f"{n}.")] == items


@pytest.mark.parametrize("how", ["call", "cast", "send"])
async def test_senders_cancelled_while_waiting_for_room_are_never_handled(
    autojump_clock, how,
):
    """Every other blocked sender cancelled while waiting: the rest get in, in FIFO order."""
    async with supervisor() as sup:
        ref = await sup.start(Box, key="a")
        async with trio.open_nursery() as nursery:
            held = await hold_full(nursery, ref, ("hold", "g"))
            senders = [Sender(ref, how, f"s{i}") for i in range(8)]
            await start_blocked(nursery, senders)
            for sender in senders[1::2]:
                sender.scope.cancel()
            await trio.testing.wait_all_tasks_blocked()
            assert sup.statistics().queued == 1  # "fill"; the waiting senders are not in it
            gate("g").set()
        assert held == ["held"]
        for sender in senders[::2]:
            assert (sender.cancelled, sender.error) == (False, None)
            assert sender.result == (sender.item if how == "call" else None)
        for sender in senders[1::2]:
            assert sender.cancelled and not sender.done
        assert await ref.call("get") == HANDLED == ["fill", "s0", "s2", "s4", "s6"]


async def test_cast_cancelled_at_any_instant_is_handled_exactly_when_it_returned(
    autojump_clock,
):
    """Deadlines at every half second against a 1 s handler: cast outcome = handling."""
    async with supervisor() as sup:
        ref = await sup.start(Box, key="a")
        returned: list[str] = []
        cancelled: list[str] = []
        called: list[str] = []

        async def one(how: str, item: str, timeout: float) -> None:
            with trio.move_on_after(timeout):
                result = await via(ref, how)(("slow-add", item))
                (called if how == "call" else returned).append(item)
                assert result == (item if how == "call" else None)
                return
            cancelled.append(item)

        with trio.fail_after(1000):
            async with trio.open_nursery() as nursery:
                for i in range(40):
                    how = ("cast", "send", "call", "cast")[i % 4]
                    nursery.start_soon(one, how, f"{how}{i}", i * 0.5)
        await trio.testing.wait_all_tasks_blocked()
        await trio.sleep(100)  # calls cancelled after they were queued are handled still
    assert len(HANDLED) == len(set(HANDLED))  # nothing twice
    handled = set(HANDLED)
    assert set(returned) | set(called) <= handled
    assert not handled & {item for item in cancelled if not item.startswith("call")}
    assert handled <= set(returned) | set(called) | set(cancelled)
    assert returned and cancelled  # both outcomes were met


@pytest.mark.parametrize("how", ["call", "cast", "send"])
async def test_a_sender_cancelled_just_as_it_is_let_in_is_still_handled_once(
    autojump_clock, how,
):
    """The blocked sender's scope cancelled by the handler of the message it waited on."""
    async with supervisor() as sup:
        ref = await sup.start(Box, key="a")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ref.call, ("hold", "g"))
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(ref.call, ("cancel", "s", "first"))  # queued
            await trio.testing.wait_all_tasks_blocked()
            sender = Sender(ref, how, "late")
            SCOPES["s"] = sender.scope
            await start_blocked(nursery, [sender])
            gate("g").set()
        assert HANDLED == ["first", "late"]  # it got in before its scope was cancelled
        assert sender.error is None
        if how == "call":
            assert sender.cancelled  # a call cancelled after it was queued: reply dropped
        else:
            assert not sender.cancelled and sender.done  # accepted: returned normally


async def test_a_crash_with_senders_blocked_hands_them_all_to_the_next_activation(
    autojump_clock,
):
    """TRANSIENT crash while the mailbox is full and five senders wait for room."""
    async with supervisor() as sup:
        ref = await sup.start(Box, key="a")
        async with trio.open_nursery() as nursery:
            held = await hold_full(nursery, ref, ("crash-after", "g"))
            senders = [Sender(ref, ("call", "cast", "send")[i % 3], f"s{i}") for i in range(6)]
            await start_blocked(nursery, senders)
            gate("g").set()
        assert len(held) == 1 and isinstance(held[0], ServerCrashed)
        assert all(s.done and s.error is None for s in senders)
        assert await ref.call("get") == HANDLED == ["fill", *(s.item for s in senders)]
        assert TERMINATED[:1] == ["a:asked to crash"]


@pytest.mark.parametrize(
    ("cls", "error"), [(TemporaryBox, ServerNotFound), (FragileBox, ServerQuarantined)]
)
async def test_a_crash_that_ends_the_server_fails_every_blocked_call(
    autojump_clock, cls, error,
):
    """A TEMPORARY crash (wiped) or a quarantine while calls wait for room."""
    async with supervisor() as sup:
        ref = await sup.start(cls, key="a")
        async with trio.open_nursery() as nursery:
            held = await hold_full(nursery, ref, ("crash-after", "g"))
            calls = [Sender(ref, "call", f"c{i}") for i in range(4)]
            casts = [Sender(ref, how, f"{how}{i}") for i, how in enumerate(["cast", "send"])]
            await start_blocked(nursery, [*calls[:2], *casts, *calls[2:]])
            gate("g").set()
        assert len(held) == 1 and isinstance(held[0], ServerCrashed)
        for sender in calls:
            assert isinstance(sender.error, error), sender.error
        assert all(s.done and s.error is None for s in casts)  # dropped, as documented
        assert HANDLED == []
        with pytest.raises(error):
            await ref.call(("add", "after"))


async def test_a_stop_blocked_behind_others_and_senders_blocked_behind_it(autojump_clock):
    """ref.stop waiting for room; those queued before it handled, those after refused."""
    async with supervisor() as sup:
        ref = await sup.start(Box, key="a")
        async with trio.open_nursery() as nursery:
            await hold_full(nursery, ref, ("hold", "g"))
            before = Sender(ref, "call", "before")
            after = [Sender(ref, "call", "after-call"), Sender(ref, "cast", "after-cast")]
            stopped: list[Any] = []

            async def stop() -> None:
                stopped.append(await ref.stop())

            await start_blocked(nursery, [before])
            nursery.start_soon(stop)
            await trio.testing.wait_all_tasks_blocked()
            await start_blocked(nursery, after)
            gate("g").set()
        assert stopped == [None]
        assert before.result == "before"
        assert isinstance(after[0].error, ServerNotFound)
        assert after[1].done and after[1].error is None  # a queued cast is dropped
        assert HANDLED == ["fill", "before"]
        with pytest.raises(ServerNotFound):
            await ref.call("get")


async def test_a_stop_handler_with_senders_blocked(autojump_clock):
    """Stop("normal") returned by the held handler: every waiting call told."""
    async with supervisor() as sup:
        ref = await sup.start(Box, key="a")
        async with trio.open_nursery() as nursery:
            held = await hold_full(nursery, ref, ("stop-after", "g"))
            calls = [Sender(ref, "call", f"c{i}") for i in range(5)]
            await start_blocked(nursery, calls)
            gate("g").set()
        assert held == ["stopped"]
        assert all(isinstance(s.error, ServerNotFound) for s in calls)
        assert HANDLED == []


async def test_shutdown_cut_off_with_senders_blocked_answers_every_call(autojump_clock):
    """shutdown_timeout passes while the handler holds and calls wait for room."""
    async with trio.open_nursery() as outside:
        sup = supervisor(shutdown_timeout=2)
        async with sup:
            ref = await sup.start(Box, key="a")
            held = await hold_full(outside, ref, ("hold", "never"))
            calls = [Sender(ref, "call", f"c{i}") for i in range(4)]
            casts = [Sender(ref, "cast", "k0"), Sender(ref, "send", "k1")]
            await start_blocked(outside, [*calls[:2], *casts, *calls[2:]])
            began = trio.current_time()
        assert trio.current_time() - began <= 2 + 1
        await trio.testing.wait_all_tasks_blocked()
        assert all(s.done for s in [*calls, *casts])
    assert len(held) == 1 and isinstance(held[0], SupervisorNotRunning)
    for sender in calls:
        assert isinstance(sender.error, SupervisorNotRunning), sender.error
    assert HANDLED == []
    assert sup.statistics().unflushed == ("hostile-box/a",)


async def test_a_graceful_shutdown_with_senders_blocked(autojump_clock):
    """The held handler returns within shutdown_timeout: each call a reply or an error."""
    async with trio.open_nursery() as outside:
        store = MemoryStore()
        sup = supervisor(store, shutdown_timeout=5)
        async with sup:
            ref = await sup.start(Box, key="a")
            held = await hold_full(outside, ref, ("hold", "g"))
            calls = [Sender(ref, "call", f"c{i}") for i in range(5)]
            await start_blocked(outside, calls)

            async def release_later() -> None:
                await trio.sleep(1)
                gate("g").set()

            outside.start_soon(release_later)
    assert held == ["held"]
    for sender in calls:
        assert sender.done
        if sender.item in HANDLED:
            assert sender.result == sender.item
        else:
            assert isinstance(sender.error, SupervisorNotRunning), sender.error
    assert HANDLED == ["fill", *(s.item for s in calls if s.item in HANDLED)]
    assert len(HANDLED) == len(set(HANDLED))
    assert sup.statistics().unflushed == ()
    async with supervisor(store) as again:  # what was acknowledged is stored
        assert await again.ref(Box, "a").call("get") == HANDLED


async def test_a_self_cast_into_its_own_full_mailbox_is_a_call_cycle(autojump_clock):
    """A handler casting to itself when its mailbox is full: CallCycleError, no hang."""
    async with supervisor() as sup:
        ref = await sup.start(Box, key="a")
        async with trio.open_nursery() as nursery:
            held = await hold_full(nursery, ref, ("self-cast-after", "g", "mine"))
            gate("g").set()
        assert len(held) == 1 and isinstance(held[0], ServerCrashed)
        assert isinstance(held[0].__cause__, CallCycleError)
        # the queued cast handled by the next activation
        assert await ref.call("get") == HANDLED == ["fill"]
        GATES.clear()
        gate("g").set()  # with room in the mailbox the self-cast is queued
        assert await ref.call(("self-cast-after", "g", "mine")) == "cast"
        assert await ref.call("get") == ["fill", "mine"]


async def test_a_cast_blocked_on_a_full_mailbox_is_an_edge_of_the_wait_for_graph(
    autojump_clock,
):
    """A's handler waits to cast into B's full mailbox; B's handler then calls A."""
    async with supervisor() as sup:
        a, b = await sup.start(Box, key="a"), await sup.start(Box, key="b")
        async with trio.open_nursery() as nursery:
            held = await hold_full(nursery, b, ("call-after", "g", a, "get"))
            a_cast = Sender(a, "call", "unused")

            async def a_casts_to_b() -> None:
                a_cast.result = await a.call(("cast-to", b, "from-a"))

            nursery.start_soon(a_casts_to_b)
            await trio.testing.wait_all_tasks_blocked()
            assert a_cast.result is None  # A's handler waits for room in B's mailbox
            gate("g").set()
        assert len(held) == 1 and isinstance(held[0], ServerCrashed)
        assert isinstance(held[0].__cause__, CallCycleError)
        assert a_cast.result == "cast"
        assert await b.call("get") == ["fill", "from-a"]


async def test_timers_firing_into_a_full_mailbox_are_each_delivered_once(autojump_clock):
    """Five send_after timers wait for room behind a held handler and a queued cast."""
    async with supervisor() as sup:
        ref = await sup.start(Box, key="a")
        assert await ref.call(("arm", 5, 1)) == "armed"
        async with trio.open_nursery() as nursery:
            await hold_full(nursery, ref, ("hold", "g"))
            await trio.sleep(2)  # the timers fired: they wait for room
            assert HANDLED == [] and sup.statistics().queued == 1
            gate("g").set()
        assert await ref.call("get") == HANDLED
        assert sorted(HANDLED) == ["fill", *(f"timer-{i}" for i in range(5))]
        await hibernate(ref)
        assert TERMINATED == ["a:hibernate"]
        assert await ref.call("get") == HANDLED  # committed: a new activation has it


async def test_timers_waiting_for_room_die_with_a_crashed_activation(autojump_clock):
    """A crash while timers wait for room: they are dropped, not handled later."""
    async with supervisor() as sup:
        ref = await sup.start(Box, key="a")
        assert await ref.call(("arm", 3, 1)) == "armed"
        async with trio.open_nursery() as nursery:
            held = await hold_full(nursery, ref, ("crash-after", "g"))
            await trio.sleep(2)
            gate("g").set()
        assert isinstance(held[0], ServerCrashed)
        await trio.sleep(5)
        assert HANDLED == ["fill"]
        assert await ref.call("get") == ["fill"]


async def test_hibernation_asked_while_senders_wait_for_room(autojump_clock):
    """The idle timeout passing, then testing.hibernate, with blocked senders."""
    async with supervisor() as sup:
        ref = await sup.start(Box, key="a")
        async with trio.open_nursery() as nursery:
            await hold_full(nursery, ref, ("hold", "g"))
            senders = [Sender(ref, ("call", "cast", "send")[i % 3], f"s{i}") for i in range(5)]
            await start_blocked(nursery, senders)
            await trio.sleep(60)  # far past the idle timeout: not idle, not hibernated
            assert TERMINATED == [] and not any(s.done for s in senders)
            gate("g").set()
        assert all(s.done and s.error is None for s in senders)
        assert await ref.call("get") == HANDLED == ["fill", *(s.item for s in senders)]
        await hibernate(ref)
        assert TERMINATED == ["a:hibernate"]
        assert sup.statistics().active == 0
        assert await ref.call("get") == HANDLED  # from the store, a new activation
        await trio.sleep(11)  # the idle timeout
        assert TERMINATED == ["a:hibernate"] * 2


async def test_testing_hibernate_of_a_busy_server_returns_once_it_is_idle(autojump_clock):
    """testing.hibernate asked while the handler holds and senders wait for room."""
    async with supervisor() as sup:
        ref = await sup.start(Box, key="a")
        hibernated = trio.Event()

        async def hibernate_it() -> None:
            await hibernate(ref)
            hibernated.set()

        async with trio.open_nursery() as nursery:
            await hold_full(nursery, ref, ("hold", "g"))
            blocked = Sender(ref, "call", "blocked")
            await start_blocked(nursery, [blocked])
            nursery.start_soon(hibernate_it)
            await trio.lowlevel.checkpoint()
            gate("g").set()
            for _ in range(10_000):  # the helper never blocks: count turns, not time
                if hibernated.is_set():
                    break
                await trio.sleep(0)
            nursery.cancel_scope.cancel()  # do not hang the run either way
        assert HANDLED == ["fill", "blocked"] and blocked.result == "blocked"
        assert hibernated.is_set(), "still active after 10,000 turns of testing.hibernate"
        assert TERMINATED == ["a:hibernate"]


async def test_queued_counts_what_is_in_the_mailboxes_not_who_waits(autojump_clock):
    """statistics().queued with mailbox_size=3, blocked and cancelled senders."""
    async with supervisor() as sup:
        ref = await sup.start(RoomyBox, key="a")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ref.call, ("hold", "g"))
            await trio.testing.wait_all_tasks_blocked()
            assert sup.statistics().queued == 0
            for i in range(3):
                await ref.cast(("add", f"q{i}"))
                assert sup.statistics().queued == i + 1
            senders = [Sender(ref, "cast", f"w{i}") for i in range(4)]
            await start_blocked(nursery, senders)
            assert sup.statistics().queued == 3
            senders[0].scope.cancel()
            senders[3].scope.cancel()
            await trio.testing.wait_all_tasks_blocked()
            assert sup.statistics().queued == 3
            gate("g").set()
        assert await ref.call("get") == HANDLED == ["q0", "q1", "q2", "w1", "w2"]
        assert sup.statistics().queued == 0


async def test_many_servers_under_max_active_with_full_mailboxes(autojump_clock):
    """Thirty one-message servers, max_active=4, five senders each: all through once."""
    async with supervisor(max_active=4) as sup:
        refs = [await sup.start(Box, key=f"k{i}") for i in range(30)]

        async def sender(ref: ServerRef, n: int) -> None:
            for i in range(4):
                how = ("call", "cast", "send")[(n + i) % 3]
                await via(ref, how)(("slow-add", f"{ref.key}.{n}.{i}"))
                stats = sup.statistics()
                assert stats.queued <= stats.active  # one message per mailbox at most

        with trio.fail_after(10_000):
            async with trio.open_nursery() as nursery:
                for ref in refs:
                    for n in range(5):
                        nursery.start_soon(sender, ref, n)
        assert sup.statistics().queued == 0
        for ref in refs:
            items = await ref.call("get")
            assert sorted(items) == sorted(f"{ref.key}.{n}.{i}" for n in range(5) for i in range(4))
            for n in range(5):
                mine = [item for item in items if item.startswith(f"{ref.key}.{n}.")]
                assert mine == [f"{ref.key}.{n}.{i}" for i in range(4)]
    assert len(HANDLED) == len(set(HANDLED)) == 30 * 5 * 4


@pytest.mark.parametrize("seed", range(4))
async def test_random_deadlines_and_crashes_never_lose_or_repeat_a_message(
    autojump_clock, seed,
):
    """Sixty senders with random deadlines while the server keeps crashing."""
    rng = random.Random(seed)
    async with supervisor() as sup:
        ref = await sup.start(SturdyBox, key="a")
        returned: set[str] = set()
        cancelled_casts: set[str] = set()
        crashed = 0

        async def one(how: str, item: str, start: float, timeout: float) -> None:
            await trio.sleep(start)
            with trio.move_on_after(timeout):
                await via(ref, how)(("slow-add", item))
                returned.add(item)
                return
            if how != "call":
                cancelled_casts.add(item)

        async def crasher() -> None:
            nonlocal crashed
            for _ in range(6):
                await trio.sleep(rng.uniform(0, 5))
                with pytest.raises(ServerCrashed):
                    await ref.call("slow-crash")
                crashed += 1

        with trio.fail_after(10_000):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(crasher)
                for i in range(60):
                    how = rng.choice(["call", "cast", "send"])
                    timeout = rng.choice([0, 0.5, 1, rng.uniform(0, 20), math.inf])
                    nursery.start_soon(one, how, f"{how}{i}", rng.uniform(0, 10), timeout)
        assert await ref.call("get") == HANDLED  # every queued message handled by now
    assert crashed == 6
    assert len(HANDLED) == len(set(HANDLED))
    assert returned <= set(HANDLED)
    assert not cancelled_casts & set(HANDLED)
    assert cancelled_casts  # some casts were cancelled while they waited for room
