"""What every benchmark section shares: measuring, the `Counter` server, the
hand-written baselines' building blocks, and the rows of the printed tables."""

from __future__ import annotations

import functools
import gc
import os
import queue
import random
import statistics
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import diskcache
import outcome
import trio

import trio_pgs
from trio_pgs import PersistentServer, PersistentSupervisor, Put, Record, Reply

T = TypeVar("T")
#: The share of a round's duration spent warming up before the measured window.
WARMUP = 0.1


# -- measuring ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Figure:
    """One throughput measurement: calls per second, records per transaction if it
    batches, and store transactions per handled message if known."""

    rate: float
    batch: float | None = None
    commits_per_message: float | None = None


def median_figure(figures: Sequence[Figure]) -> Figure:
    def med(values: list[float]) -> float | None:
        return statistics.median(values) if values else None

    return Figure(
        statistics.median(f.rate for f in figures),
        med([f.batch for f in figures if f.batch is not None]),
        med([f.commits_per_message for f in figures if f.commits_per_message is not None]),
    )


def measure(fn: Callable[[str], Awaitable[Figure]], rounds: int) -> Figure:
    """Run ``fn(directory)`` *rounds* times, each in a fresh trio run on a fresh
    temporary directory; return the median of each field."""
    figures = []
    for _ in range(rounds):
        with tempfile.TemporaryDirectory(prefix="trio-pgs-bench-") as directory:
            figures.append(trio.run(fn, directory))
    return median_figure(figures)


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


@dataclass(frozen=True)
class Latencies:
    """Percentiles of one set of latencies, in seconds."""

    p50: float
    p90: float
    p99: float

    @classmethod
    def of(cls, samples: Sequence[float]) -> Latencies:
        ordered = sorted(samples)

        def at(q: float) -> float:
            return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

        return cls(at(0.50), at(0.90), at(0.99))

    @classmethod
    def median(cls, rounds: Sequence[Latencies]) -> Latencies:
        return cls(statistics.median(r.p50 for r in rounds),
                   statistics.median(r.p90 for r in rounds),
                   statistics.median(r.p99 for r in rounds))

    def text(self, p90: bool = True) -> str:
        parts = [f"p50 {self.p50 * 1e6:,.0f}"]
        if p90:
            parts.append(f"p90 {self.p90 * 1e6:,.0f}")
        parts.append(f"p99 {self.p99 * 1e6:,.0f} us")
        return " / ".join(parts)


def rss_bytes() -> int:
    """The resident set size of this process now (Linux: /proc/self/statm)."""
    with open("/proc/self/statm", encoding="ascii") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def settle_memory() -> int:
    """Collect garbage, then return the RSS."""
    gc.collect()
    gc.collect()
    return rss_bytes()


def directory_size(directory: str) -> int:
    return sum(
        os.path.getsize(os.path.join(root, name))
        for root, _, names in os.walk(directory) for name in names
    )


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


async def write_dormant(directory: str, records: int, batch: int = 20_000) -> None:
    """Write *records* dormant counters (keys ``c0``...) straight through the store's
    commit API, *batch* records per transaction, as a supervisor's writer would."""
    store = trio_pgs.DiskCacheStore(directory)
    await store.open()
    try:
        now = time.time()
        for first in range(0, records, batch):
            await store.commit([
                Put(Record(kind=Counter.kind, key=f"c{i}", data=b"0", updated_at=now), 0)
                for i in range(first, min(records, first + batch))
            ])
    finally:
        await store.close()


def random_keys(records: int, count: int, seed: int) -> list[str]:
    return [f"c{i}" for i in random.Random(seed).sample(range(records), count)]


# -- baselines' building blocks -------------------------------------------------------------


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


class HandGroupCommit:
    """The hand-written group commit of the baselines: writers append to the pending
    batch and wait for it; one loop commits each batch as one diskcache transaction on
    a `StoreThread`, then releases that batch's writers. No encoding, no version
    check: the store's own limit. Run `run` in a nursery; `write` from any task."""

    def __init__(self, thread: StoreThread, cache: diskcache.Cache) -> None:
        self._thread, self._cache = thread, cache
        self._pending: list[tuple[str, Any]] = []
        self._pending_done = trio.Event()
        self._wakeup = trio.Event()
        self.commits = self.records = 0

    def _commit(self, batch: list[tuple[str, Any]]) -> None:
        with self._cache.transact():
            for key, value in batch:
                self._cache.set(key, value)

    async def write(self, key: str, value: Any) -> None:
        self._pending.append((key, value))
        done = self._pending_done
        self._wakeup.set()
        await done.wait()

    async def run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup = trio.Event()
            batch, done = self._pending, self._pending_done
            self._pending, self._pending_done = [], trio.Event()
            await self._thread.run(functools.partial(self._commit, batch))
            self.commits += 1
            self.records += len(batch)
            done.set()


# -- rows of the tables ---------------------------------------------------------------------


@dataclass
class Row:
    """One trio-pgs figure beside one baseline figure of the same run.

    ``ratio`` is trio-pgs / baseline (for rates higher is better, for latencies and
    sizes lower is better); ``target`` and ``met`` say what the issue asks of it.
    """

    scenario: str
    ours: str
    baseline: str
    theirs: str
    ratio: float | None
    target: str = ""
    met: bool | None = None

    def cells(self) -> tuple[str, str, str, str, str]:
        verdict = "" if self.met is None else (" met" if self.met else " NOT MET")
        return (
            self.scenario,
            self.ours,
            f"{self.baseline}: {self.theirs}" if self.baseline else self.theirs,
            "" if self.ratio is None else f"{self.ratio:.2f}",
            (self.target + ("," if self.target and verdict else "") + verdict).strip(),
        )


@dataclass
class Section:
    title: str
    rows: list[Row]
    notes: list[str]


def report(scenario: str, who: str, text: str) -> None:
    """Print one figure as soon as it is measured (long runs show progress)."""
    print(f"  {scenario} | {who}: {text}", flush=True)
