"""Reminders: durable timers that wake dormant servers (DESIGN.md section 15).

Every rule of docs/reminders.md, on the autojump clock: wall-clock time moves with
trio's clock for a whole trio run (the supervisor's ``wall_offset``), so a test can
sleep through hours, and across a close and a reopen of the supervisor.
"""

from __future__ import annotations

import datetime
import time
from typing import Any

import attrs
import pytest
import trio

from trio_pgs import (
    AlreadyStarted,
    CallResult,
    CastResult,
    MemoryStore,
    NoReply,
    Persistence,
    PersistenceError,
    PersistentServer,
    PersistentSupervisor,
    Reminder,
    Reply,
    RequestError,
    ServerCrashed,
    ServerQuarantined,
    Store,
)
from trio_pgs._schedule import StoredReminder, deliver, make_reminder, unpack_reminders
from trio_pgs.testing import FaultyStore

from . import servers


@attrs.define
class Log:
    #: Each delivery handled: [name, missed, payload, seconds late].
    seen: list[list[Any]] = attrs.Factory(list)
    counter: int = 0


#: Deliveries attempted, committed or not (crashes included), by name.
ATTEMPTS: list[str] = []
#: Names whose next delivery crashes (each crashes once).
CRASH_ON: set[str] = set()


class Reminded(PersistentServer[Log]):
    """Sets reminders when asked; logs every reminder it is given."""

    kind = "reminded"
    idle_timeout = 1.0
    max_crashes = 3

    async def init(self, *setup: Any) -> Log:
        for name, options in setup:
            self.remind(name, **options)
        return Log()

    async def handle_call(self, request: Any, state: Log) -> CallResult[Log]:
        match request:
            case ("remind", name, options):
                self.remind(name, **options)
                return Reply("set", state)
            case ("cancel", name):
                self.cancel_reminder(name)
                return Reply("cancelled", state)
            case ("remind-then-crash", name, options):
                self.remind(name, **options)
                raise RuntimeError("boom")
            case ("remind-then-refuse", name, options):
                self.remind(name, **options)
                raise RequestError("no")
            case ("remind-volatile", name, options):
                self.remind(name, **options)
                return Reply("set", state, persist=False)
            case "seen":
                return Reply(state.seen, state)
            case "crash":
                raise RuntimeError("asked to crash")
        raise AssertionError(request)

    async def handle_info(self, message: Any, state: Log) -> CastResult[Log]:
        assert isinstance(message, Reminder)
        ATTEMPTS.append(message.name)
        if message.name in CRASH_ON:
            CRASH_ON.discard(message.name)
            raise RuntimeError(f"crashed delivering {message.name}")
        if message.payload == "refuse":
            raise RequestError("refused")
        late = round(time.time() + _virtual_lag() - message.due)
        state.seen.append([message.name, message.missed, message.payload, late])
        return NoReply(state)


def _virtual_lag() -> float:
    """How far virtual wall-clock time is ahead of time.time() in this run."""
    from trio_pgs._supervisor import _wall_offset

    return trio.current_time() + _wall_offset() - time.time()


def wall() -> float:
    return time.time() + _virtual_lag()


@pytest.fixture(autouse=True)
def _reset() -> None:
    ATTEMPTS.clear()
    CRASH_ON.clear()


def supervisor(store: Store, **options: Any) -> PersistentSupervisor:
    return PersistentSupervisor(store=store, servers=[Reminded], **options)


async def stored_reminders(store: Store, key: str) -> tuple[StoredReminder, ...]:
    record = await store.load("reminded", key)
    assert record is not None
    return record.reminders


async def test_a_reminder_wakes_a_dormant_server_when_due(store, autojump_clock):
    async with supervisor(store) as sup:
        ref = await sup.start(Reminded, key="a")
        await ref.call(("remind", "ping", {"after": 60, "payload": {"n": [1]}}))
        await trio.sleep(30)
        assert sup.statistics().active == 0 and ATTEMPTS == []  # dormant, nothing yet
        await trio.sleep(31)
        assert ATTEMPTS == ["ping"]
        assert await ref.call("seen") == [["ping", 0, {"n": [1]}, 0]]
        stats = sup.statistics()
        assert stats.reminders == 1 and stats.woken_by_reminders == 1
        assert await stored_reminders(store, "a") == ()  # a one-off is gone once delivered


async def test_a_periodic_reminder_ticks_with_the_server_dormant_between(store, autojump_clock):
    async with supervisor(store) as sup:
        ref = await sup.start(Reminded, key="a")
        await ref.call(("remind", "tick", {"every": 10}))
        await trio.sleep(35)
        assert ATTEMPTS == ["tick", "tick", "tick"]
        assert sup.statistics().woken_by_reminders == 3  # hibernated between ticks
        assert [s[:2] for s in await ref.call("seen")] == [["tick", 0]] * 3


async def test_an_active_server_gets_its_reminders_without_hibernating(store, autojump_clock):
    async with supervisor(store, idle_timeout=None) as sup:
        ref = await sup.start(Reminded, key="a")
        await ref.call(("remind", "soon", {"after": 5}))
        await trio.sleep(6)
        assert ATTEMPTS == ["soon"]
        stats = sup.statistics()
        assert stats.activations == 1 and stats.woken_by_reminders == 0


async def test_reminders_set_in_init_are_created_with_the_server(store, autojump_clock):
    async with supervisor(store) as sup:
        ref = await sup.start(Reminded, ("expire", {"after": 3600}), key="a")
        assert [r.name for r in await stored_reminders(store, "a")] == ["expire"]
        await trio.sleep(3601)
        assert await ref.call("seen") == [["expire", 0, None, 0]]


async def test_ticks_missed_while_nothing_ran_come_as_one_delivery(store, autojump_clock):
    async with supervisor(store) as sup:
        ref = await sup.start(Reminded, key="a")
        await ref.call(("remind", "tick", {"every": 10}))
    await trio.sleep(105)  # no supervisor: ticks at 10, 20, ..., 100 are missed
    async with supervisor(store) as sup:
        await trio.sleep(0.5)
        assert ATTEMPTS == ["tick"]  # one delivery, not ten
        seen = await ref.call("seen")
        assert seen[0][:2] == ["tick", 9] and seen[0][3] >= 95  # the first missed tick
        await trio.sleep(10)
        assert ATTEMPTS == ["tick", "tick"]  # and on the period after that
        assert (await ref.call("seen"))[1][:2] == ["tick", 0]


async def test_a_time_already_past_fires_at_once(store, autojump_clock):
    async with supervisor(store) as sup:
        ref = await sup.start(Reminded, key="a")
        past = datetime.datetime.fromtimestamp(wall() - 3600, datetime.timezone.utc)
        await ref.call(("remind", "late", {"at": past}))
        await trio.sleep(0.1)
        assert await ref.call("seen") == [["late", 0, None, 3600]]


async def test_setting_a_name_again_replaces_it_and_cancel_removes_it(store, autojump_clock):
    async with supervisor(store) as sup:
        ref = await sup.start(Reminded, key="a")
        await ref.call(("remind", "r", {"after": 10, "payload": 1}))
        await ref.call(("remind", "r", {"after": 20, "payload": 2}))
        await ref.call(("remind", "gone", {"after": 5}))
        await ref.call(("cancel", "gone"))
        await ref.call(("cancel", "never-set"))  # a no-op
        await trio.sleep(30)
        assert ATTEMPTS == ["r"]
        assert await ref.call("seen") == [["r", 0, 2, 0]]


async def test_a_crash_while_delivering_delivers_it_again(store, autojump_clock):
    async with supervisor(store) as sup:
        ref = await sup.start(Reminded, key="a")
        await ref.call(("remind", "once", {"after": 10}))
        CRASH_ON.add("once")
        await trio.sleep(12)
        assert ATTEMPTS == ["once", "once"]  # at least once: again after the crash
        # handled once, committed; the server was dormant after its crash, and the
        # reminder came again after the first backoff (1 s)
        assert await ref.call("seen") == [["once", 0, None, 1]]
        assert sup.statistics().crashes == 1


async def test_a_crash_drops_the_reminders_its_message_set(store, autojump_clock):
    async with supervisor(store) as sup:
        ref = await sup.start(Reminded, key="a")
        with pytest.raises(ServerCrashed):
            await ref.call(("remind-then-crash", "r", {"after": 10}))
        await trio.sleep(20)
        assert ATTEMPTS == []
        assert await stored_reminders(store, "a") == ()


async def test_a_refusal_drops_what_its_handler_set(store, autojump_clock):
    async with supervisor(store) as sup:
        ref = await sup.start(Reminded, key="a")
        with pytest.raises(RequestError):
            await ref.call(("remind-then-refuse", "r", {"after": 10}))
        await trio.sleep(20)
        assert ATTEMPTS == [] and await stored_reminders(store, "a") == ()


async def test_a_refused_delivery_counts_as_delivered(store, autojump_clock):
    async with supervisor(store) as sup:
        ref = await sup.start(Reminded, key="a")
        await ref.call(("remind", "r", {"after": 10, "payload": "refuse"}))
        await trio.sleep(30)
        assert ATTEMPTS == ["r"]  # not again: the refusal is its handling
        assert await stored_reminders(store, "a") == ()


async def test_reminders_set_under_persist_false_are_committed(store, autojump_clock):
    async with supervisor(store) as sup:
        ref = await sup.start(Reminded, key="a")
        await ref.call(("remind-volatile", "r", {"after": 10}))
        assert [r.name for r in await stored_reminders(store, "a")] == ["r"]
        await trio.sleep(11)
        assert ATTEMPTS == ["r"]


@pytest.mark.parametrize("persistence", [Persistence.WRITE_BEHIND, Persistence.ON_STOP])
async def test_deferred_modes_commit_reminders_with_the_state(
    store, autojump_clock, persistence
):
    async with supervisor(store, persistence=persistence) as sup:
        ref = await sup.start(Reminded, key="a")
        await ref.call(("remind", "r", {"after": 30}))
        await trio.sleep(60)  # hibernated (written), woken, delivered, hibernated
        assert ATTEMPTS == ["r"]
        assert await stored_reminders(store, "a") == ()
    async with supervisor(store) as sup:
        await trio.sleep(60)
        assert ATTEMPTS == ["r"]  # the advance was committed: not delivered again


async def test_a_quarantined_server_gets_none_until_released(store, autojump_clock):
    async with supervisor(store) as sup:
        ref = await sup.start(Reminded, key="a")
        await ref.call(("remind", "tick", {"every": 10}))
        for _ in range(3):
            with pytest.raises(ServerCrashed):
                await ref.call("crash")
        with pytest.raises(ServerQuarantined):
            await ref.call("seen")
        await trio.sleep(100)
        assert ATTEMPTS == []
        await sup.release(ref)
        await trio.sleep(0.5)
        assert ATTEMPTS == ["tick"]
        seen = await ref.call("seen")
        assert seen[0][0] == "tick" and seen[0][1] >= 9  # the missed ticks, folded


async def test_a_dormant_server_with_reminders_costs_no_task(store, autojump_clock):
    async with supervisor(store) as sup:
        for i in range(50):
            await sup.start(Reminded, ("later", {"after": 3600}), key=str(i))
        await trio.sleep(2)
        assert sup.statistics().active == 0
        expected = 2 + (sup._node is not None) + (sup._wakeups is not None)
        assert len(sup._nursery.child_tasks) == expected
        await trio.sleep(3600)
        assert len(ATTEMPTS) == 50


async def test_reminders_due_at_shutdown_fire_after_the_restart(store, autojump_clock):
    async with supervisor(store) as sup:
        await sup.start(Reminded, ("r", {"after": 10}), key="a")
    await trio.sleep(20)
    assert ATTEMPTS == []
    async with supervisor(store) as sup:
        await trio.sleep(0.1)
        assert ATTEMPTS == ["r"]


class GatedClaims(FaultyStore):
    """Claims (the loads of activations and starts) wait until the gate opens."""

    def __init__(self, inner: Store) -> None:
        super().__init__(inner)
        self.gate = trio.Event()

    async def claim(self, kind: str, key: str) -> Any:
        await self.gate.wait()
        return await super().claim(kind, key)


async def test_start_of_a_dormant_server_with_a_reminder_due_delays_nothing(
    store, autojump_clock
):
    # The tutorial's pattern: start, and on AlreadyStarted take the ref. Here the
    # reminders' task finds the server due while that start is loading it: the
    # start's entry, ending without an activation, is not a failed delivery, and the
    # reminder comes at once, not after a back-off.
    async with supervisor(store) as sup:
        await sup.start(Reminded, ("r", {"every": 10}), key="a")
    await trio.sleep(25)
    gated = GatedClaims(store)
    async with supervisor(gated) as sup:
        caught: list[AlreadyStarted] = []

        async def start() -> None:
            with pytest.raises(AlreadyStarted) as raised:
                await sup.start(Reminded, key="a")
            caught.append(raised.value)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(start)
            await trio.sleep(0.01)  # the reminders' task has looked: "a" is due
            assert ATTEMPTS == []
            gated.gate.set()
        assert caught[0].ref == sup.ref(Reminded, "a")
        await trio.sleep(0.1)
        assert ATTEMPTS == ["r"]
        assert [s[:2] for s in await caught[0].ref.call("seen")] == [["r", 1]]


async def test_bad_arguments_fail_the_handler_and_change_nothing(store, autojump_clock):
    async with supervisor(store) as sup:
        ref = await sup.start(Reminded, key="a")
        naive = datetime.datetime(2030, 1, 1)
        for options in ({"at": naive}, {"after": -1}, {"every": 0}, {},
                        {"after": 1, "payload": (1, 2)}, {"at": 1.0, "after": 1.0},
                        {"after": float("nan")}, {"after": 1, "payload": {1: 2}}):
            with pytest.raises(ServerCrashed):
                await ref.call(("remind", "r", options))
            await sup.release(ref) if sup.statistics().quarantined else None
        assert await stored_reminders(store, "a") == ()


async def test_a_store_without_a_due_index_refuses_reminders(autojump_clock):
    store = servers.FaultyStore()  # the tests' wrapper: load, commit, claim, no due()
    async with supervisor(store) as sup:
        ref = await sup.start(Reminded, key="a")
        with pytest.raises(ServerCrashed) as caught:
            await ref.call(("remind", "r", {"after": 1}))
        assert isinstance(caught.value.__cause__, PersistenceError)
        assert "keeps no reminders" in str(caught.value.__cause__)


# -- the arithmetic ---------------------------------------------------------------------


def test_a_delivery_folds_the_missed_ticks_and_schedules_the_next_after_now():
    reminder = StoredReminder("r", 100.0, 10.0, '"p"')
    assert deliver(reminder, 100.0) == (Reminder("r", 100.0, "p", 0),
                                        StoredReminder("r", 110.0, 10.0, '"p"'))
    delivery, rest = deliver(reminder, 135.0)
    assert delivery.missed == 3 and rest is not None and rest.due == 140.0
    once = StoredReminder("o", 100.0)
    assert deliver(once, 1e9) == (Reminder("o", 100.0, None, 0), None)


def test_make_reminder_reads_at_after_and_every():
    at = datetime.datetime(2030, 1, 1, tzinfo=datetime.timezone.utc)
    assert make_reminder("r", at, None, None, None, 0.0).due == at.timestamp()
    assert make_reminder("r", None, 5, None, None, 100.0).due == 105.0
    assert make_reminder("r", None, None, 7, None, 100.0) == StoredReminder("r", 107.0, 7.0)
    assert make_reminder("r", 50.0, None, 7, [1], 100.0).payload == "[1]"
    for bad in ("", 3, "x" * 201):
        with pytest.raises(ValueError):
            make_reminder(bad, None, 1, None, None, 0.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="over the"):
        make_reminder("r", None, 1, None, "x" * 70000, 0.0)


@pytest.mark.parametrize("text", [
    "{", "{}", "[[1, 2, 3, 4]]", '[["r", "x", null, "null"]]', '[["r", 1, -5, "null"]]',
    '[["r", 1, null, "{"]]', '[["b", 1, null, "null"], ["a", 1, null, "null"]]',
    '[["r", 1e999, null, "null"]]', '[["a", 1, null, "null"], ["a", 2, null, "null"]]',
    '[["r", true, null, "null"]]', "[" * 5000,
])
def test_stored_reminders_that_are_not_what_was_written_are_refused(text):
    with pytest.raises(ValueError):
        unpack_reminders(text)


class Early(PersistentServer[int]):
    kind = "early"

    async def init(self, use_timer: bool) -> int:
        assert self.ref.key == "e"  # init knows its ref
        if use_timer:
            self.send_after(1, "tick")
        return 0


async def test_init_knows_its_ref_and_send_after_there_says_what_to_use(autojump_clock):
    async with PersistentSupervisor(store=servers.FaultyStore(), servers=[Early]) as sup:
        with pytest.raises(ServerCrashed) as caught:
            await sup.start(Early, True, key="e")
        assert "use remind()" in str(caught.value.__cause__)
        await sup.start(Early, False, key="e")


class Slow(PersistentServer[int]):
    """A periodic reminder whose handler takes longer than its period."""

    kind = "slow"
    idle_timeout = None

    async def init(self) -> int:
        self.remind("busy", every=0.01)
        return 0

    async def handle_call(self, request: Any, count: int) -> CallResult[int]:
        return Reply(count, count)

    async def handle_info(self, message: Any, count: int) -> CastResult[int]:
        await trio.sleep(0.05)
        return NoReply(count + 1 + message.missed)


async def test_a_reminder_always_due_does_not_starve_the_mailbox(autojump_clock):
    async with PersistentSupervisor(store=MemoryStore(), servers=[Slow]) as sup:
        ref = await sup.start(Slow, key="s")
        await trio.sleep(1)
        with trio.fail_after(1):
            ticks = await ref.call("count")
        assert 50 < ticks < 200  # answered between two deliveries, each folding misses


@pytest.mark.parametrize("seed", range(5))
def test_a_reminders_deadline_is_the_first_trio_time_it_is_due(seed):
    """The activation's deadline and the wall clock agree to the last bit: at the
    deadline ``trio time + offset >= due``, and one step before it not (else a server
    woken for a due reminder could find it not due yet, and hibernate)."""
    import math
    import random

    from trio_pgs._reminding import trio_time_of

    rng = random.Random(seed)
    for _ in range(2000):
        due, offset = rng.uniform(1e9, 3e9), rng.uniform(1e9, 3e9) * rng.choice([1, -1])
        deadline = trio_time_of(due, offset)
        assert deadline + offset >= due
        assert not math.nextafter(deadline, -math.inf) + offset >= due
