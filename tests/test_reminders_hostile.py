"""Durable reminders attacked as a hostile user would, from docs/howto/reminders.md.

Each test here failed when it was written; its docstring says what the documentation
promises. They run on the stores named in their parameters (``memory``, ``diskcache``,
``postgres``: the session's PostgreSQL, see tests/postgres.py).
"""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest
import trio

import trio_pgs
from trio_pgs import (
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
    ServerCrashed,
    Store,
)
from trio_pgs.testing import FaultyStore

from .clocked import ClockedDiskCacheStore

# -- helpers ------------------------------------------------------------------------------


def wall() -> float:
    """Wall-clock time as the supervisor reads it (it follows trio's clock)."""
    from trio_pgs._supervisor import _wall_offset

    return trio.current_time() + _wall_offset()


@pytest.fixture(params=["memory", "diskcache", "postgres"])
def any_store(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Store:
    if request.param == "postgres":
        return request.getfixturevalue("postgres").store()
    if request.param == "diskcache":
        return ClockedDiskCacheStore(tmp_path_factory.mktemp("store"))
    return MemoryStore()


#: Reminders handed to `Hostile.handle_info` (deliveries attempted, committed or not).
SEEN: list[Reminder] = []
#: What the next reminder delivery does instead of returning: "interrupt" (Ctrl-C).
NEXT: list[str] = []


@pytest.fixture(autouse=True)
def _reset() -> None:
    SEEN.clear()
    NEXT.clear()


class Hostile(PersistentServer[int]):
    """Sets the reminders it is asked to; counts the messages it handles."""

    kind = "hostile"
    idle_timeout = 1.0

    async def init(self, *setup: Any) -> int:
        for name, options in setup:
            self.remind(name, **options)
        return 0

    async def handle_call(self, request: Any, count: int) -> CallResult[int]:
        match request:
            case ("remind", name, options):
                self.remind(name, **options)
                return Reply("set", count)
            case "get":
                return Reply(count, count, persist=False)
        return await super().handle_call(request, count)

    async def handle_cast(self, message: Any, count: int) -> CastResult[int]:
        return NoReply(count + 1)

    async def handle_info(self, message: Any, count: int) -> CastResult[int]:
        assert isinstance(message, Reminder)
        SEEN.append(message)
        if NEXT and NEXT.pop(0) == "interrupt":
            raise KeyboardInterrupt
        return NoReply(count + 1000)


def supervisor(store: Store, *classes: type, **options: Any) -> PersistentSupervisor:
    return PersistentSupervisor(store=store, servers=[Hostile, *classes], **options)


async def stored(store: Store, key: str, kind: str = "hostile") -> trio_pgs.Record:
    record = await store.load(kind, key)
    assert record is not None
    return record


# -- absurd but accepted times --------------------------------------------------------------

_FAR_PAST_PERIODIC = textwrap.dedent("""
    import trio, trio.testing
    from trio_pgs import MemoryStore, NoReply, PersistentServer, PersistentSupervisor

    class Far(PersistentServer[int]):
        kind = "far"
        async def init(self) -> int:
            self.remind("tick", at=-1e300, every=1.0)  # a finite timestamp: accepted
            return 0
        async def handle_info(self, message, count):
            return NoReply(count + 1)

    async def main():
        async with PersistentSupervisor(store=MemoryStore(), servers=[Far]) as sup:
            try:
                ref = await sup.start(Far, key="a")
            except Exception as exc:  # refused as a bad argument: fine too
                print("refused", type(exc).__name__, flush=True)
                return
            await trio.sleep(5)
            print("ran", flush=True)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
""")


def test_a_periodic_reminder_far_in_the_past_does_not_freeze_the_process():
    """A time already past fires at once, and missed ticks come as **one** delivery
    with the next tick the first after now (docs/howto/reminders.md, "What is
    guaranteed"). ``remind("tick", at=-1e300, every=1.0)`` is accepted (a finite
    timestamp), and its first delivery never ends: `_schedule.deliver` computes
    ``missed`` as a huge int, ``due + (missed + 1) * every`` rounds back to a value
    <= now, and its ``while following <= now: missed += 1`` loop can never move the
    float: a busy loop on the trio thread that freezes the whole process (no
    timeout, no Ctrl-C handled by trio). Expected: the reminder is refused at
    ``remind`` (a ValueError) or delivered once; either way the process goes on."""
    try:
        done = subprocess.run([sys.executable, "-c", _FAR_PAST_PERIODIC],
                              capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail("the process froze delivering reminder(at=-1e300, every=1.0)")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[0] in ("refused", "ran")


async def test_a_periodic_reminder_whose_next_tick_overflows_is_refused_or_delivered_once(
    any_store, autojump_clock
):
    """Setting a reminder either fails at ``remind`` (bad arguments: nothing changes)
    or is kept, delivered, and moved to "its next tick after now" in the same commit
    (docs/howto/reminders.md). ``at=-1.7e308, every=1.7e308`` is accepted; after its
    first delivery, `_schedule.deliver` computes the next tick as ``due + 2 * every``
    = inf. A MemoryStore stores a reminder due at ``inf``; a DiskCacheStore or
    PostgresStore refuses the commit (``pack_reminders``: allow_nan=False), so the
    delivery is never committed and comes again at every look at the due index, for
    ever, each time failing a commit. Expected: refused at ``remind`` (ValueError), or
    one delivery and a finite next tick."""
    async with supervisor(any_store) as sup:
        ref = await sup.start(Hostile, key="a")
        try:
            await ref.call(("remind", "tick", {"at": -1.7e308, "every": 1.7e308}))
        except ServerCrashed as exc:
            assert isinstance(exc.__cause__, ValueError | TypeError)
            return
        await trio.sleep(200)
        assert len(SEEN) == 1, f"delivered {len(SEEN)} times"
        assert sup.statistics().failed_commits == 0
        record = await stored(any_store, "a")
        assert all(math.isfinite(r.due) for r in record.reminders), record.reminders


async def test_the_next_tick_after_a_start_far_in_the_past_is_the_first_after_now(
    autojump_clock,
):
    """"The next tick is the first one after now" (docs/howto/reminders.md, periodic
    ticks folded). With ``at=-1e20, every=0.001`` (accepted: a finite timestamp), the
    first delivery moves the reminder to a tick hours away instead of the next
    millisecond: `_schedule.deliver` adds ``(missed + 1) * every`` to ``due = -1e20``,
    whose float spacing is 16384 s, so the next tick lands up to that far after now
    and every tick in between is skipped. Expected: refused at ``remind`` (outside the
    times a datetime can name, say), or a next tick within one period of now."""
    store = MemoryStore()
    async with supervisor(store) as sup:
        ref = await sup.start(Hostile, key="a")
        try:
            await ref.call(("remind", "tick", {"at": -1e20, "every": 0.001}))
        except ServerCrashed as exc:
            assert isinstance(exc.__cause__, ValueError | TypeError)
            return
        await trio.sleep(0.0005)
        assert len(SEEN) == 1
        (left,) = (await stored(store, "a")).reminders
        assert left.due - wall() <= 0.001 + 1e-6, f"next tick {left.due - wall():.0f} s away"


# -- Ctrl-C -------------------------------------------------------------------------------


class Deferred(Hostile):
    kind = "deferred"
    idle_timeout = 100.0
    max_lag = 60.0


@pytest.mark.parametrize("persistence", [Persistence.WRITE_BEHIND, Persistence.ON_STOP])
async def test_ctrl_c_in_a_reminder_handler_does_not_consume_the_reminder(
    any_store, persistence, autojump_clock
):
    """A KeyboardInterrupt out of a handler shuts the supervisor down and "its message
    is not committed" (docs/guide.md, Crashes and stops); a reminder whose handler did
    not return is "delivered again (at least once)" (docs/howto/reminders.md). Under
    WRITE_BEHIND or ON_STOP, with a state change still unwritten, a Ctrl-C in the
    handler of a reminder loses the reminder: `ReminderBook.take_due` advanced it,
    `Activation._interrupted` (trio_pgs/_activation.py, ``_interrupted``) does not call
    ``self.book.crashed()`` as `_crash` does, and `_shut_down`'s flush writes the
    pending state with the advanced reminders. After the restart it never comes."""
    Deferred.persistence = persistence
    try:
        with pytest.raises(KeyboardInterrupt):
            async with supervisor(any_store, Deferred) as sup:
                ref = await sup.start(Deferred, ("once", {"after": 10}), key="a")
                await ref.cast("change")  # unwritten yet: the shutdown flushes it
                NEXT.append("interrupt")
                await trio.sleep(20)
        assert [r.name for r in SEEN] == ["once"]
        async with supervisor(any_store, Deferred) as sup:
            await trio.sleep(1)
            assert [r.name for r in SEEN] == ["once", "once"], "the reminder was lost"
            assert await sup.ref(Deferred, "a").call("get") == 1001
    finally:
        del Deferred.persistence


# -- stores without a due index ------------------------------------------------------------


class NoDueIndex:
    """A store of one's own, with no ``due`` method (not `SupportsReminders`)."""

    def __init__(self) -> None:
        self.inner = MemoryStore()

    async def open(self) -> None:
        await self.inner.open()

    async def close(self) -> None:
        await self.inner.close()

    async def load(self, kind: str, key: str) -> trio_pgs.Record | None:
        return await self.inner.load(kind, key)

    async def commit(self, operations: Sequence[Any]) -> None:
        await self.inner.commit(operations)

    async def scan(self, kind: str) -> AsyncIterator[trio_pgs.Record]:
        async for record in self.inner.scan(kind):
            yield record


async def test_a_faulty_store_over_a_store_without_a_due_index_refuses_reminders(
    autojump_clock,
):
    """"A store of your own that has no ``due`` method (`SupportsReminders`) refuses
    ``remind`` with a PersistenceError" (docs/howto/reminders.md, Costs and limits).
    Wrapped in `trio_pgs.testing.FaultyStore` (docs/howto/testing.md: it "wraps a
    store"), the same store accepts ``remind``, because FaultyStore always has a
    ``due`` method (trio_pgs/testing/_faults.py, ``FaultyStore.due``, which answers
    [] for an inner store without one). The reminder is committed and then never
    delivered once the server is dormant: a test of one's own store passes under
    FaultyStore and the reminders silently never fire in production (or the other
    way round). Expected: refused with a PersistenceError, as without the wrapper."""
    async with supervisor(FaultyStore(NoDueIndex())) as sup:
        ref = await sup.start(Hostile, key="a")
        try:
            await ref.call(("remind", "later", {"after": 10}))
        except ServerCrashed as exc:
            assert isinstance(exc.__cause__, PersistenceError)
            return
        await trio.sleep(60)  # dormant after 1 s
        assert [r.name for r in SEEN] == ["later"], "accepted, and never delivered"


class Interrupted(PersistentServer[int]):
    kind = "interrupted"
    idle_timeout = 100.0
    max_lag = 60.0
    persistence = Persistence.WRITE_BEHIND

    async def init(self) -> int:
        return 0

    async def handle_cast(self, message: Any, count: int) -> CastResult[int]:
        if message == "remind-then-ctrl-c":
            self.remind("ghost", after=5)
            raise KeyboardInterrupt
        return NoReply(count + 1)


async def test_ctrl_c_drops_the_reminders_its_handler_set(any_store, autojump_clock):
    """What a handler sets "is committed with the state of the message that set
    [it]"; a KeyboardInterrupt's message "is not committed" (docs/howto/reminders.md,
    docs/guide.md). Under WRITE_BEHIND with an earlier change unwritten, a handler that
    sets a reminder and then gets Ctrl-C has its reminder committed by the shutdown's
    flush (`Activation._interrupted` keeps ``self.book.current`` as the handler left it;
    `_shut_down` writes it with the pending state). Expected: no reminder stored."""
    with pytest.raises(KeyboardInterrupt):
        async with PersistentSupervisor(store=any_store, servers=[Interrupted]) as sup:
            ref = await sup.start(Interrupted, key="a")
            await ref.cast("change")
            await ref.cast("remind-then-ctrl-c")
            await trio.sleep(1)
    record = await stored(any_store, "a", "interrupted")
    assert record.data == b"1"
    assert record.reminders == (), "the interrupted message's reminder was committed"
