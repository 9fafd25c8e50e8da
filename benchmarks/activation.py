"""Activation latency and scale.

Section ``activation``: the latency from a call to a dormant server to its first
reply (load the record on the store's thread, decode, start the task, handle the
call), one activation at a time over 1,000 dormant servers on a `DiskCacheStore`,
against a trio task spawned per key that reads the key's row with
``trio.to_thread.run_sync(cache.get)`` and replies, measured the same way.

Section ``scale``:

- N servers started and hibernated (a short ``idle_timeout``): start rate and the
  time until every one is dormant again, against N hand-written trio tasks that
  each commit a first write through the hand-written group commit, then wait on
  their channel with the same idle deadline and end;
- D dormant records written through the store's commit API, then 1,000 random
  activations: latency against the same at 10,000 records. Nothing of a dormant
  server lives in the supervisor, so the only thing that may grow with D is the
  store's own lookup (SQLite's B-tree).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import trio
from common import (
    Counter,
    HandGroupCommit,
    Latencies,
    Row,
    Section,
    StoreThread,
    open_cache,
    random_keys,
    report,
    start_counters,
    write_dormant,
)

import trio_pgs
from trio_pgs import PersistentSupervisor

WARMUP_ACTIVATIONS = 20


# -- activation latency ---------------------------------------------------------------------


async def pgs_activations(directory: str, keys: list[str],
                          store_class: Callable[[str], trio_pgs.Store] = trio_pgs.DiskCacheStore,
                          ) -> list[float]:
    """Call each dormant server of *keys* once, one after the other; return the
    latencies of all but the warm-up ones. The store is ``store_class(directory)``."""
    latencies = []
    store = store_class(directory)
    async with PersistentSupervisor(store=store, servers=[Counter]) as sup:
        for key in keys:
            ref = sup.ref(Counter, key)
            began = time.perf_counter()
            await ref.call("peek")
            latencies.append(time.perf_counter() - began)
        if sup.statistics().activations != len(keys):
            raise AssertionError("every call should have activated a dormant server")
    return latencies[WARMUP_ACTIVATIONS:]


async def spawn_and_read(directory: str, keys: list[str]) -> list[float]:
    """Baseline: per key, spawn a trio task that reads the key's row with
    ``trio.to_thread.run_sync(cache.get)`` and hands it back, like a hand-written
    server answering its first request; the tasks stay blocked on their mailbox."""
    cache = open_cache(directory)
    latencies = []

    async def server(key: str, request: Request, receive: trio.MemoryReceiveChannel[int]) -> None:
        value = await trio.to_thread.run_sync(cache.get, key)
        request.result = value
        request.done.set()
        async for _ in receive:  # an idle server, waiting for its next message
            pass

    try:
        async with trio.open_nursery() as nursery:
            channels = []
            for key in keys:
                began = time.perf_counter()
                request = Request()
                send, receive = trio.open_memory_channel[int](1024)
                channels.append(send)
                nursery.start_soon(server, key, request, receive)
                await request.done.wait()
                if request.result is None:
                    raise AssertionError(f"{key} has no row")
                latencies.append(time.perf_counter() - began)
            nursery.cancel_scope.cancel()
    finally:
        cache.close()
    return latencies[WARMUP_ACTIVATIONS:]


class Request:
    __slots__ = ("done", "result")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.result: object = None


def write_rows(directory: str, records: int) -> None:
    """The baseline's rows: the same keys, each with a row of a trio-pgs record's size."""
    row = b'{"v":1,"sv":1,"e":0,"t":1700000000.0,"n":[1]}\n0'
    cache = open_cache(directory)
    try:
        with cache.transact():
            for i in range(records):
                cache.set(f"c{i}", row)
    finally:
        cache.close()


def activation_rounds(servers: int, rounds: int) -> tuple[Latencies, Latencies]:
    """*rounds* rounds of *servers* activations (plus a warm-up), each on fresh
    directories; the median of each percentile for trio-pgs and for the baseline."""
    ours, theirs = [], []
    total = servers + WARMUP_ACTIVATIONS
    for n in range(rounds):
        keys = random_keys(total, total, seed=n)
        with tempfile.TemporaryDirectory(prefix="trio-pgs-bench-") as directory:
            trio.run(write_dormant, directory, total)
            ours.append(Latencies.of(trio.run(pgs_activations, directory, keys)))
        with tempfile.TemporaryDirectory(prefix="trio-pgs-bench-") as directory:
            write_rows(directory, total)
            theirs.append(Latencies.of(trio.run(spawn_and_read, directory, keys)))
    return Latencies.median(ours), Latencies.median(theirs)


def activation_section(servers: int, rounds: int) -> Section:
    name = f"activation, dormant -> first reply, {servers:,} dormant servers"
    ours, theirs = activation_rounds(servers, rounds)
    report(name, "trio-pgs", ours.text())
    report(name, "spawn + to_thread(cache.get)", theirs.text())
    ratio = ours.p50 / theirs.p50
    rows = [
        Row(name, ours.text(), "spawn a task + to_thread(cache.get)", theirs.text(), ratio,
            "p50 <= 3x", ratio <= 3),
        Row(f"{name}, p99", f"p99 {ours.p99 * 1e6:,.0f} us", "same",
            f"p99 {theirs.p99 * 1e6:,.0f} us", ours.p99 / theirs.p99),
    ]
    notes = [
        "One activation at a time, keys in random order, on a DiskCacheStore whose "
        f"records were committed beforehand; the first {WARMUP_ACTIVATIONS} activations "
        "of a round are a warm-up and not counted. Ratio = trio-pgs p50 / baseline p50 "
        "(lower is better).",
        "Baseline: per key, `nursery.start_soon` a task that does "
        "`await trio.to_thread.run_sync(cache.get, key)` on a plain diskcache.Cache "
        "(eviction off) holding rows of the same size, sets the reply, and stays "
        "blocked on its own memory channel.",
    ]
    return Section("Activation latency", rows, notes)


# -- scale: many servers started and hibernated ---------------------------------------------


@dataclass(frozen=True)
class Wave:
    """Start rate (per second) and seconds until all dormant, from the first start."""

    start_rate: float
    all_dormant: float


async def pgs_wave(directory: str, servers: int, idle_timeout: float) -> Wave:
    store = trio_pgs.DiskCacheStore(directory)
    async with PersistentSupervisor(store=store, idle_timeout=idle_timeout) as sup:
        began = time.perf_counter()
        await start_counters(sup, servers)
        started = time.perf_counter() - began
        while sup.statistics().active:
            await trio.sleep(0.01)
        dormant = time.perf_counter() - began
        stats = sup.statistics()
    if stats.hibernations != servers:
        raise AssertionError(f"{stats.hibernations} hibernations for {servers} servers")
    return Wave(servers / started, dormant)


async def hand_wave(directory: str, servers: int, idle_timeout: float) -> Wave:
    """Baseline: per server, spawn a task that puts its first write in the pending
    batch of a hand-written group commit and waits for the batch's commit, then waits
    on its own memory channel for *idle_timeout* seconds and ends."""
    thread = StoreThread()
    cache = await thread.run(lambda: open_cache(directory))
    group = HandGroupCommit(thread, cache)
    started = 0
    all_started = trio.Event()

    async def server(i: int) -> None:
        nonlocal started
        _send, receive = trio.open_memory_channel[int](1024)
        await group.write(f"c{i}", b"0")
        started += 1
        if started == servers:
            all_started.set()
        with trio.move_on_after(idle_timeout):
            async for _ in receive:
                pass

    try:
        async with trio.open_nursery() as outer:
            outer.start_soon(group.run)
            began = time.perf_counter()
            async with trio.open_nursery() as nursery:
                for i in range(servers):
                    nursery.start_soon(server, i)
                await all_started.wait()
                start_time = time.perf_counter() - began
            dormant = time.perf_counter() - began
            outer.cancel_scope.cancel()
    finally:
        await thread.run(cache.close)
        await thread.stop()
    return Wave(servers / start_time, dormant)


def wave_rounds(servers: int, idle_timeout: float, rounds: int) -> tuple[Wave, Wave]:
    ours, theirs = [], []
    for _ in range(rounds):
        with tempfile.TemporaryDirectory(prefix="trio-pgs-bench-") as directory:
            ours.append(trio.run(pgs_wave, directory, servers, idle_timeout))
        with tempfile.TemporaryDirectory(prefix="trio-pgs-bench-") as directory:
            theirs.append(trio.run(hand_wave, directory, servers, idle_timeout))

    def med(waves: list[Wave]) -> Wave:
        return Wave(statistics.median(w.start_rate for w in waves),
                    statistics.median(w.all_dormant for w in waves))

    return med(ours), med(theirs)


# -- scale: activations among many dormant records ------------------------------------------


def dormant_activation_rounds(small: int, large: int, activations: int,
                              rounds: int) -> tuple[Latencies, Latencies]:
    """Write *small* and *large* dormant records (once each), then run *rounds* rounds
    of *activations* random activations on each, alternating; medians per percentile."""
    total = activations + WARMUP_ACTIVATIONS
    results: dict[int, list[Latencies]] = {small: [], large: []}
    with tempfile.TemporaryDirectory(prefix="trio-pgs-bench-") as small_dir, \
            tempfile.TemporaryDirectory(prefix="trio-pgs-bench-") as large_dir:
        directories = {small: small_dir, large: large_dir}
        for records, directory in directories.items():
            began = time.perf_counter()
            trio.run(write_dormant, directory, records)
            print(f"  wrote {records:,} dormant records in "
                  f"{time.perf_counter() - began:.0f} s", flush=True)
        for n in range(rounds):
            for records, directory in directories.items():
                keys = random_keys(records, total, seed=1000 + n)
                latencies = trio.run(pgs_activations, directory, keys, trio_pgs.DiskCacheStore)
                results[records].append(Latencies.of(latencies))
    return Latencies.median(results[large]), Latencies.median(results[small])


def scale_section(servers: int, dormant: int, idle_timeout: float, rounds: int) -> Section:
    rows = []
    name = f"{servers:,} servers started, then hibernated (idle_timeout {idle_timeout:g} s)"
    ours, theirs = wave_rounds(servers, idle_timeout, rounds)
    report(name, "trio-pgs", f"{ours.start_rate:,.0f} starts/s, all dormant after "
           f"{ours.all_dormant:.1f} s")
    report(name, "hand-written", f"{theirs.start_rate:,.0f} starts/s, all ended after "
           f"{theirs.all_dormant:.1f} s")
    rows.append(Row(f"{name}: start rate", f"{ours.start_rate:,.0f} servers/s",
                    "spawn + first write by hand-written group commit",
                    f"{theirs.start_rate:,.0f} tasks/s", ours.start_rate / theirs.start_rate))
    rows.append(Row(f"{name}: first start -> all dormant", f"{ours.all_dormant:.1f} s",
                    "same tasks, idle deadline, then end", f"{theirs.all_dormant:.1f} s",
                    ours.all_dormant / theirs.all_dormant))
    name = f"1,000 random activations among {dormant:,} dormant records"
    large, small = dormant_activation_rounds(10_000, dormant, 1000, rounds)
    report(name, "trio-pgs", large.text())
    report(name, "trio-pgs at 10,000 records", small.text())
    ratio = large.p50 / small.p50
    rows.append(Row(name, large.text(p90=False), "same at 10,000 records",
                    small.text(p90=False), ratio, "p50 not growing (<= 1.5x)", ratio <= 1.5))
    rows.append(Row(f"{name}, p99", f"p99 {large.p99 * 1e6:,.0f} us", "same at 10,000",
                    f"p99 {small.p99 * 1e6:,.0f} us", large.p99 / small.p99))
    notes = [
        f"Sizes used: {servers:,} servers started and hibernated; {dormant:,} dormant "
        "records (`--scale full`: 100,000 and 1,000,000).",
        "Start rate: `sup.start` of every server at once (their first commits are "
        "batched); all dormant: until `statistics().active` is 0, every server having "
        "hibernated (checked: hibernations == servers).",
        "Dormant records are written straight through `DiskCacheStore.commit` (Put of a "
        "Record, 20,000 per transaction), then activated one at a time in random order "
        "by a new supervisor; ratio = latency at the large size / at 10,000 records "
        "(lower is better, 1 = no growth).",
        "The supervisor's startup `kinds()` runs too (one indexed query per kind).",
    ]
    return Section("Scale", rows, notes)
