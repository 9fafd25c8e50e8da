"""Memory: what an active idle server costs in RAM, and what a dormant one costs on
disk and in RAM.

Section ``memory`` of ``benchmarks/run.py``. Every RAM figure comes from a fresh
Python process (``python benchmarks/memory.py child ...``), which prints one JSON
line: the resident set size (``/proc/self/statm``) and the number of objects the
garbage collector tracks (``gc.get_objects()``), after a full collection, before and
after the thing measured.

- active idle server: N dormant records are written first; the child opens a
  supervisor, reads every record once through the store's ``scan`` (so SQLite's
  page cache holds them before the "before" figure), activates N servers with one
  ``peek`` call each and measures again; against N bare trio tasks, each blocked on
  the receive of its own memory channel (the same size as a mailbox);
- dormant server on disk: the store directory's size over its record count,
  against a plain diskcache holding only the state's bytes under the same keys;
- dormant server in RAM: a supervisor on a store of D records, one server
  activated, against the same on a store of 1,000 records; and N servers activated
  then hibernated, against the same process before.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
from typing import Any

import trio
import trio.testing
from common import (
    Counter,
    Row,
    Section,
    directory_size,
    open_cache,
    report,
    settle_memory,
    write_dormant,
)

import trio_pgs
from trio_pgs import PersistentSupervisor

HERE = os.path.dirname(os.path.abspath(__file__))


def snapshot() -> dict[str, int]:
    rss = settle_memory()
    return {"rss": rss, "objects": len(gc.get_objects())}


# -- the children ---------------------------------------------------------------------------


async def activate(refs: list[trio_pgs.ServerRef], chunk: int = 1000) -> None:
    for first in range(0, len(refs), chunk):
        async with trio.open_nursery() as nursery:
            for ref in refs[first:first + chunk]:
                nursery.start_soon(ref.call, "peek")


async def child_active(directory: str, servers: int) -> dict[str, Any]:
    store = trio_pgs.DiskCacheStore(directory)
    async with PersistentSupervisor(store=store, servers=[Counter], idle_timeout=None) as sup:
        async for _ in store.scan(Counter.kind):  # SQLite's page cache: warm, bounded
            pass
        await sup.ref(Counter, "c0").call("peek")  # code paths and threads: warm
        before = snapshot()
        await activate([sup.ref(Counter, f"c{i}") for i in range(1, servers + 1)])
        await trio.testing.wait_all_tasks_blocked()
        after = snapshot()
        active = sup.statistics().active
    return {"before": before, "after": after, "active": active}


async def child_bare(servers: int) -> dict[str, Any]:
    async def task(receive: trio.MemoryReceiveChannel[int]) -> None:
        await receive.receive()

    async with trio.open_nursery() as nursery:
        keep = []

        def spawn() -> None:
            send, receive = trio.open_memory_channel[int](1024)
            keep.append(send)
            nursery.start_soon(task, receive)

        spawn()
        await trio.testing.wait_all_tasks_blocked()
        before = snapshot()
        for _ in range(servers):
            spawn()
        await trio.testing.wait_all_tasks_blocked()
        after = snapshot()
        nursery.cancel_scope.cancel()
    return {"before": before, "after": after, "active": servers}


async def child_dormant(directory: str) -> dict[str, Any]:
    store = trio_pgs.DiskCacheStore(directory)
    async with PersistentSupervisor(store=store, servers=[Counter]) as sup:
        await sup.ref(Counter, "c0").call("peek")
        after = snapshot()
        active = sup.statistics().active
    return {"before": after, "after": after, "active": active}


async def child_hibernated(directory: str, servers: int) -> dict[str, Any]:
    store = trio_pgs.DiskCacheStore(directory)
    async with PersistentSupervisor(store=store, servers=[Counter], idle_timeout=0.2) as sup:
        async for _ in store.scan(Counter.kind):
            pass
        await sup.ref(Counter, "c0").call("peek")
        while sup.statistics().active:
            await trio.sleep(0.05)
        before = snapshot()
        await activate([sup.ref(Counter, f"c{i}") for i in range(1, servers + 1)])
        while sup.statistics().active:
            await trio.sleep(0.05)
        after = snapshot()
        stats = sup.statistics()
    if stats.hibernations != servers + 1:
        raise AssertionError(f"{stats.hibernations} hibernations for {servers + 1} servers")
    return {"before": before, "after": after, "active": stats.active}


def child(argv: list[str]) -> None:
    what = argv[0]
    if what == "active":
        result = trio.run(child_active, argv[1], int(argv[2]))
    elif what == "bare":
        result = trio.run(child_bare, int(argv[1]))
    elif what == "dormant":
        result = trio.run(child_dormant, argv[1])
    elif what == "hibernated":
        result = trio.run(child_hibernated, argv[1], int(argv[2]))
    else:
        raise SystemExit(f"unknown child {what!r}")
    print(json.dumps(result))


def run_child(*args: object) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, os.path.join(HERE, "memory.py"), "child", *map(str, args)],
        capture_output=True, text=True,
    )
    if out.returncode:
        raise RuntimeError(f"memory child {args} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def growth(results: list[dict[str, Any]], field: str, count: int) -> float:
    """The median over rounds of (after - before) / count."""
    return statistics.median((r["after"][field] - r["before"][field]) / count for r in results)


# -- the section ----------------------------------------------------------------------------


def plain_rows_size(directory: str, records: int) -> int:
    cache = open_cache(directory)
    try:
        with cache.transact():
            for i in range(records):
                cache.set(f"c{i}", b"0")
    finally:
        cache.close()
    return directory_size(directory)


def memory_section(servers: int, dormant: int, rounds: int) -> Section:
    rows = []
    small = 1000
    with tempfile.TemporaryDirectory(prefix="trio-pgs-bench-") as active_dir, \
            tempfile.TemporaryDirectory(prefix="trio-pgs-bench-") as small_dir, \
            tempfile.TemporaryDirectory(prefix="trio-pgs-bench-") as large_dir, \
            tempfile.TemporaryDirectory(prefix="trio-pgs-bench-") as plain_dir:
        trio.run(write_dormant, active_dir, servers + 1)
        trio.run(write_dormant, small_dir, small)
        trio.run(write_dormant, large_dir, dormant)
        ours_runs, bare_runs = [], []
        for _ in range(rounds):
            # A copy of the records per round: activating commits nothing (peek),
            # so the same directory serves every round.
            ours_runs.append(run_child("active", active_dir, servers))
            bare_runs.append(run_child("bare", servers))
        for r in ours_runs:
            if r["active"] != servers + 1:
                raise AssertionError(f"{r['active']} active servers, expected {servers + 1}")
        ours = growth(ours_runs, "rss", servers)
        theirs = growth(bare_runs, "rss", servers)
        name = f"RSS per active idle server ({servers:,} servers)"
        report(name, "trio-pgs", f"{ours:,.0f} B")
        report(name, "bare trio task", f"{theirs:,.0f} B")
        ratio = ours / theirs
        rows.append(Row(name, f"{ours:,.0f} B ({growth(ours_runs, 'objects', servers):.1f} "
                              "objects)",
                        "bare trio task blocked on a memory channel receive",
                        f"{theirs:,.0f} B ({growth(bare_runs, 'objects', servers):.1f} objects)",
                        ratio, "<= 2x", ratio <= 2))

        disk = directory_size(large_dir) / dormant
        plain = plain_rows_size(plain_dir, dormant) / dormant
        name = f"bytes on disk per dormant server ({dormant:,} records)"
        report(name, "trio-pgs", f"{disk:,.0f} B")
        rows.append(Row(name, f"{disk:,.0f} B", "plain diskcache row of the state bytes only",
                        f"{plain:,.0f} B", disk / plain))

        large_runs, small_runs = [], []
        for _ in range(rounds):
            small_runs.append(run_child("dormant", small_dir))
            large_runs.append(run_child("dormant", large_dir))
        extra = dormant - small

        def med(runs: list[dict[str, Any]], field: str) -> float:
            return statistics.median(r["after"][field] for r in runs)

        objects = med(large_runs, "objects") - med(small_runs, "objects")
        rss = med(large_runs, "rss") - med(small_runs, "rss")
        actives = {r["active"] for r in large_runs + small_runs}
        name = f"RAM per dormant server ({dormant:,} vs {small:,} records, 1 active)"
        report(name, "trio-pgs", f"objects {objects:+,.0f}, RSS {rss:+,.0f} B, "
               f"active {actives}")
        met = objects / extra < 0.01 and actives == {1}
        rows.append(Row(
            name,
            f"{rss / extra:+,.1f} B RSS, {objects / extra:+.4f} objects per extra record",
            f"supervisor on {small:,} records",
            f"RSS {med(small_runs, 'rss') / 2**20:,.1f} MiB, "
            f"{med(small_runs, 'objects'):,.0f} objects; at {dormant:,}: "
            f"RSS {med(large_runs, 'rss') / 2**20:,.1f} MiB, "
            f"{med(large_runs, 'objects'):,.0f} objects; active {sorted(actives)}",
            None, "0 B (no object per dormant server)", met))

        hib_runs = [run_child("hibernated", active_dir, servers) for _ in range(rounds)]
        objects = growth(hib_runs, "objects", servers)
        rss = growth(hib_runs, "rss", servers)
        name = f"after {servers:,} activations, all hibernated"
        report(name, "trio-pgs", f"{objects:+.4f} objects, {rss:+,.1f} B RSS per server")
        actives = {r["active"] for r in hib_runs}
        rows.append(Row(
            name, f"{objects:+.4f} objects, {rss:+,.1f} B RSS per server",
            "the same process before", "active 0" if actives == {0} else f"active {actives}",
            None, "0 B (no object left)", objects < 0.01 and actives == {0}))
    notes = [
        "RSS from /proc/self/statm after gc.collect(), each figure the median of "
        f"{rounds} fresh processes; objects = len(gc.get_objects()) (objects tracked by "
        "the garbage collector, not every allocation).",
        "Active: records read once through the store's scan before the first figure, "
        "so the growth is the servers', not SQLite's page cache (bounded anyway: "
        "diskcache sets cache_size to 8,192 pages). The bare baseline opens the same "
        "1,024-slot memory channel per task.",
        "RAM per dormant server: one supervisor process on a store of "
        f"{dormant:,} records against one on {small:,}, each having activated one server; "
        "a dormant server has no entry (statistics().active counts only the activated one) "
        "and no object. RSS differences are the noise of two processes plus SQLite's "
        "page cache, which is bounded and not per server.",
        "All hibernated: the supervisor's process after activating every server and "
        "waiting for each to hibernate (idle_timeout 0.2 s), against the same process "
        "before; freed memory is not always returned to the OS, so RSS may not drop, but "
        "no object stays behind.",
    ]
    return Section("Memory", rows, notes)


if __name__ == "__main__":
    if sys.argv[1:2] == ["child"]:
        child(sys.argv[2:])
    else:
        raise SystemExit("run benchmarks/run.py --only memory")
