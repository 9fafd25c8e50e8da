"""Random interleavings against a model: calls, casts, infos, crashes, stops (normal and
not), restarts of wiped keys, idle time across the hibernation deadline, concurrent and
cross-server callers, and supervisor restarts.

Each example draws a restart strategy and a program of steps started at chosen moments
(many of them just before, at and after the idle deadline), overlapping each other. The
model is checked against the committed store after every step, and at the end:

- no acknowledged update is lost: a call's update is committed when its reply comes,
  an accepted cast's or info's by the end; unless a wipe surely came after it;
- none is applied twice, and nothing from a message that crashed or was refused is
  (a refusal, a `RequestError`, even after its handler changed the state in place, and
  it wipes nothing even for a ``TEMPORARY`` server);
- a record is wiped exactly when the restart table says: by a normal stop, and by a
  crash or any stop of a ``TEMPORARY`` server (an update acknowledged before such a
  wipe is gone, one after it needs a new ``start``; a message to a wiped key raises
  `ServerNotFound`); crashes and other stops of the others keep it;
- each sender's updates keep their order, and no server ever has two activations.

A wipe that overlaps an update in time may come before or after it: the model allows
both. ``RACE_EXAMPLES`` sets the number of examples (200 by default).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import AsyncIterator, Sequence
from typing import Any

import attrs
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trio_pgs import (
    AlreadyStarted,
    CallCycleError,
    Delete,
    MemoryStore,
    PersistentSupervisor,
    Put,
    Record,
    RequestError,
    Restart,
    ServerCrashed,
    ServerNotFound,
)

from . import servers
from .servers import InlineTally, TallyServer

IDLE = 5.0
KEYS = ("a", "b")
WAITS = st.sampled_from([0.0, 0.001, 0.5, IDLE - 0.001, IDLE, IDLE + 0.001, IDLE * 2])
MESSAGES = st.lists(st.sampled_from(["call", "cast", "info"]), min_size=1, max_size=5)

steps = st.one_of(
    st.tuples(st.just("calls"), st.sampled_from(KEYS), st.integers(1, 8)),
    st.tuples(st.just("sender"), st.sampled_from(KEYS), MESSAGES),
    st.tuples(st.just("crash"), st.sampled_from(KEYS), st.booleans()),
    st.tuples(st.just("refuse"), st.sampled_from(KEYS), st.booleans()),
    st.tuples(st.just("pause"), st.sampled_from(KEYS)),
    st.tuples(st.just("stop"), st.sampled_from(KEYS), st.booleans()),
    st.tuples(st.just("restart"), st.sampled_from(KEYS)),
    st.tuples(st.just("cancelled"), st.sampled_from(KEYS), WAITS),
    st.tuples(st.just("cross"), st.sampled_from(KEYS)),
    st.tuples(st.just("reopen")),
)
programs = st.lists(st.tuples(WAITS, steps), min_size=1, max_size=12)
strategies = st.sampled_from(list(Restart))


@attrs.define
class Update:
    """One ("add", item) message: sent at tick `sent`, acknowledged (a call's reply) or
    accepted (a cast or info) at tick `done`."""

    key: str
    item: str
    sent: int
    durable: bool  # a call: committed when acknowledged
    done: int = -1


@attrs.define
class Span:
    """Something that happened between two ticks: a wipe, or a new start."""

    key: str
    sent: int
    done: int = -1  # -1: not finished yet


class Model:
    def __init__(self, restart: Restart, server: type[TallyServer] = TallyServer) -> None:
        self.restart = restart
        #: TallyServer, or InlineTally: its calls handled in their callers' tasks.
        self.server = server
        self.ticks = 0
        self.acked: list[Update] = []
        self.sent: set[str] = set()  # every update sent
        self.maybe: set[str] = set()  # sent by a caller that gave up
        self.forbidden: set[str] = set()  # crashed, refused or never sent
        self.orders: list[list[str]] = []  # each sender's acknowledged items, in order
        self.wipes: list[Span] = []
        self.starts: list[Span] = []
        self.senders = 0
        self.checks = 0

    def tick(self) -> int:
        self.ticks += 1
        return self.ticks

    def sender(self) -> str:
        self.senders += 1
        return f"s{self.senders}"

    def update(self, key: str, item: str, durable: bool) -> Update:
        self.sent.add(item)
        return Update(key, item, self.tick(), durable)

    def acknowledge(self, update: Update) -> None:
        update.done = self.tick()
        self.acked.append(update)

    def refused(self, update: Update) -> None:
        """The update raised ServerNotFound: a wipe must have been under way."""
        self.forbidden.add(update.item)
        assert any(w.key == update.key and w.sent < self.ticks for w in self.wipes), (
            f"ServerNotFound for {update.item} on {update.key} with no wipe before it"
        )

    def wipe_begins(self, key: str, wipes: bool = True) -> Span | None:
        """A message that may wipe *key* is sent (None: it cannot wipe)."""
        if not wipes:
            return None
        span = Span(key, self.tick())
        self.wipes.append(span)
        return span

    def wipe_ends(self, span: Span | None, wiped: bool) -> None:
        if span is None:
            return
        if wiped:
            span.done = self.tick()
        else:  # it did not wipe after all (already wiped, or no crash)
            self.wipes.remove(span)

    def fate(self, update: Update, now: float) -> str:
        """What the store must show of *update* at tick *now*: "present", "absent" or
        "either" (a wipe overlaps it, or is under way)."""
        fate = "present"
        for wipe in self.wipes:
            if wipe.key != update.key or wipe.sent > now:
                continue
            finished = wipe.done != -1 and wipe.done < now
            if update.done < wipe.sent:  # the update came first
                if finished:
                    return "absent"
                fate = "either"
            elif not (finished and wipe.done < update.sent):  # they overlap
                fate = "either"
        return fate

    def check(self, stored: dict[str, list[str]], now: float) -> None:
        """The committed store at tick *now* (math.inf: the end) against the model."""
        self.checks += 1
        items = [item for key in KEYS for item in stored.get(key, [])]
        assert len(items) == len(set(items)), f"applied twice: {items}"
        present = set(items)
        assert not self.forbidden & present, f"committed: {self.forbidden & present}"
        known = self.sent | self.maybe
        assert present <= known, f"invented: {present - known}"
        for update in self.acked:
            if update.done > now or (not update.durable and now != math.inf):
                continue
            fate = self.fate(update, now)
            where = stored.get(update.key, [])
            if fate == "present":
                assert update.item in where, f"lost: {update} (wipes: {self.wipes})"
            elif fate == "absent":
                assert update.item not in present, f"not wiped: {update} ({self.wipes})"
        for order in self.orders:
            positions = [items.index(item) for item in order if item in present]
            assert positions == sorted(positions), f"order broken: {order} in {items}"

    def check_refusals(self) -> None:
        """After a finished wipe, a message needs a new start first (ServerNotFound)."""
        for update in self.acked:
            wiped = [w for w in self.wipes if w.key == update.key and -1 < w.done < update.sent]
            if not wiped:
                continue
            last = max(w.sent for w in wiped)
            restarted = any(
                s.key == update.key and s.sent < update.done and (s.done == -1 or s.done > last)
                for s in self.starts
            )
            assert restarted, f"{update} was handled after its key was wiped"


class MirrorStore(MemoryStore):
    """A MemoryStore that also keeps each key's committed items, readable without a
    checkpoint (so a check sees one instant)."""

    def __init__(self) -> None:
        super().__init__()
        self.items: dict[str, list[str]] = {}

    async def commit(self, operations: Sequence[Put | Delete]) -> None:
        await super().commit(operations)
        self._mirror(operations)

    async def commit_each(self, operations: Sequence[Put | Delete]) -> list[Any]:
        outcomes = await super().commit_each(operations)
        applied = zip(operations, outcomes, strict=True)
        self._mirror([op for op, refused in applied if refused is None])
        return outcomes

    def _mirror(self, operations: Sequence[Put | Delete]) -> None:
        for operation in operations:  # no checkpoint since the commit applied
            if isinstance(operation, Put):
                record: Record = operation.record
                self.items[record.key] = json.loads(record.data)["items"]
            else:
                self.items.pop(operation.key, None)

    async def scan(self, kind: str) -> AsyncIterator[Record]:
        async for record in super().scan(kind):
            yield record


async def run_step(sup: PersistentSupervisor, model: Model, step: tuple[Any, ...]) -> None:
    action = step[0]
    if action == "calls":
        _, key, n = step
        async with trio.open_nursery() as nursery:
            for _ in range(n):
                nursery.start_soon(run_step, sup, model, ("sender", key, ["call"]))
    elif action == "sender":
        _, key, kinds = step
        ref, name, done = sup.ref(model.server, key), model.sender(), []
        model.orders.append(done)
        for i, kind in enumerate(kinds):
            update = model.update(key, f"{name}:{i}", kind == "call")
            try:
                if kind == "call":
                    await ref.call(("add", update.item))
                elif kind == "cast":
                    await ref.cast(("add", update.item))
                else:
                    await ref.send(("add", update.item))
            except ServerNotFound:
                model.refused(update)
                for later in range(i + 1, len(kinds)):
                    model.forbidden.add(f"{name}:{later}")
                return
            model.acknowledge(update)
            done.append(update.item)
    elif action == "crash":
        _, key, mutate = step
        item = f"{model.sender()}:crash"
        model.forbidden.add(item)
        request = ("mutate-then-crash", item) if mutate else "crash"
        span = model.wipe_begins(key, model.restart is Restart.TEMPORARY)
        try:
            await sup.ref(model.server, key).call(request)
        except ServerCrashed:
            model.wipe_ends(span, True)
        except ServerNotFound:
            model.wipe_ends(span, False)
        else:
            raise AssertionError("the crash did not crash")
    elif action == "refuse":  # a RequestError, after an in-place change or not
        _, key, mutate = step
        item = f"{model.sender()}:refused"
        model.forbidden.add(item)  # refused: never committed, whatever the strategy
        request = ("mutate-then-refuse", item) if mutate else ("refuse", item)
        model.tick()  # sent now: a wipe begun before may refuse it with ServerNotFound
        try:
            await sup.ref(model.server, key).call(request)
        except RequestError:
            pass
        except ServerNotFound:
            assert any(w.key == key and w.sent < model.ticks for w in model.wipes), (
                f"ServerNotFound for a refusal on {key} with no wipe before it"
            )
        else:
            raise AssertionError("the refusal was accepted")
    elif action in ("pause", "stop"):  # pause: a Stop with another reason
        key = step[1]
        normal = action == "stop"
        span = model.wipe_begins(key, normal or model.restart is Restart.TEMPORARY)
        try:
            if normal and step[2]:
                await sup.ref(model.server, key).stop()
            else:
                reason = "normal" if normal else "pause"
                assert await sup.ref(model.server, key).call(("stop", reason)) == "stopping"
        except ServerNotFound:
            model.wipe_ends(span, False)
        else:
            model.wipe_ends(span, True)
    elif action == "restart":
        span = Span(step[1], model.tick())
        try:
            await sup.start(model.server, key=step[1])
        except AlreadyStarted:
            return
        span.done = model.tick()
        model.starts.append(span)
    elif action == "cancelled":
        _, key, patience = step
        item = f"{model.sender()}:maybe"
        model.maybe.add(item)
        with trio.move_on_after(patience):
            try:
                if model.server is InlineTally:  # its handler cannot sleep: its caller does
                    await trio.sleep(0.5)
                else:
                    await sup.ref(model.server, key).call(("sleep", 0.5))
                await sup.ref(model.server, key).call(("add", item))
            except ServerNotFound:
                model.maybe.discard(item)
                model.forbidden.add(item)
    elif action == "cross" and model.server is not InlineTally:  # its handler cannot call
        other = "b" if step[1] == "a" else "a"
        update = model.update(other, f"{model.sender()}:cross", True)
        inner = ("add", update.item)
        span = model.wipe_begins(step[1], model.restart is Restart.TEMPORARY)
        try:
            await sup.ref(model.server, step[1]).call(("call", sup.ref(model.server, other), inner))
        except ServerCrashed as exc:
            # The other one was calling this one (CallCycleError), or it is wiped.
            assert isinstance(exc.__cause__, CallCycleError | ServerNotFound), exc.__cause__
            model.forbidden.add(update.item)
            model.wipe_ends(span, True)
        except ServerNotFound:
            model.forbidden.add(update.item)
            model.wipe_ends(span, False)
        else:
            model.acknowledge(update)
            model.wipe_ends(span, False)
    store = sup.store
    assert isinstance(store, MirrorStore)
    model.check(store.items, model.ticks)


async def run_program(
    restart: Restart, program: list[tuple[float, tuple[Any, ...]]],
    server: type[TallyServer] = TallyServer,
) -> Model:
    with trio.fail_after(24 * 3600):  # virtual time: a deadlock fails instead of hanging
        return await check_program(restart, program, server)


async def check_program(
    restart: Restart, program: list[tuple[float, tuple[Any, ...]]],
    server: type[TallyServer] = TallyServer,
) -> Model:
    store, model = MirrorStore(), Model(restart, server)
    phases: list[list[tuple[float, tuple[Any, ...]]]] = [[]]
    for wait, step in program:
        if step[0] == "reopen":
            phases.append([])
        else:
            phases[-1].append((wait, step))
    options = {"idle_timeout": IDLE, "max_crashes": 10**6, "restart": restart}
    for number, phase in enumerate(phases):
        async with PersistentSupervisor(store=store, servers=[model.server], **options) as sup:
            if number == 0:
                for key in KEYS:
                    await sup.start(model.server, key=key)
                    model.starts.append(Span(key, 0, 0))
            async with trio.open_nursery() as nursery:
                for wait, step in phase:
                    await trio.sleep(wait)
                    nursery.start_soon(run_step, sup, model, step)
        model.check(store.items, model.tick())
    async with PersistentSupervisor(store=store, servers=[model.server], **options) as sup:
        for key in KEYS:
            try:
                items = await sup.ref(model.server, key).call("get")
            except ServerNotFound:
                items = None
            assert items == store.items.get(key), f"{key}: read {items}, stored {store.items}"
    model.check(store.items, math.inf)
    model.check_refusals()
    assert all(n <= 1 for n in servers.LIFECYCLE.max_active.values()), "double activation"
    return model


@settings(
    max_examples=int(os.environ.get("RACE_EXAMPLES", "200")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(restart=strategies, program=programs, server=st.sampled_from([TallyServer, InlineTally]))
def test_random_programs_lose_nothing_and_never_double_activate(
    restart, program, server, lifecycle
):
    servers.LIFECYCLE = servers.Lifecycle()
    clock = trio.testing.MockClock(autojump_threshold=0)
    trio.run(run_program, restart, program, server, clock=clock)
