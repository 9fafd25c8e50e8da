"""trio-pgs benchmarks, each figure beside its baselines measured in the same run.

    python benchmarks/run.py [--rounds 3] [--seconds 2] [--quick] [--markdown PATH]

Every figure is the median of ``--rounds`` rounds. Compare ratios, not absolute
numbers: machines (and their neighbours) differ.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import cattrs
import diskcache
import trio

import trio_pgs
from trio_pgs import PersistentServer, PersistentSupervisor, Reply


class Counter(PersistentServer[int]):
    idle_timeout = None

    async def handle_call(self, request: Any, state: int) -> Reply[int]:
        if request == "incr":
            return Reply(state + 1, state + 1)
        return Reply(state, state, persist=False)  # "peek": not persisted


async def drive(callers: int, seconds: float, call: Callable[[int], Awaitable[Any]]) -> float:
    """Run *callers* tasks calling ``call(i)`` in a loop for *seconds*; return calls/s."""
    done = 0

    async def caller(i: int) -> None:
        nonlocal done
        while True:
            await call(i)
            done += 1

    start = trio.current_time()
    with trio.move_on_after(seconds):
        async with trio.open_nursery() as nursery:
            for i in range(callers):
                nursery.start_soon(caller, i)
    return done / (trio.current_time() - start)


# -- trio-pgs -----------------------------------------------------------------------------


async def pgs_calls(servers: int, callers_per_server: int, seconds: float, request: str,
                    directory: str | None) -> float:
    store: trio_pgs.Store
    store = trio_pgs.DiskCacheStore(directory) if directory else trio_pgs.MemoryStore()
    async with PersistentSupervisor(store=store) as sup:
        refs = [await sup.start(Counter, 0, key=str(i)) for i in range(servers)]
        return await drive(servers * callers_per_server, seconds,
                           lambda i: refs[i % servers].call(request))


# -- baselines -----------------------------------------------------------------------------


def open_cache(directory: str) -> diskcache.Cache:
    return diskcache.Cache(directory, eviction_policy="none")


async def raw_round_trip(callers: int, seconds: float) -> float:
    """One trio task serving requests from a memory channel; reply by Event + slot."""
    send, receive = trio.open_memory_channel[Any](1024)

    async def server() -> None:
        state = 0
        async for request in receive:
            request[1] = state
            request[0].set()

    async def call(_: int) -> Any:
        request = [trio.Event(), None]
        await send.send(request)
        await request[0].wait()
        return request[1]

    async with trio.open_nursery() as nursery:
        nursery.start_soon(server)
        result = await drive(callers, seconds, call)
        nursery.cancel_scope.cancel()
    return result


async def to_thread_per_call(servers: int, seconds: float, directory: str) -> float:
    """What a user writes by hand: one task per server, a thread hop per write."""
    cache = open_cache(directory)
    converter = cattrs.Converter()
    channels = [trio.open_memory_channel[Any](1024) for _ in range(servers)]

    async def server(key: str, receive: trio.MemoryReceiveChannel[Any]) -> None:
        state = 0
        async for event_and_slot in receive:
            state += 1
            value = str(converter.unstructure(state)).encode()
            await trio.to_thread.run_sync(cache.set, key, value)
            event_and_slot[1] = state
            event_and_slot[0].set()

    async def call(i: int) -> Any:
        request = [trio.Event(), None]
        await channels[i % servers][0].send(request)
        await request[0].wait()
        return request[1]

    try:
        async with trio.open_nursery() as nursery:
            for i, (_, receive) in enumerate(channels):
                nursery.start_soon(server, str(i), receive)
            result = await drive(servers, seconds, call)
            nursery.cancel_scope.cancel()
    finally:
        cache.close()
    return result


async def group_commit_loop(servers: int, seconds: float, directory: str) -> float:
    """The store's own limit: callers queue writes, one thread commits each batch in
    one transaction and releases its callers."""
    cache: diskcache.Cache | None = None
    ready = threading.Event()
    pending: list[tuple[str, bytes]] = []
    waiters: list[trio.Event] = []
    wakeup = trio.Event()
    limiter = trio.CapacityLimiter(1)

    def open_on_thread() -> None:
        nonlocal cache
        cache = open_cache(directory)
        ready.set()

    def commit(batch: list[tuple[str, bytes]]) -> None:
        assert cache is not None
        with cache.transact():
            for key, value in batch:
                cache.set(key, value)

    async def writer() -> None:
        nonlocal pending, waiters, wakeup
        while True:
            await wakeup.wait()
            wakeup = trio.Event()
            batch, pending = pending, []
            released, waiters = waiters, []
            await trio.to_thread.run_sync(commit, batch, limiter=limiter)
            for event in released:
                event.set()

    states = [0] * servers

    async def call(i: int) -> int:
        key = i % servers
        states[key] += 1
        done = trio.Event()
        pending.append((str(key), str(states[key]).encode()))
        waiters.append(done)
        wakeup.set()
        await done.wait()
        return states[key]

    await trio.to_thread.run_sync(open_on_thread, limiter=limiter)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer)
            result = await drive(servers, seconds, call)
            nursery.cancel_scope.cancel()
    finally:
        assert cache is not None
        await trio.to_thread.run_sync(cache.close, limiter=limiter)
    return result


# -- the table ----------------------------------------------------------------------------


def median(rounds: int, fn: Callable[[str], Awaitable[float]]) -> float:
    figures = []
    for _ in range(rounds):
        with tempfile.TemporaryDirectory() as directory:
            figures.append(trio.run(fn, directory))
    return statistics.median(figures)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--quick", action="store_true", help="1 round of 1 s, fewer rows")
    parser.add_argument("--markdown", help="also write the table as Markdown to this file")
    args = parser.parse_args()
    rounds, seconds = (1, 1.0) if args.quick else (args.rounds, args.seconds)
    print(f"python {platform.python_version()}, trio {trio.__version__}, "
          f"diskcache {diskcache.__version__}, {rounds} round(s) of {seconds} s")
    print("command: python " + " ".join(sys.argv))

    rows: list[tuple[str, float, str, float]] = []

    def compare(name: str, ours: Callable[[str], Awaitable[float]],
                baselines: list[tuple[str, Callable[[str], Awaitable[float]]]]) -> None:
        mine = median(rounds, ours)
        for label, baseline in baselines:
            rows.append((name, mine, label, median(rounds, baseline)))
            print(f"  {name}: {mine:,.0f}/s vs {label}: {rows[-1][3]:,.0f}/s")

    compare(
        "un-persisted call, 1 server x 1 caller",
        lambda d: pgs_calls(1, 1, seconds, "peek", None),
        [("raw trio round trip", lambda d: raw_round_trip(1, seconds))],
    )
    if not args.quick:
        compare(
            "un-persisted call, 1 server x 100 callers",
            lambda d: pgs_calls(1, 100, seconds, "peek", None),
            [("raw trio round trip", lambda d: raw_round_trip(100, seconds))],
        )
    sizes = [100] if args.quick else [1, 100, 1000]
    for servers in sizes:
        compare(
            f"persisted calls, {servers} server(s), diskcache",
            lambda d, n=servers: pgs_calls(n, 1, seconds, "incr", d),  # type: ignore[misc]
            [
                ("to_thread(cache.set) per call",
                 lambda d, n=servers: to_thread_per_call(n, seconds, d)),  # type: ignore[misc]
                ("hand-written group commit",
                 lambda d, n=servers: group_commit_loop(n, seconds, d)),  # type: ignore[misc]
            ],
        )

    header = ("scenario", "trio-pgs /s", "baseline", "baseline /s", "ratio")
    lines = [(name, f"{mine:,.0f}", label, f"{base:,.0f}", f"{mine / base:.2f}")
             for name, mine, label, base in rows]
    widths = [max(len(str(row[i])) for row in [header, *lines]) for i in range(5)]
    print()
    for row in [header, *lines]:
        cells = zip(row, widths, strict=True)
        print("  ".join(str(cell).ljust(width) for cell, width in cells))
    if args.markdown:
        with open(args.markdown, "w") as out:
            out.write("| " + " | ".join(header) + " |\n")
            out.write("|" + "---|" * len(header) + "\n")
            for row in lines:
                out.write("| " + " | ".join(row) + " |\n")


if __name__ == "__main__":
    main()
