"""A cluster node for the multi-process cluster tests (tests/test_cluster.py).

Run as ``python tests/cluster_node.py SCHEMA LABEL LOG DEADLINE LEASE``: it opens a
`PersistentSupervisor` named ``NAME`` on a `PostgresStore` in the schema SCHEMA of the
database whose DSN is in the environment variable ``TRIO_PGS_CLUSTER_DSN`` (kept out of
the command line for its password), as a node of a cluster listening on 127.0.0.1, with
a lease of LEASE seconds. LABEL names this process in op ids and in its output.

It answers commands, one JSON object a line on stdin (``{"op": ...}``, see `Node`), and
writes JSON lines on stdout, each with one ``os.write``: ``{"ready": "host:port",
"node": id, ...}`` once it has joined, ``{"event": "activated", "key": k}`` for each
activation here, one answer per command (``{"op": <the command's op>, ...}``) and
``{"bye": {...statistics}}`` after leaving its ``async with``.

LOG records its tally clients' increments, one line each, appended with one
``os.write`` (nothing waits in a buffer when the node is killed):

- ``S <id> <key>``: the increment ``("add", id)`` is about to be sent;
- ``A <id> <key>``: its call returned: acknowledged (committed by the owner);
- ``E <id> <key> <ErrorName>``: its call failed; the increment may or may not be stored.

Every id is sent once (an attempt that failed is never resent), so a stored id that
appears twice was applied twice. The node stops by itself: on ``{"op": "stop"}``,
SIGTERM, the end of stdin (its parent died or closed it), a change of parent, or after
DEADLINE seconds; it leaves its ``async with`` (a graceful leave: its servers are handed
off) in every case.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import sys
import time
from typing import Any

import attrs
import trio

import trio_pgs
from trio_pgs import PersistentServer, PersistentSupervisor, Reply

NAME = "cluster-test"
SECRET = b"trio-pgs cluster test secret, 32+"
DSN_VARIABLE = "TRIO_PGS_CLUSTER_DSN"
logger = logging.getLogger("cluster_node")
#: How long a failed client waits before its next increment (no hot retry loop).
BACKOFF = 0.05

#: What a client's increment may fail with: logged and counted by class name (the
#: test decides which are acceptable); anything else ends the node with a traceback.
ERRORS = (
    trio_pgs.NodeUnavailable, trio_pgs.PersistenceError, trio_pgs.OutcomeUnknown,
    trio_pgs.SupervisorNotRunning, trio_pgs.TrioPGSError,
)


@attrs.define
class Tally:
    """The ids of the increments this server applied, in the order it applied them."""

    ids: list[str] = attrs.Factory(list)


class TallyServer(PersistentServer[Tally]):
    """A counter whose state is the list of the increments it applied (no dedup: an
    increment applied twice shows twice)."""

    kind = "cluster.tally"
    idle_timeout = None

    async def init(self) -> Tally:
        return Tally()

    async def handle_call(self, request: Any, state: Tally) -> Any:
        match request:
            case ("add", str(op)):
                state = Tally([*state.ids, op])
                return Reply(("added", self.ref.key, op, len(state.ids)), state)
            case ("echo", payload):
                return Reply(("echo", self.ref.key, payload), state, persist=False)
            case "get":
                return Reply(list(state.ids), state, persist=False)
        return await super().handle_call(request, state)


def emit(**fields: Any) -> None:
    os.write(1, (json.dumps(fields) + "\n").encode())


def stats_of(sup: PersistentSupervisor) -> dict[str, Any]:
    return {
        k: v for k, v in attrs.asdict(sup.statistics()).items() if isinstance(v, int | str)
    }


async def start_or_exists(sup: PersistentSupervisor, key: str) -> str:
    try:
        await sup.start(TallyServer, key=key)
    except trio_pgs.AlreadyStarted:
        return "exists"
    return "started"


class Node:
    """The commands (``op``): ``wait_nodes`` (``n``: until statistics().nodes == n),
    ``race`` (at wall-clock time ``at``, start-or-reuse every key of ``start`` and send
    one increment to every key of ``start`` and ``call``, all at once), ``work``
    (``callers`` clients sending increments to random ``keys`` in the background),
    ``halt`` (end them: their counts), ``probe`` (which of ``keys`` this node forwards),
    ``load`` (``callers`` concurrent clients, each ``calls`` adds and echoes on ``keys``,
    every reply checked), ``stats``, ``stop``."""

    def __init__(self, sup: PersistentSupervisor, label: str, log: int) -> None:
        self.sup = sup
        self.label = label
        self.log = log
        self.work: trio.CancelScope | None = None
        self.work_done: trio.Event | None = None
        self.counts: dict[str, int] = {}
        self.stop = trio.Event()

    def record(self, line: str) -> None:
        os.write(self.log, (line + "\n").encode())

    def count(self, name: str) -> None:
        self.counts[name] = self.counts.get(name, 0) + 1

    async def add(self, key: str, op: str) -> bool:
        """One increment, logged; True if acknowledged."""
        self.record(f"S {op} {key}")
        try:
            reply = await self.sup.ref(TallyServer, key).call(("add", op))
        except ERRORS as exc:
            self.record(f"E {op} {key} {type(exc).__name__}")
            logger.info("increment %s of %s failed: %s: %s", op, key, type(exc).__name__, exc)
            self.count(type(exc).__name__)
            return False
        if tuple(reply[:3]) != ("added", key, op):
            self.record(f"W {op} {key} {reply!r}")
            self.count("wrong reply")
            return False
        self.record(f"A {op} {key}")
        self.count("acknowledged")
        return True

    async def client(self, name: str, keys: list[str], pause: float) -> None:
        rng = random.Random()
        n = 0
        while True:
            ok = await self.add(rng.choice(keys), f"{name}.{n}")
            n += 1
            await trio.sleep(pause if ok else BACKOFF)

    async def run_work(self, keys: list[str], callers: int, pause: float) -> None:
        assert self.work is not None and self.work_done is not None
        try:
            with self.work:
                async with trio.open_nursery() as nursery:
                    for i in range(callers):
                        nursery.start_soon(self.client, f"{self.label}.c{i}", keys, pause)
        finally:
            self.work_done.set()

    async def halt(self) -> None:
        if self.work is not None and self.work_done is not None:
            self.work.cancel()
            await self.work_done.wait()
        self.work = None

    async def command(self, message: dict[str, Any], nursery: trio.Nursery) -> None:
        op = message["op"]
        sup = self.sup
        if op == "wait_nodes":
            while sup.statistics().nodes != message["n"]:
                await trio.sleep(0.05)
            emit(op=op, nodes=sup.statistics().nodes)
        elif op == "race":
            await trio.sleep(max(0.0, message["at"] - time.time()))
            results: dict[str, Any] = {}

            async def one(key: str, start: bool) -> None:
                try:
                    if start:
                        results[f"start {key}"] = await start_or_exists(sup, key)
                    results[key] = "A" if await self.add(key, f"{self.label}.{key}") else "E"
                except ERRORS as exc:
                    results[f"start {key}"] = type(exc).__name__

            async with trio.open_nursery() as inner:
                for key in message.get("start", []):
                    inner.start_soon(one, key, True)
                for key in message.get("call", []):
                    inner.start_soon(one, key, False)
            emit(op=op, results=results, stats=stats_of(sup))
        elif op == "work":
            await self.halt()
            self.work = trio.CancelScope()
            self.work_done = trio.Event()
            nursery.start_soon(
                self.run_work, message["keys"], message["callers"], message.get("pause", 0.0)
            )
            emit(op=op)
        elif op == "halt":
            await self.halt()
            emit(op=op, counts=self.counts)
        elif op == "probe":
            remote = []
            for key in message["keys"]:
                await start_or_exists(sup, key)
                before = sup.statistics().forwarded
                await sup.ref(TallyServer, key).call("get")
                if sup.statistics().forwarded > before:
                    remote.append(key)
            emit(op=op, remote=remote)
        elif op == "load":
            emit(op=op, **await self.load(message["keys"], message["callers"], message["calls"]))
        elif op == "stats":
            emit(op=op, stats=stats_of(sup))
        elif op == "stop":
            self.stop.set()
        else:
            raise ValueError(f"unknown command {message!r}")

    async def load(self, keys: list[str], callers: int, calls: int) -> dict[str, Any]:
        """Many concurrent clients, every reply checked: adds (their ids, per key) and
        echoes of a payload with nested tuples (they must come back as tuples)."""
        sup = self.sup
        wrong: list[str] = []
        added: dict[str, int] = {key: 0 for key in keys}
        before = sup.statistics().forwarded

        async def client(i: int) -> None:
            rng = random.Random(i)
            for n in range(calls):
                key = rng.choice(keys)
                ref = sup.ref(TallyServer, key)
                if n % 2:
                    payload = (i, n, ("nested", [1, 2, (3, "x")]), {"k": [key]})
                    reply = await ref.call(("echo", payload))
                    if reply != ("echo", key, payload):
                        wrong.append(f"{key}: echo {payload!r} came back as {reply!r}")
                elif await self.add(key, f"{self.label}.l{i}.{n}"):
                    added[key] += 1
                else:
                    wrong.append(f"{key}: add {i}.{n} failed")

        async with trio.open_nursery() as nursery:
            for i in range(callers):
                nursery.start_soon(client, i)
        return {"wrong": wrong[:20], "wrong_count": len(wrong), "added": added,
                "forwarded": sup.statistics().forwarded - before}


async def watch_parent(parent: int, cancel: trio.CancelScope) -> None:
    while os.getppid() == parent:
        await trio.sleep(0.2)
    cancel.cancel()


async def read_commands(node: Node, nursery: trio.Nursery) -> None:
    """Commands from stdin until it ends (then stop)."""
    stream = trio.lowlevel.FdStream(os.dup(0))
    buffer = b""
    async with stream:
        while True:
            chunk = await stream.receive_some(65536)
            if not chunk:
                break
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                if line.strip():
                    nursery.start_soon(node.command, json.loads(line), nursery)
    node.stop.set()


async def main(schema: str, label: str, log_path: str, deadline: float, lease: float) -> None:
    parent = os.getppid()
    store = trio_pgs.PostgresStore(os.environ[DSN_VARIABLE], schema=schema)
    cluster = trio_pgs.Cluster(secret=SECRET, listen="127.0.0.1:0", lease=lease)
    log = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def on_event(event: trio_pgs.ServerEvent) -> None:
        if event.type is trio_pgs.EventType.ACTIVATED and event.ref is not None:
            emit(event="activated", key=event.ref.key, label=label)

    bye: dict[str, Any] = {}
    counts: dict[str, int] = {}
    with trio.move_on_after(deadline) as timer:
        async with PersistentSupervisor(
            store=store, name=NAME, servers=[TallyServer], cluster=cluster, on_event=on_event,
        ) as sup:
            me = [m for m in await store.members(NAME) if m.pid == os.getpid()]
            assert len(me) == 1, me
            emit(ready=me[0].address, node=me[0].node, label=label, pid=os.getpid())
            node = Node(sup, label, log)
            node.counts = counts
            with trio.CancelScope() as scope, trio.open_signal_receiver(signal.SIGTERM) as sigs:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(read_commands, node, nursery)
                    nursery.start_soon(watch_parent, parent, scope)

                    async def on_sigterm() -> None:
                        async for _ in sigs:
                            node.stop.set()

                    nursery.start_soon(on_sigterm)
                    await node.stop.wait()
                    with trio.CancelScope(shield=True):
                        await node.halt()
                    nursery.cancel_scope.cancel()
            logging.getLogger("trio_pgs").info("node %s (%s) leaving", label, me[0].node)
        bye = {**bye, **stats_of(sup)}
    emit(bye=bye, deadline=timer.cancelled_caught, counts=counts)
    os.close(log)


if __name__ == "__main__":
    if len(sys.argv) != 6:
        sys.exit("usage: cluster_node.py SCHEMA LABEL LOG DEADLINE LEASE")
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr,
        format=f"%(asctime)s {sys.argv[2]} %(levelname)s %(name)s: %(message)s",
    )
    trio.run(main, sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]),
             float(sys.argv[5]))
