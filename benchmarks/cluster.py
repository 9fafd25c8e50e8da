"""Clusters: a forwarded call against a local one, and one node against three.

Section ``cluster`` of ``benchmarks/run.py``. Every node is a process of its own (two
supervisors of one name cannot share a process), running this file with ``--node``
and taking commands on stdin; all of them open supervisor ``bench`` with
``cluster=trio_pgs.Cluster(...)`` (listening on 127.0.0.1) on a `PostgresStore` of
the section's PostgreSQL (postgres.py's `Database`: ``TRIO_PGS_POSTGRES_DSN``, or a
throwaway pgserver server), in a fresh schema per scenario and round.

- Latency: two nodes, A and B, and 200 counters spread over them. A calls them one at
  a time, in turn, ``call("incr")`` (every call commits): each call is either local
  (A owns the counter) or forwarded (B owns it: A sends it to B, B handles and
  commits it, B's reply comes back). Both kinds come from the same loop, so they
  share every condition; which kind a call was is read from A's
  ``statistics().forwarded``. Ratio = forwarded / local, p50 and p90.
- Throughput: 100 counters, one closed-loop caller each (`common.drive`), on one node
  against three nodes with the callers spread over them (caller i on node i mod 3:
  two calls in three are forwarded). All the processes and PostgreSQL share this
  machine's CPUs. After each round the counters are read back and must add up to the
  calls made.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio
from common import Counter, Latencies, Row, Section, check_sum, drive, report
from postgres import Database

import trio_pgs
from trio_pgs import PersistentSupervisor

NAME = "bench"
SECRET = "benchmark secret, not a real one"
LATENCY_SERVERS = 200
SERVERS = 100
TARGET = 3.0


# -- a node ---------------------------------------------------------------------------------


def say(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


async def node_main(dsn: str, schema: str, nodes: int) -> None:
    store = trio_pgs.PostgresStore(dsn, schema=schema)
    cluster = trio_pgs.Cluster(secret=SECRET, listen="127.0.0.1:0")
    async with PersistentSupervisor(store=store, name=NAME, servers=[Counter],
                                    cluster=cluster) as sup:
        while sup.statistics().nodes < nodes:
            await trio.sleep(0.02)
        say("up")
        while line := await trio.to_thread.run_sync(sys.stdin.readline):
            match json.loads(line):
                case ["start", int(servers)]:
                    async with trio.open_nursery() as nursery:
                        for i in range(servers):
                            nursery.start_soon(start, sup, i)
                    say("started")
                case ["latency", int(servers), float(seconds)]:
                    local, forwarded = await latencies(sup, servers, seconds)
                    say("latency", local=local, forwarded=forwarded)
                case ["drive", int(first), int(step), int(servers), float(seconds)]:
                    mine = [sup.ref(Counter, f"c{i}") for i in range(first, servers, step)]
                    done = await drive(len(mine), seconds, lambda i, refs=mine: refs[i].call(
                        "incr"))
                    say("drove", rate=done.rate, total=done.total)
                case ["sum", int(servers)]:
                    values = [await sup.ref(Counter, f"c{i}").call("peek")
                              for i in range(servers)]
                    say("sum", values=values)
                case ["stop"]:
                    break


async def start(sup: PersistentSupervisor, i: int) -> None:
    try:
        await sup.start(Counter, 0, key=f"c{i}")
    except trio_pgs.AlreadyStarted:
        pass


async def latencies(sup: PersistentSupervisor, servers: int,
                    seconds: float) -> tuple[list[float], list[float]]:
    refs = [sup.ref(Counter, f"c{i}") for i in range(servers)]
    for ref in refs:  # every counter active, every connection made
        await ref.call("incr")
    local: list[float] = []
    forwarded: list[float] = []
    end = time.perf_counter() + seconds
    i = 0
    while time.perf_counter() < end:
        before = sup.statistics().forwarded
        began = time.perf_counter()
        await refs[i % servers].call("incr")
        took = time.perf_counter() - began
        (forwarded if sup.statistics().forwarded > before else local).append(took)
        i += 1
    return local, forwarded


# -- the coordinator ------------------------------------------------------------------------


class Node:
    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.buffer = b""

    async def send(self, *command: Any) -> None:
        assert self.process.stdin is not None
        await self.process.stdin.send_all(json.dumps(command).encode() + b"\n")

    async def expect(self, event: str) -> dict[str, Any]:
        assert self.process.stdout is not None
        while b"\n" not in self.buffer:
            chunk = await self.process.stdout.receive_some()
            if not chunk:
                raise RuntimeError(f"a node exited ({await self.process.wait()}) "
                                   f"before saying {event!r}")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        found: dict[str, Any] = json.loads(line)
        if found["event"] != event:
            raise RuntimeError(f"a node said {found} instead of {event!r}")
        return found


@asynccontextmanager
async def cluster(db: Database, count: int) -> AsyncIterator[list[Node]]:
    """*count* node processes on a fresh schema, every one seeing all the others."""
    with db.schema() as schema:
        nodes = []
        try:
            for _ in range(count):
                process = await trio.lowlevel.open_process(
                    [sys.executable, str(Path(__file__)), "--node", db.dsn, schema,
                     str(count)],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                )
                nodes.append(Node(process))
            with trio.fail_after(60):
                for node in nodes:
                    await node.expect("up")
            yield nodes
            for node in nodes:
                await node.send("stop")
            with trio.fail_after(30):
                for node in nodes:
                    await node.process.wait()
        finally:
            for node in nodes:
                if node.process.returncode is None:
                    node.process.kill()
                    await node.process.wait()


async def latency_round(db: Database, seconds: float) -> tuple[Latencies, Latencies, int]:
    async with cluster(db, 2) as (a, _):
        await a.send("start", LATENCY_SERVERS)
        await a.expect("started")
        await a.send("latency", LATENCY_SERVERS, seconds)
        found = await a.expect("latency")
    local, forwarded = found["local"], found["forwarded"]
    return Latencies.of(local), Latencies.of(forwarded), len(local) + len(forwarded)


async def throughput_round(db: Database, count: int, seconds: float) -> float:
    async with cluster(db, count) as nodes:
        await nodes[0].send("start", SERVERS)
        await nodes[0].expect("started")
        for k, node in enumerate(nodes):
            await node.send("drive", k, count, SERVERS, seconds)
        drove = [await node.expect("drove") for node in nodes]
        await nodes[0].send("sum", SERVERS)
        values = (await nodes[0].expect("sum"))["values"]
    check_sum(f"{count} node(s)", values, sum(d["total"] for d in drove))
    return float(sum(d["rate"] for d in drove))


def cluster_section(seconds: float, rounds: int) -> Section | None:
    db = Database.open()
    if isinstance(db, str):
        print(f"  skipped: {db}", flush=True)
        return None
    local: list[Latencies] = []
    forwarded: list[Latencies] = []
    one: list[float] = []
    three: list[float] = []
    samples = 0
    try:
        description = db.describe()
        print(f"  {description}", flush=True)
        for _ in range(rounds):  # the rounds interleave the scenarios
            mine, theirs, count = trio.run(latency_round, db, seconds)
            local.append(mine)
            forwarded.append(theirs)
            samples += count
            report("call latency", "local / forwarded", f"{mine.text()} / {theirs.text()}")
            one.append(trio.run(throughput_round, db, 1, seconds))
            report("100 servers", "1 node", f"{one[-1]:,.0f} calls/s")
            three.append(trio.run(throughput_round, db, 3, seconds))
            report("100 servers", "3 nodes", f"{three[-1]:,.0f} calls/s")
    finally:
        db.close()
    mine, theirs = Latencies.median(local), Latencies.median(forwarded)
    p50, p90 = theirs.p50 / mine.p50, theirs.p90 / mine.p90
    rate1, rate3 = statistics.median(one), statistics.median(three)
    rows = [
        Row("persisted call, forwarded to the owner node (p50)", f"{theirs.p50 * 1e6:,.0f} us",
            "local call", f"{mine.p50 * 1e6:,.0f} us", p50, f"<= {TARGET:g}x", p50 <= TARGET),
        Row("persisted call, forwarded to the owner node (p90)", f"{theirs.p90 * 1e6:,.0f} us",
            "local call", f"{mine.p90 * 1e6:,.0f} us", p90, f"<= {TARGET:g}x", p90 <= TARGET),
        Row("100 servers, callers spread over 3 nodes", f"{rate3:,.0f} calls/s",
            "1 node", f"{rate1:,.0f} calls/s", rate3 / rate1),
    ]
    notes = [
        description,
        "Every node is a process (one node: a cluster of one); supervisor `bench` with "
        "`cluster=trio_pgs.Cluster(...)` (127.0.0.1, default lease) on a PostgresStore in "
        "a fresh schema per scenario and round. The counters' `call(\"incr\")` commits "
        "every call (EACH_MESSAGE).",
        f"Latency: 2 nodes, {LATENCY_SERVERS} counters spread over them; node A calls them "
        f"in turn, one at a time, for {seconds:g} s per round ({samples:,} calls in all); "
        "a call is local or forwarded as A's `statistics().forwarded` says. A forwarded "
        "call: encode, send over the authenticated TCP connection, B delivers it and "
        "commits, B's reply back, decode. p50 / p90 / p99 of each kind: local "
        f"{mine.text()}, forwarded {theirs.text()}.",
        f"Throughput: {SERVERS} counters, one closed-loop caller each, {seconds:g} s per "
        "round; 3 nodes: caller i on node i mod 3, so two calls in three are forwarded. "
        "The nodes, their store threads and PostgreSQL share the machine's CPUs: a "
        "machine per node would differ. Counters read back after each round add up to "
        "the calls made.",
        "Rounds: " + "; ".join(
            f"local p50 {a.p50 * 1e6:,.0f} us, forwarded {b.p50 * 1e6:,.0f} us, "
            f"1 node {x:,.0f}/s, 3 nodes {y:,.0f}/s"
            for a, b, x, y in zip(local, forwarded, one, three, strict=True)) + ".",
    ]
    return Section("Clusters (PostgresStore, nodes as processes)", rows, notes)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="a node of the cluster benchmark")
    parser.add_argument("--node", nargs=3, metavar=("DSN", "SCHEMA", "NODES"),
                        required=True)
    options = parser.parse_args()
    dsn, schema, nodes = options.node
    trio.run(node_main, dsn, schema, int(nodes))
