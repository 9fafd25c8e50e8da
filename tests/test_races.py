"""Random interleavings against a model: calls, casts, crashes, stops, idle time across
the hibernation deadline and supervisor restarts (DESIGN.md section 10).

Each example is a program of steps started at chosen moments (many of them just
before, at and after the idle deadline) and overlapping each other. The model: every
acknowledged update is in the final state exactly once, nothing from a crashed message
is, each sender's updates keep their order, and no server ever has two activations.

``RACE_EXAMPLES`` sets the number of examples (200 by default).
"""

from __future__ import annotations

import os
from typing import Any

import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trio_pgs import CallCycleError, MemoryStore, PersistentSupervisor, ServerCrashed

from . import servers
from .servers import TallyServer

IDLE = 5.0
KEYS = ("a", "b")
WAITS = st.sampled_from([0.0, 0.001, 0.5, IDLE - 0.001, IDLE, IDLE + 0.001, IDLE * 2])

steps = st.one_of(
    st.tuples(st.just("calls"), st.sampled_from(KEYS), st.integers(1, 8)),
    st.tuples(st.just("sender"), st.sampled_from(KEYS), st.integers(1, 5)),
    st.tuples(st.just("crash"), st.sampled_from(KEYS), st.booleans()),
    st.tuples(st.just("pause"), st.sampled_from(KEYS)),
    st.tuples(st.just("cancelled"), st.sampled_from(KEYS), WAITS),
    st.tuples(st.just("cross"), st.sampled_from(KEYS)),
    st.tuples(st.just("reopen")),
)
programs = st.lists(st.tuples(WAITS, steps), min_size=1, max_size=12)


class Model:
    def __init__(self) -> None:
        self.acked: set[str] = set()
        self.maybe: set[str] = set()  # sent by a caller that gave up
        self.forbidden: set[str] = set()  # from a message that crashed
        self.orders: list[list[str]] = []  # each sender's acknowledged items, in order
        self.senders = 0

    def sender(self) -> str:
        self.senders += 1
        return f"s{self.senders}"


async def run_step(sup: PersistentSupervisor, model: Model, step: tuple[Any, ...]) -> None:
    action = step[0]
    if action == "calls":
        _, key, n = step
        async with trio.open_nursery() as nursery:
            for _ in range(n):
                nursery.start_soon(run_step, sup, model, ("sender", key, 1))
    elif action == "sender":
        _, key, n = step
        ref, name, done = sup.ref(TallyServer, key), model.sender(), []
        model.orders.append(done)
        for i in range(n):
            item = f"{name}:{i}"
            if i % 2:
                await ref.cast(("add", item))
            else:
                await ref.call(("add", item))
            model.acked.add(item)
            done.append(item)
    elif action == "crash":
        _, key, mutate = step
        item = f"{model.sender()}:crash"
        model.forbidden.add(item)
        request = ("mutate-then-crash", item) if mutate else "crash"
        try:
            await sup.ref(TallyServer, key).call(request)
        except ServerCrashed:
            pass
        else:
            raise AssertionError("the crash did not crash")
    elif action == "pause":  # a stop with another reason: TRANSIENT keeps it dormant
        await sup.ref(TallyServer, step[1]).call(("stop", "pause"))
    elif action == "cancelled":
        _, key, patience = step
        item = f"{model.sender()}:maybe"
        model.maybe.add(item)
        with trio.move_on_after(patience):
            await sup.ref(TallyServer, key).call(("sleep", 0.5))
            await sup.ref(TallyServer, key).call(("add", item))
    elif action == "cross":
        other = "b" if step[1] == "a" else "a"
        item = f"{model.sender()}:cross"
        inner = ("add", item)
        try:
            await sup.ref(TallyServer, step[1]).call(("call", sup.ref(TallyServer, other), inner))
        except ServerCrashed as exc:  # the other one was calling this one: CallCycleError
            assert isinstance(exc.__cause__, CallCycleError)
            model.forbidden.add(item)
        else:
            model.acked.add(item)


async def run_program(program: list[tuple[float, tuple[Any, ...]]]) -> None:
    with trio.fail_after(24 * 3600):  # virtual time: a deadlock fails instead of hanging
        await check_program(program)


async def check_program(program: list[tuple[float, tuple[Any, ...]]]) -> None:
    store, model = MemoryStore(), Model()
    phases: list[list[tuple[float, tuple[Any, ...]]]] = [[]]
    for wait, step in program:
        if step[0] == "reopen":
            phases.append([])
        else:
            phases[-1].append((wait, step))
    for number, phase in enumerate(phases):
        async with PersistentSupervisor(store=store, idle_timeout=IDLE, max_crashes=10**6) as sup:
            if number == 0:
                for key in KEYS:
                    await sup.start(TallyServer, key=key)
            async with trio.open_nursery() as nursery:
                for wait, step in phase:
                    await trio.sleep(wait)
                    nursery.start_soon(run_step, sup, model, step)
    async with PersistentSupervisor(store=store, servers=[TallyServer]) as sup:
        items = []
        for key in KEYS:
            items += await sup.ref(TallyServer, key).call("get")
    assert len(items) == len(set(items)), f"applied twice: {items}"
    assert model.acked <= set(items), f"lost: {model.acked - set(items)}"
    assert not model.forbidden & set(items), "a crashed message was committed"
    assert set(items) <= model.acked | model.maybe
    for order in model.orders:
        positions = [items.index(item) for item in order]
        assert positions == sorted(positions), f"order broken: {order} in {items}"
    assert all(n <= 1 for n in servers.LIFECYCLE.max_active.values()), "double activation"


@settings(
    max_examples=int(os.environ.get("RACE_EXAMPLES", "200")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(program=programs)
def test_random_programs_lose_nothing_and_never_double_activate(program, lifecycle):
    servers.LIFECYCLE = servers.Lifecycle()
    trio.run(run_program, program, clock=trio.testing.MockClock(autojump_threshold=0))
