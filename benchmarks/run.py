"""trio-pgs benchmarks: every trio-pgs figure next to its baselines, measured in the same run.

    python benchmarks/run.py [--rounds 3] [--seconds 2] [--quick] [--markdown PATH]

Scenarios:

1. Persisted calls with 100 servers, one caller each, calling ``"incr"`` in a loop,
   on a fresh `DiskCacheStore`. Baselines on a plain ``diskcache.Cache`` (eviction
   off): (a) a hand-written trio server per key, ``to_thread.run_sync(cache.set)``
   per call; (b) a hand-written group-commit loop, one transaction per batch on one
   dedicated thread (the store's own limit: no encoding, no version check).
2. The same with 1 server and with 1,000 servers.
3. An un-persisted call (``persist=False``), 1 server x 1 caller, against a raw trio
   round trip (a memory channel carrying a request with an Event and a result slot).

Every figure is the median of ``--rounds`` rounds, each on a fresh temporary
directory; the callers run for a short warm-up, then for the measured window. After
each round the stored values are read back and must add up to the number of calls
made. Compare ratios, not absolute figures: machines (and their neighbours) differ.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import queue
import shlex
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import diskcache
import outcome
import trio

import trio_pgs
from trio_pgs import PersistentServer, PersistentSupervisor, Reply

T = TypeVar("T")
#: The share of a round's duration spent warming up before the measured window.
WARMUP = 0.1


# -- measuring ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Figure:
    """One measurement: calls per second, and records per transaction if it batches."""

    rate: float
    batch: float | None = None


def measure(fn: Callable[[str], Awaitable[Figure]], rounds: int) -> Figure:
    """Run ``fn(directory)`` *rounds* times, each in a fresh trio run on a fresh
    temporary directory; return the median of each field."""
    figures = []
    for _ in range(rounds):
        with tempfile.TemporaryDirectory(prefix="trio-pgs-bench-") as directory:
            figures.append(trio.run(fn, directory))
    batches = [f.batch for f in figures if f.batch is not None]
    return Figure(
        statistics.median(f.rate for f in figures),
        statistics.median(batches) if batches else None,
    )


@dataclass
class Drive:
    """What `drive` measured: calls per second, and the calls completed in all."""

    rate: float
    total: int


async def drive(callers: int, seconds: float, call: Callable[[int], Awaitable[Any]]) -> Drive:
    """Run *callers* tasks, caller ``i`` awaiting ``call(i)`` in a loop: a warm-up,
    then a window of *seconds*. Callers stop issuing calls at the end of the window
    and finish the one in flight (nothing is cancelled), so every call issued
    completes.

    The rate is the sum of the callers' own rates, each measured from its first to
    its last completion inside the window: with group commit many calls complete at
    the same instant, and counting completions in a fixed window would be off by up
    to one whole batch.
    """
    total = 0
    rates: list[float] = []
    clock = trio.current_time
    start = clock() + WARMUP * seconds
    end = start + seconds

    async def caller(i: int) -> None:
        nonlocal total
        first = last = 0.0
        calls = -1  # the first completion in the window starts the caller's clock
        while clock() < end:
            await call(i)
            total += 1
            now = clock()
            if start <= now <= end:
                if calls < 0:
                    first = now
                calls += 1
                last = now
        rates.append(calls / (last - first) if calls > 0 else 0.0)

    async with trio.open_nursery() as nursery:
        for i in range(callers):
            nursery.start_soon(caller, i)
    return Drive(sum(rates), total)


def check_sum(what: str, stored: Iterable[int], calls: int) -> None:
    """Every completed call incremented one counter: the stored counters say so."""
    found = sum(stored)
    if found != calls:
        raise AssertionError(f"{what}: the stored counters add up to {found}, "
                             f"but {calls} calls completed")


# -- trio-pgs -------------------------------------------------------------------------------


class Counter(PersistentServer[int]):
    """The server every scenario uses; the default options (idle timeout included)."""

    async def handle_call(self, request: Any, state: int) -> Reply[int]:
        if request == "incr":
            return Reply(state + 1, state + 1)
        return Reply(state, state, persist=False)  # "peek"


async def start_counters(sup: PersistentSupervisor, servers: int) -> list[trio_pgs.ServerRef]:
    """Start *servers* counters concurrently (their first commits are batched)."""
    refs: list[trio_pgs.ServerRef] = [None] * servers  # type: ignore[list-item]

    async def start(i: int) -> None:
        refs[i] = await sup.start(Counter, 0, key=f"c{i}")

    async with trio.open_nursery() as nursery:
        for i in range(servers):
            nursery.start_soon(start, i)
    return refs


async def peek_all(refs: list[trio_pgs.ServerRef]) -> list[int]:
    values = [0] * len(refs)

    async def peek(i: int) -> None:
        values[i] = await refs[i].call("peek")

    async with trio.open_nursery() as nursery:
        for i in range(len(refs)):
            nursery.start_soon(peek, i)
    return values


async def pgs_persisted(directory: str, servers: int, seconds: float) -> Figure:
    """trio-pgs: *servers* counters, one caller each, ``call("incr")`` in a loop."""
    async with PersistentSupervisor(store=trio_pgs.DiskCacheStore(directory)) as sup:
        refs = await start_counters(sup, servers)
        before = sup.statistics()
        result = await drive(servers, seconds, lambda i: refs[i].call("incr"))
        after = sup.statistics()
    # Read back from the store, through a new supervisor (activations load records).
    async with PersistentSupervisor(store=trio_pgs.DiskCacheStore(directory)) as sup:
        refs = [sup.ref(Counter, f"c{i}") for i in range(servers)]
        check_sum("trio-pgs", await peek_all(refs), result.total)
    commits = after.commits - before.commits
    records = after.records_written - before.records_written
    return Figure(result.rate, records / commits if commits else None)


async def pgs_unpersisted(directory: str, seconds: float) -> Figure:
    """trio-pgs: 1 counter, 1 caller, ``call("peek")`` (``persist=False``) in a loop."""
    async with PersistentSupervisor(store=trio_pgs.DiskCacheStore(directory)) as sup:
        (ref,) = await start_counters(sup, 1)
        result = await drive(1, seconds, lambda _: ref.call("peek"))
    return Figure(result.rate)


# -- baselines: what one writes by hand -------------------------------------------------------


def open_cache(directory: str) -> diskcache.Cache:
    return diskcache.Cache(directory, eviction_policy="none")


class Request:
    """A request on a memory channel: the server sets the result, then the event."""

    __slots__ = ("done", "payload", "result")

    def __init__(self, payload: Any) -> None:
        self.payload = payload
        self.done = trio.Event()
        self.result: Any = None


async def call_by_hand(send: trio.MemorySendChannel[Request], payload: Any) -> Any:
    request = Request(payload)
    await send.send(request)
    await request.done.wait()
    return request.result


async def per_call_to_thread(directory: str, servers: int, seconds: float) -> Figure:
    """Baseline (a): a task per server, receiving requests on a memory channel, and
    ``await trio.to_thread.run_sync(cache.set, key, value)`` for every call."""
    cache = open_cache(directory)

    async def server(key: str, receive: trio.MemoryReceiveChannel[Request]) -> None:
        state = 0
        async for request in receive:
            state += 1
            await trio.to_thread.run_sync(cache.set, key, state)
            request.result = state
            request.done.set()

    channels = [trio.open_memory_channel[Request](1024) for _ in range(servers)]
    try:
        async with trio.open_nursery() as nursery:
            for i, (_, receive) in enumerate(channels):
                nursery.start_soon(server, f"c{i}", receive)
            result = await drive(servers, seconds,
                                 lambda i: call_by_hand(channels[i][0], "incr"))
            nursery.cancel_scope.cancel()
        check_sum("to_thread per call", (cache[f"c{i}"] for i in range(servers)),
                  result.total)
    finally:
        cache.close()
    return Figure(result.rate)


class StoreThread:
    """One long-lived thread running jobs in order (SQLite wants one thread)."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._work, daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            job()

    async def run(self, fn: Callable[[], T]) -> T:
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()
        box: list[outcome.Outcome[T]] = []

        def job() -> None:
            box.append(outcome.capture(fn))
            token.run_sync_soon(done.set)

        self._jobs.put(job)
        with trio.CancelScope(shield=True):  # a write must not be abandoned mid-way
            await done.wait()
        return box[0].unwrap()

    async def stop(self) -> None:
        self._jobs.put(None)
        await trio.to_thread.run_sync(self._thread.join)


async def group_commit_by_hand(directory: str, servers: int, seconds: float) -> Figure:
    """Baseline (b): callers append their write to a pending batch and wait for it;
    one writer commits each batch as one diskcache transaction on a dedicated thread,
    then releases that batch's callers. No server tasks, encoding or version checks:
    the limit of the store itself."""
    thread = StoreThread()
    cache = await thread.run(lambda: open_cache(directory))
    states = [0] * servers
    pending: list[tuple[str, int]] = []
    pending_done = trio.Event()
    wakeup = trio.Event()
    commits = records = 0

    def commit(batch: list[tuple[str, int]]) -> None:
        with cache.transact():
            for key, value in batch:
                cache.set(key, value)

    async def writer() -> None:
        nonlocal pending, pending_done, wakeup, commits, records
        while True:
            await wakeup.wait()
            wakeup = trio.Event()
            batch, done = pending, pending_done
            pending, pending_done = [], trio.Event()
            await thread.run(functools.partial(commit, batch))
            commits += 1
            records += len(batch)
            done.set()

    async def call(i: int) -> int:
        states[i] += 1
        pending.append((f"c{i}", states[i]))
        done = pending_done
        wakeup.set()
        await done.wait()
        return states[i]

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer)
            result = await drive(servers, seconds, call)
            nursery.cancel_scope.cancel()
        stored = await thread.run(lambda: [cache[f"c{i}"] for i in range(servers)])
        check_sum("group commit by hand", stored, result.total)
    finally:
        await thread.run(cache.close)
        await thread.stop()
    return Figure(result.rate, records / commits if commits else None)


async def raw_round_trip(directory: str, seconds: float) -> Figure:
    """Baseline: one trio task serving a memory channel; each request carries an
    Event and a result slot."""
    send, receive = trio.open_memory_channel[Request](1024)

    async def server() -> None:
        state = 0
        async for request in receive:
            request.result = state
            request.done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(server)
        result = await drive(1, seconds, lambda _: call_by_hand(send, "peek"))
        nursery.cancel_scope.cancel()
    return Figure(result.rate)


# -- scenarios ------------------------------------------------------------------------------


@dataclass
class Row:
    scenario: str
    ours: Figure
    baseline: str
    theirs: Figure

    def cells(self) -> tuple[str, str, str, str]:
        return (self.scenario, rate_cell(self.ours), f"{self.baseline}: {rate_cell(self.theirs)}",
                f"{self.ours.rate / self.theirs.rate:.2f}")


def rate_cell(figure: Figure) -> str:
    text = f"{figure.rate:,.0f} calls/s"
    return text if figure.batch is None else f"{text}, batch {figure.batch:.1f}"


def persisted(servers: int, seconds: float, rounds: int) -> list[Row]:
    name = f"persisted, {servers:,} server{'s' if servers > 1 else ''} x 1 caller"
    ours = measure(lambda d: pgs_persisted(d, servers, seconds), rounds)
    report(name, "trio-pgs", ours)
    rows = []
    for label, fn in [
        ("(a) to_thread(cache.set) per call", per_call_to_thread),
        ("(b) group commit by hand", group_commit_by_hand),
    ]:
        theirs = measure(lambda d, fn=fn: fn(d, servers, seconds), rounds)  # type: ignore[misc]
        report(name, label, theirs)
        rows.append(Row(name, ours, label, theirs))
    return rows


def unpersisted(seconds: float, rounds: int) -> list[Row]:
    name = "un-persisted call, 1 server x 1 caller"
    ours = measure(lambda d: pgs_unpersisted(d, seconds), rounds)
    report(name, "trio-pgs", ours)
    theirs = measure(lambda d: raw_round_trip(d, seconds), rounds)
    report(name, "raw trio round trip", theirs)
    return [Row(name, ours, "raw trio round trip", theirs)]


def report(scenario: str, who: str, figure: Figure) -> None:
    print(f"  {scenario} | {who}: {rate_cell(figure)}", flush=True)


# -- the table ------------------------------------------------------------------------------

HEADER = ("scenario", "trio-pgs", "baseline", "ratio")


def text_table(rows: list[Row]) -> str:
    lines = [HEADER, *(row.cells() for row in rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(HEADER))]
    out = []
    for n, line in enumerate(lines):
        cells = [cell.rjust(w) if i == 3 else cell.ljust(w)
                 for i, (cell, w) in enumerate(zip(line, widths, strict=True))]
        out.append(" | ".join(cells).rstrip())
        if n == 0:
            out.append("-+-".join("-" * w for w in widths))
    return "\n".join(out)


def markdown_table(rows: list[Row], preamble: list[str]) -> str:
    out = [*preamble, "", "| " + " | ".join(HEADER) + " |", "|---|--:|---|--:|"]
    out += ["| " + " | ".join(row.cells()) + " |" for row in rows]
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description="trio-pgs benchmarks, each figure beside baselines of the same run")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per figure (median)")
    parser.add_argument("--seconds", type=float, default=2.0,
                        help="measured seconds per round of the 100-server scenario "
                             "(the other scenarios run half as long)")
    parser.add_argument("--quick", action="store_true",
                        help="only the 100-server scenario, 1 round of 1 s")
    parser.add_argument("--markdown", metavar="PATH",
                        help="also write the table as Markdown to PATH")
    args = parser.parse_args()
    if args.rounds < 1 or args.seconds <= 0:
        parser.error("--rounds must be >= 1 and --seconds > 0")
    rounds, seconds = (1, 1.0) if args.quick else (args.rounds, args.seconds)

    preamble = [
        f"Python {platform.python_version()} ({platform.python_implementation()}), "
        f"trio {trio.__version__}, diskcache {diskcache.__version__}, "
        f"trio-pgs {trio_pgs.__version__}; {platform.system()} {platform.machine()}, "
        f"{os.cpu_count()} CPUs",
        f"command: {shlex.join(['python', *sys.argv])}",
        f"median of {rounds} round(s); {seconds:g} s measured per round"
        + ("" if args.quick else f" (100 servers; the other scenarios {seconds / 2:g} s)"),
    ]
    print("\n".join(preamble), flush=True)
    began = time.perf_counter()
    rows = persisted(100, seconds, rounds)
    if not args.quick:
        rows += persisted(1, seconds / 2, rounds)
        rows += persisted(1000, seconds / 2, rounds)
        rows += unpersisted(seconds / 2, rounds)
    print(f"\n{text_table(rows)}\n")
    print(f"ratio = trio-pgs / baseline; batch = records per store transaction; "
          f"took {time.perf_counter() - began:.0f} s")
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as out:
            out.write(markdown_table(rows, [line + "  " for line in preamble]))
        print(f"Markdown table written to {args.markdown}")


if __name__ == "__main__":
    main()
