"""A workload for the Ctrl-C test (tests/test_interrupt.py).

Run as ``python tests/interrupt_worker.py STORE_DIR``: WRITE_BEHIND counters (whose
acknowledged states are written only at shutdown here: ``max_lag`` is long) under
calls in a loop. Each acknowledged call prints ``<key> <value>`` on stdout with one
``os.write``. The test sends SIGINT: the supervisor must commit every acknowledged
state within its shutdown deadline, and nothing but KeyboardInterrupt may come out
(the clients' own nursery wraps it in an exception group, as trio does; the worker
prints ``interrupted`` and exits with status 130 when that is all there is).
"""

from __future__ import annotations

import os
import sys

import trio

import trio_pgs
from trio_pgs import PersistentServer, PersistentSupervisor, Reply

KEYS = [f"c{i}" for i in range(8)]


class Counter(PersistentServer[int]):
    kind = "interrupt.counter"
    persistence = trio_pgs.Persistence.WRITE_BEHIND
    max_lag = 3600.0  # nothing is written before the shutdown
    idle_timeout = None

    async def init(self) -> int:
        return 0

    async def handle_call(self, request: object, state: int) -> Reply[int]:
        await trio.lowlevel.checkpoint()
        sum(range(20_000))  # busy: a signal often lands while a handler runs
        return Reply(state + 1, state + 1)


async def client(ref: trio_pgs.ServerRef) -> None:
    while True:
        value = await ref.call("add")
        os.write(1, f"{ref.key} {value}\n".encode())


async def main(directory: str) -> None:
    async with PersistentSupervisor(
        store=trio_pgs.DiskCacheStore(directory), servers=[Counter], shutdown_timeout=2
    ) as sup:
        refs = []
        for key in KEYS:
            try:
                refs.append(await sup.start(Counter, key=key))
            except trio_pgs.AlreadyStarted as exc:
                refs.append(exc.ref)
        os.write(1, b"ready\n")
        async with trio.open_nursery() as nursery:
            for ref in refs:
                nursery.start_soon(client, ref)


def leaves(error: BaseException) -> list[BaseException]:
    inner = getattr(error, "exceptions", None)  # an exception group, on every Python
    if inner is None:
        return [error]
    return [leaf for one in inner for leaf in leaves(one)]


if __name__ == "__main__":
    try:
        trio.run(main, sys.argv[1])
    except BaseException as error:
        if not all(isinstance(leaf, KeyboardInterrupt) for leaf in leaves(error)):
            raise
        os.write(2, b"interrupted\n")
        sys.exit(130)
