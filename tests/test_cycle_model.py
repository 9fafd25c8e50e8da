"""Call-cycle detection against a model: random programs of servers calling each other.

Each example draws N servers (2 to 6) and, for each, a small program run on every
message it handles: a list of steps, each a delay then a call (or a cast) to a server,
itself included, some wrapped in `trio.move_on_after` (the caller gives up). A handler
catches `CallCycleError` from its own call or cast, records it and goes on. Messages
carry a depth, and a handler at `MAX_DEPTH` does nothing, so every example ends. The
test drives one or several concurrent top-level calls (and casts) from outside any
handler, with drawn mailbox sizes and idle timeouts (so servers hibernate mid-program).

The model keeps its own wait-for graph: an edge from a server to the server it calls or
casts to, added before the call and removed once the caller has resumed. It holds every
edge of the library's graph (docs/decisions.md 6 and 54), and some more (a cast that
does not block, a call whose reply was sent but whose caller has not resumed yet). The
edges that surely are waits are the calls whose message has not been handled to the end.

Checked:

- no hang: every top-level call returns, and every server is idle, within a virtual-time
  bound computed from the drawn delays and timeouts;
- no false alarm, statically: when the program's call graph (casts counted too, when
  mailboxes are small enough that a cast may block) is acyclic, no `CallCycleError`;
- no false alarm, dynamically: a `CallCycleError` is raised only when the model's graph
  has a path from the callee back to the caller at that moment (or it is a self-call);
- no miss: a self-call always raises `CallCycleError`, and so does a call to a server
  that surely waits, through calls not yet handled, on the caller.

``CYCLE_EXAMPLES`` sets the number of examples (200 by default). The tests marked "Was
a bug" failed before the fix that drops a wait's edge when the wait ends (not when the
waiter resumes) and takes a dormant caller to wait on nobody; the random test found
them with small mailboxes and short idle timeouts.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
from collections.abc import Sequence
from typing import Any

import attrs
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from trio_pgs import (
    CallCycleError,
    MemoryStore,
    NoReply,
    PersistentServer,
    PersistentSupervisor,
    Reply,
    ServerRef,
    TrioPGSError,
)
from trio_pgs.testing import wait_all_idle

MAX_DEPTH = 3


@attrs.frozen
class Step:
    """Sleep `delay`, then `op` ("call" or "cast") server `target`, giving up after
    `timeout` (None: never)."""

    delay: float
    op: str
    target: int
    timeout: float | None


@attrs.frozen
class Top:
    """A top-level `op` to server `target`, sent `delay` after the start."""

    delay: float
    op: str
    target: int


@attrs.frozen
class Scenario:
    program: tuple[tuple[Step, ...], ...]
    tops: tuple[Top, ...]
    mailbox_size: int
    idle_timeout: float

    @property
    def n(self) -> int:
        return len(self.program)

    def casts_may_block(self) -> bool:
        return self.mailbox_size < 1024

    def static_cycle(self) -> bool:
        """Whether the graph of who calls whom (and casts to whom, when a cast may block)
        has a cycle, a self-loop included."""
        edges = {
            me: {s.target for s in steps if s.op == "call" or self.casts_may_block()}
            for me, steps in enumerate(self.program)
        }
        done: set[int] = set()
        on_stack: set[int] = set()

        def visit(node: int) -> bool:
            if node in on_stack:
                return True
            if node in done:
                return False
            on_stack.add(node)
            found = any(visit(t) for t in edges[node])
            on_stack.discard(node)
            done.add(node)
            return found

        return any(visit(node) for node in range(self.n))

    def bound(self) -> float:
        """More virtual time than the whole run can take without a hang: every sleep and
        every give-up timeout of every message that can be sent, one after the other."""
        memo: dict[tuple[int, int], float] = {}

        def cost(server: int, depth: int) -> float:
            if depth >= MAX_DEPTH:
                return 0.0
            if (server, depth) not in memo:
                memo[server, depth] = sum(
                    s.delay + (s.timeout or 0.0) + cost(s.target, depth + 1)
                    for s in self.program[server]
                )
            return memo[server, depth]

        total = sum(t.delay for t in self.tops) + sum(cost(t.target, 0) for t in self.tops)
        return 2 * total + 30.0


@attrs.define
class Edge:
    caller: int
    target: int
    op: str
    msg_id: int


@attrs.frozen
class Attempt:
    """One call or cast made by a handler, and what came of it."""

    me: int
    step: Step
    depth: int
    outcome: str  # "ok", "cancelled" (gave up), "cycle", or an error's class name
    possible: bool  # the model's graph had a path from the target back to the caller
    sure: bool  # ... through calls surely still waiting (or a self-call)


@attrs.define
class World:
    scenario: Scenario
    refs: list[ServerRef] = attrs.Factory(list)
    edges: list[Edge] = attrs.Factory(list)
    started: set[int] = attrs.Factory(set)
    finished: set[int] = attrs.Factory(set)
    attempts: list[Attempt] = attrs.Factory(list)
    running: int = 0
    ids: Any = attrs.Factory(lambda: itertools.count(1))

    def path(self, source: int, dest: int, *, sure: bool) -> bool:
        """Whether *source* may wait on *dest* along the model's edges: with *sure*,
        only calls whose message is not handled to the end yet; without, every edge
        but a cast whose message is being handled already (it waits no more)."""
        stack, seen = [source], set()
        while stack:
            node = stack.pop()
            if node == dest:
                return True
            if node in seen:
                continue
            seen.add(node)
            stack.extend(e.target for e in self.edges if e.caller == node and self.live(e, sure))
        return False

    def live(self, edge: Edge, sure: bool) -> bool:
        if sure:
            return edge.op == "call" and edge.msg_id not in self.finished
        return edge.op == "call" or edge.msg_id not in self.started


WORLD: World | None = None


async def run_program(key: str, message: tuple[int, int]) -> None:
    world = WORLD
    assert world is not None
    depth, msg_id = message
    me = int(key[1:])
    world.started.add(msg_id)
    world.running += 1
    try:
        if depth < MAX_DEPTH:
            for step in world.scenario.program[me]:
                if step.delay:
                    await trio.sleep(step.delay)
                await attempt(world, me, step, depth)
    finally:
        world.running -= 1
        world.finished.add(msg_id)


async def attempt(world: World, me: int, step: Step, depth: int) -> None:
    target = world.refs[step.target]
    msg_id = next(world.ids)
    # No checkpoint between these and the library's own check: the graph is the same.
    possible = step.target == me or world.path(step.target, me, sure=False)
    sure = step.target == me or world.path(step.target, me, sure=True)
    edge = Edge(me, step.target, step.op, msg_id)
    world.edges.append(edge)
    outcome = "ok"
    try:
        with (
            trio.move_on_after(step.timeout) if step.timeout is not None
            else contextlib.nullcontext()
        ) as scope:
            if step.op == "call":
                await target.call((depth + 1, msg_id))
            else:
                await target.cast((depth + 1, msg_id))
        if scope is not None and scope.cancelled_caught:
            outcome = "cancelled"
    except CallCycleError:
        outcome = "cycle"
    except TrioPGSError as exc:
        outcome = type(exc).__name__
    finally:
        world.edges.remove(edge)
    world.attempts.append(Attempt(me, step, depth, outcome, possible, sure))


class Node(PersistentServer[int]):
    kind = "cycle-model-node"

    async def init(self) -> int:
        return 0

    async def handle_call(self, request: Any, state: int) -> Any:
        await run_program(self.ref.key, request)
        return Reply(None, state)

    async def handle_cast(self, message: Any, state: int) -> Any:
        await run_program(self.ref.key, message)
        return NoReply(state)


DELAYS = st.sampled_from([0.0, 0.0, 0.25, 1.0])
TIMEOUTS = st.sampled_from([None, None, 0.5, 2.0])
#: Small mailboxes (a cast may block) and short idle timeouts (servers hibernate while
#: others still hold them in a call chain) are drawn as well as roomy ones.
MAILBOX_SIZES = [1024, 1024, 1, 2]
IDLE_TIMEOUTS = [300.0, 300.0, 0.1, 0.75]


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    n = draw(st.integers(2, 6))
    step = st.builds(
        Step, DELAYS, st.sampled_from(["call", "call", "cast"]), st.integers(0, n - 1),
        TIMEOUTS,
    )
    program = draw(st.lists(st.lists(step, max_size=3).map(tuple), min_size=n, max_size=n))
    tops = draw(st.lists(
        st.builds(Top, st.sampled_from([0.0, 0.0, 0.5, 1.0]),
                  st.sampled_from(["call", "call", "cast"]), st.integers(0, n - 1)),
        min_size=1, max_size=3,
    ))
    return Scenario(
        tuple(program), tuple(tops),
        mailbox_size=draw(st.sampled_from(MAILBOX_SIZES)),
        idle_timeout=draw(st.sampled_from(IDLE_TIMEOUTS)),
    )


async def drive(world: World) -> tuple[bool, list[Any]]:
    """Run the scenario; whether it finished within its bound, and the top-level
    results."""
    scenario = world.scenario
    results: list[Any] = []

    async def top(t: Top) -> None:
        await trio.sleep(t.delay)
        message = (0, next(world.ids))
        try:
            if t.op == "call":
                results.append(await world.refs[t.target].call(message))
            else:
                results.append(await world.refs[t.target].cast(message))
        except TrioPGSError as exc:
            results.append(exc)

    async with PersistentSupervisor(
        store=MemoryStore(), servers=[Node], mailbox_size=scenario.mailbox_size,
        idle_timeout=scenario.idle_timeout,
    ) as sup:
        world.refs = [await sup.start(Node, key=f"s{i}") for i in range(scenario.n)]
        with trio.move_on_after(scenario.bound()) as scope:
            async with trio.open_nursery() as nursery:
                for t in scenario.tops:
                    nursery.start_soon(top, t)
            await wait_all_idle(sup)
        finished = not scope.cancelled_caught
    return finished, results  # leaving the supervisor cancels whatever hangs


def run_scenario(scenario: Scenario) -> World:
    global WORLD
    world = WORLD = World(scenario)
    try:
        finished, results = trio.run(
            drive, world, clock=trio.testing.MockClock(autojump_threshold=0)
        )
    finally:
        WORLD = None
    assert finished, f"hang: not done within {scenario.bound()} s; attempts {world.attempts}"
    assert results == [None] * len(scenario.tops), results
    assert world.running == 0
    return world


def check(world: World) -> None:
    scenario = world.scenario
    attempts = world.attempts
    unexpected = [a for a in attempts if a.outcome not in ("ok", "cancelled", "cycle")]
    assert not unexpected, unexpected
    cycles = [a for a in attempts if a.outcome == "cycle"]
    if not scenario.static_cycle():
        assert not cycles, f"CallCycleError with an acyclic program: {cycles}"
    false_alarms = [a for a in cycles if not a.possible]
    assert not false_alarms, f"CallCycleError while nothing waited on the caller: {false_alarms}"
    self_calls = [a for a in attempts if a.step.op == "call" and a.step.target == a.me]
    assert all(a.outcome == "cycle" for a in self_calls), f"self-call not refused: {self_calls}"
    missed = [a for a in attempts if a.step.op == "call" and a.sure and a.outcome != "cycle"]
    assert not missed, f"deadlocking call not refused: {missed}"


@settings(
    max_examples=int(os.environ.get("CYCLE_EXAMPLES", "200")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(scenario=scenarios())
def test_random_call_programs_never_hang_and_raise_cycles_only_when_real(
    scenario: Scenario,
) -> None:
    world = run_scenario(scenario)
    for a in world.attempts:  # shown by --hypothesis-show-statistics
        event(" ".join([a.step.op, a.outcome, *(
            label for label, flag in [
                ("self", a.step.target == a.me), ("sure", a.sure), ("possible", a.possible)
            ] if flag
        )]))
    check(world)


def scenario_of(
    program: Sequence[Sequence[Step]], tops: Sequence[Top], *, mailbox_size: int = 1024,
    idle_timeout: float = 300.0,
) -> Scenario:
    return Scenario(
        tuple(tuple(p) for p in program), tuple(tops), mailbox_size, idle_timeout
    )


@pytest.mark.parametrize("timeout", [None, 0.5])
def test_a_self_call_is_refused(timeout: float | None) -> None:
    world = run_scenario(scenario_of(
        [[Step(0.0, "call", 1, None)], [Step(0.25, "call", 1, timeout)]],
        [Top(0.0, "call", 0)],
    ))
    check(world)
    assert [a.outcome for a in world.attempts] == ["cycle", "ok"]


def test_a_call_back_to_a_caller_that_gave_up_is_no_cycle() -> None:
    # s0 calls s1 and gives up after 0.5 s; s1 calls s0 at 1 s, while s0 is idle (and
    # s0, handling that call, calls s1 again: s1 waits on it, a real cycle).
    world = run_scenario(scenario_of(
        [[Step(0.0, "call", 1, 0.5)], [Step(1.0, "call", 0, None)]],
        [Top(0.0, "call", 0)],
    ))
    check(world)
    assert {(a.me, a.depth): a.outcome for a in world.attempts} == {
        (0, 0): "cancelled", (1, 1): "ok", (0, 2): "cycle",
    }


def test_a_cast_back_while_the_caller_waits_is_no_cycle() -> None:
    # s0 calls s1; s1 casts to s0 (a cast waits on nobody, the mailbox has room).
    world = run_scenario(scenario_of(
        [[Step(0.0, "call", 1, None)], [Step(0.0, "cast", 0, None)]],
        [Top(0.0, "call", 0)],
    ))
    check(world)
    assert all(a.outcome == "ok" for a in world.attempts), world.attempts


# -- the bugs, each on its own ------------------------------------------------------------

#: The CallCycleErrors the `Peer` servers caught, as (server key, request).
CAUGHT: list[tuple[str, Any]] = []
PEERS: dict[str, ServerRef] = {}


class Peer(PersistentServer[int]):
    """Does what its message says, recording any `CallCycleError` it gets."""

    kind = "cycle-model-peer"

    async def init(self) -> int:
        return 0

    async def handle_call(self, request: Any, state: int) -> Any:
        await self.act(request)
        return Reply(None, state)

    async def handle_cast(self, message: Any, state: int) -> Any:
        await self.act(message)
        return NoReply(state)

    async def act(self, message: Any) -> None:
        op, peer = message
        try:
            match op:
                case "call, give up after 0.5 s":  # the callee calls back at 1 s
                    with trio.move_on_after(0.5):
                        await PEERS[peer].call(("sleep 1 s, call", self.ref.key))
                case "sleep 1 s, call":
                    await trio.sleep(1)
                    await PEERS[peer].call(("nothing", None))
                case "cast a call back":
                    await PEERS[peer].cast(("call", self.ref.key))
                case "call":
                    await PEERS[peer].call(("nothing", None))
                case "sleep 1 s":
                    await trio.sleep(1)
        except CallCycleError:
            CAUGHT.append((self.ref.key, message))


async def run_peers(scenario: Any, **options: Any) -> list[tuple[str, Any]]:
    CAUGHT.clear()
    async with PersistentSupervisor(store=MemoryStore(), servers=[Peer], **options) as sup:
        PEERS.update(a=await sup.start(Peer, key="a"), b=await sup.start(Peer, key="b"))
        with trio.fail_after(30):
            await scenario()
            await wait_all_idle(sup)
    return list(CAUGHT)


def run_clocked(fn: Any, *args: Any, **options: Any) -> Any:
    return trio.run(
        functools.partial(fn, *args, **options),
        clock=trio.testing.MockClock(autojump_threshold=0),
    )


async def gives_up_then_called_back() -> None:
    await PEERS["a"].call(("call, give up after 0.5 s", "b"))
    await trio.sleep(2)  # b calls a back at 1 s


def test_a_call_back_to_a_caller_that_gave_up_is_no_cycle_while_it_is_active() -> None:
    assert run_clocked(run_peers, gives_up_then_called_back, idle_timeout=300) == []


# Was a bug (fixed): a caller that gave up on its call and then hibernated is still taken to wait.
# a calls b and gives up after 0.5 s; a's handler returns, and a hibernates (idle 0.1 s);
# at 1 s, b (handling a's call) calls a. The guide ("No deadlocks") and decision 54: a
# call its caller gave up on no longer counts, "the server it went to may call that
# caller back". It raised CallCycleError in b: `_deadlock._still_waiting` (now
# `unseen_links`) took a link whose waiter has no entry (`_local_entry` is None:
# dormant here, not on another node) to wait still. The same scenario with a still
# active passes (the test above).
def test_a_call_back_to_a_caller_that_gave_up_and_hibernated_is_no_cycle() -> None:
    assert run_clocked(run_peers, gives_up_then_called_back, idle_timeout=0.1) == []


async def casts_to_a_dormant_server_that_calls_back() -> None:
    await trio.sleep(1)  # b hibernates
    await PEERS["a"].call(("cast a call back", "b"))


# Was a bug (fixed): a cast that waited for a dormant server's activation still counted as
# a wait after it. a's handler casts to dormant b; b activates and, handling that cast, calls a.
# The guide: "A cast or a send waits on nobody: the server that handles it is in no call
# chain of its sender's, and may call the sender"; decision 6: a wait's edge is "dropped
# as soon as the wait is over, before the waiter resumes". It raises CallCycleError in b:
# the edge a -> b that `_wait_activated` added stays until a's task resumes, and b runs
# first.
def test_a_server_activated_by_a_cast_may_call_the_sender() -> None:
    assert run_clocked(
        run_peers, casts_to_a_dormant_server_that_calls_back, idle_timeout=0.1
    ) == []


async def casts_to_a_full_mailbox_that_calls_back() -> None:
    await PEERS["b"].cast(("sleep 1 s", None))  # b handles it until 1 s
    await trio.sleep(0)
    await PEERS["b"].cast(("call", "a"))  # queued: b's mailbox (1) is full
    await PEERS["a"].call(("cast a call back", "b"))  # a's cast waits for room


# Was a bug (fixed): a cast that waited for room in a full mailbox still counts as a wait once the
# room is made. mailbox_size=1: b is busy until 1 s with one message queued; a's handler
# casts to b and waits for room. At 1 s b takes the queued message (a's cast joins the
# mailbox: a's wait is over) and calls a; then it handles a's cast, which calls a too.
# Per the guide (a cast waits on nobody once queued; the handler of a's cast may call a)
# and decision 6 (edges dropped when the wait is over, before the waiter resumes), neither
# is a cycle: a's handler only has to return. Both raise CallCycleError in b: the edge
# a -> b of `_send_blocked` stays until a's task resumes, and b runs first.
def test_a_server_taking_a_blocked_cast_may_call_the_sender() -> None:
    assert run_clocked(run_peers, casts_to_a_full_mailbox_that_calls_back, mailbox_size=1) == []
