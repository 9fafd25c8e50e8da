"""A workload for the hard-kill durability test (tests/test_durability.py).

Run as ``python tests/durability_worker.py BACKEND TARGET RUN_ID``. It opens a supervisor
on a store (BACKEND ``diskcache``: a `DiskCacheStore` in the directory TARGET;
``postgres``: a `PostgresStore` in the schema TARGET of the database whose DSN is in the
environment variable TRIO_PGS_DURABILITY_DSN, kept out of the command line for its
password), starts (or reuses) the ledger servers, and runs clients until it is killed.
Its stdout is the record the test checks, one line per event, each written with one
``os.write`` (unbuffered, so nothing acknowledged waits in a buffer):

- ``A <op>``: the call ``("apply", op)`` returned "applied", i.e. the op was committed
  (`Persistence.EACH_MESSAGE`): a durable acknowledgement.
- ``C <op>``: the cast ``("apply", op)`` was accepted. Not durable: a cast is
  acknowledged when it is queued, not when it is committed.

Beside them, the tickers: servers with a periodic reminder (every TICK_EVERY s), each
delivery counted in the state with the ticks it folds (``count += 1 + missed``), so
that a stored ticker's count is exactly the ticks from its first due time to its
reminder's next one: none lost, none counted twice, whatever the kills did.

Op ids are ``<RUN_ID>-<client>-<n>``; each client sends n = 0, 1, 2, ... and sends n+1
only after it wrote the line for n. Anything unexpected (a fresh op refused as a
duplicate, an acknowledged op applied again, an error) ends the worker with a message on
stderr and a non-zero status, which the test reports.
"""

from __future__ import annotations

import os
import random
import sys
from typing import Any

import attrs
import trio

import trio_pgs
from trio_pgs import NoReply, PersistentServer, PersistentSupervisor, Reminder, Reply

HOT = [f"hot-{i}" for i in range(10)]
NAPPING = [f"nap-{i}" for i in range(10)]
#: Clients calling the hot servers back to back, clients calling the napping servers
#: with pauses (so that they hibernate and wake), and clients casting to one server each.
HOT_CALLERS = 24
NAP_CALLERS = 8
CASTERS = 4
#: How often a caller re-sends its last acknowledged op (it must come back "duplicate").
RESEND_EVERY = 8
#: A worker nobody kills (a test that died) stops by itself.
DEADLINE = 120.0
BACKENDS = ("diskcache", "postgres")
DSN_VARIABLE = "TRIO_PGS_DURABILITY_DSN"


@attrs.define
class Ledger:
    """The ids of the ops this server applied, in the order it applied them."""

    applied: list[str] = attrs.Factory(list)


class LedgerServer(PersistentServer[Ledger]):
    """Applies each op id once; refuses it as "duplicate" after that."""

    kind = "durability.ledger"
    idle_timeout = None
    restart = trio_pgs.Restart.PERMANENT  # recovered eagerly at every startup

    async def init(self) -> Ledger:
        return Ledger()

    def _apply(self, op: str, state: Ledger) -> tuple[str, Ledger]:
        if op in state.applied:
            return "duplicate", state
        return "applied", Ledger([*state.applied, op])

    async def handle_call(self, request: Any, state: Ledger) -> Any:
        match request:
            case ("apply", str(op)):
                reply, state = self._apply(op, state)
                return Reply(reply, state)
            case "get":
                return Reply(list(state.applied), state, persist=False)
        return await super().handle_call(request, state)

    async def handle_cast(self, message: Any, state: Ledger) -> Any:
        match message:
            case ("apply", str(op)):
                return NoReply(self._apply(op, state)[1])
        return await super().handle_cast(message, state)


class NappingLedgerServer(LedgerServer):
    """The same ledger, hibernating after 50 ms without a message."""

    kind = "durability.napping"
    idle_timeout = 0.05
    restart = trio_pgs.Restart.TRANSIENT


SERVERS = [LedgerServer, NappingLedgerServer]

TICKERS = [f"tick-{i}" for i in range(6)]
TICK_EVERY = 0.03


@attrs.define
class Ticks:
    count: int = 0
    #: The due time of the first tick delivered (0.0: none yet).
    first_due: float = 0.0


class TickerServer(PersistentServer[Ticks]):
    """Counts the ticks of its periodic reminder; dormant between some of them."""

    kind = "durability.ticker"
    idle_timeout = 0.05

    async def init(self) -> Ticks:
        self.remind("tick", every=TICK_EVERY)
        return Ticks()

    async def handle_info(self, message: Any, state: Ticks) -> Any:
        if isinstance(message, Reminder):
            first = state.first_due or message.due
            return NoReply(Ticks(state.count + 1 + message.missed, first))
        return await super().handle_info(message, state)


def make_store(backend: str, target: str) -> trio_pgs.Store:
    """The store of BACKEND at TARGET (see the module)."""
    if backend == "diskcache":
        return trio_pgs.DiskCacheStore(target)
    if backend == "postgres":
        return trio_pgs.PostgresStore(os.environ[DSN_VARIABLE], schema=target)
    raise ValueError(f"unknown backend {backend!r}; one of {BACKENDS}")


def emit(line: str) -> None:
    os.write(1, (line + "\n").encode())


def fail(message: str) -> None:
    print(f"durability worker: {message}", file=sys.stderr, flush=True)
    os._exit(3)


async def start_or_reuse(
    sup: PersistentSupervisor,
    cls: type[PersistentServer[Any]],
    key: str,
    refs: dict[str, trio_pgs.ServerRef],
) -> None:
    """Start *key*, or take the ref of the one an earlier run started."""
    try:
        refs[key] = await sup.start(cls, key=key)
    except trio_pgs.AlreadyStarted as exc:
        refs[key] = exc.ref


async def caller(
    refs: list[trio_pgs.ServerRef], name: str, pause: float, rng: random.Random
) -> None:
    n = 0
    while True:
        ref = rng.choice(refs)
        op = f"{name}-{n}"
        reply = await ref.call(("apply", op))
        if reply != "applied":
            fail(f"{ref}: the new op {op} was answered {reply!r}")
        emit(f"A {op}")
        n += 1
        if n % RESEND_EVERY == 0:
            reply = await ref.call(("apply", op))
            if reply != "duplicate":
                fail(f"{ref}: the acknowledged op {op}, sent again, was answered {reply!r}")
        if pause:
            await trio.sleep(rng.uniform(0, pause))


async def caster(ref: trio_pgs.ServerRef, name: str, rng: random.Random) -> None:
    n = 0
    while True:
        await ref.cast(("apply", f"{name}-{n}"))
        emit(f"C {name}-{n}")
        n += 1
        await trio.sleep(rng.uniform(0, 0.01))


async def main(backend: str, target: str, run_id: str) -> None:
    rng = random.Random()
    store = make_store(backend, target)
    with trio.move_on_after(DEADLINE):
        async with PersistentSupervisor(store=store, servers=[*SERVERS, TickerServer]) as sup:
            refs: dict[str, trio_pgs.ServerRef] = {}
            async with trio.open_nursery() as nursery:
                for key in TICKERS:
                    nursery.start_soon(start_or_reuse, sup, TickerServer, key, refs)
                for key in HOT:
                    nursery.start_soon(start_or_reuse, sup, LedgerServer, key, refs)
                for key in NAPPING:
                    nursery.start_soon(start_or_reuse, sup, NappingLedgerServer, key, refs)
            hot = [refs[key] for key in HOT]
            napping = [refs[key] for key in NAPPING]
            async with trio.open_nursery() as nursery:
                for i in range(HOT_CALLERS):
                    nursery.start_soon(caller, hot, f"{run_id}-h{i}", 0.0, rng)
                for i in range(NAP_CALLERS):
                    nursery.start_soon(caller, napping, f"{run_id}-n{i}", 0.15, rng)
                for i in range(CASTERS):
                    target = (hot + napping)[i * 5]
                    nursery.start_soon(caster, target, f"{run_id}-k{i}", rng)
    fail(f"not killed within {DEADLINE} s")


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] not in BACKENDS:
        sys.exit("usage: durability_worker.py diskcache|postgres STORE_DIR|SCHEMA RUN_ID")
    trio.run(main, *sys.argv[1:])
