"""Hard-kill durability: a real workload on a DiskCacheStore, and on a PostgresStore,
killed with SIGKILL at random moments, restarted, and checked after the last kill.

Every call acknowledged by any run (written by tests/durability_worker.py after `call`
returned) must be in the store exactly once; every tick of the tickers' periodic
reminders is counted exactly once (none lost to a kill during its delivery, none
counted twice); nothing was applied twice; nothing is stored
that no run sent; the store opens and every record decodes (and, for diskcache, the SQLite
file is intact; for PostgreSQL, the killed workers' connections all ended). Real
processes and real time, necessarily: ``DURABILITY_KILLS`` (default 20) sets the number
of kills.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import attrs
import psycopg
import psycopg.conninfo
import pytest
import trio

import trio_pgs
from trio_pgs import PersistentSupervisor

from . import durability_worker as worker
from .postgres import Server

WORKER = Path(worker.__file__)
KILLS = int(os.environ.get("DURABILITY_KILLS", "20"))
#: Every EARLY_EVERY-th run is killed at a random moment after it was spawned, wherever
#: it is (importing, opening or recovering the store, starting servers, working); the
#: others once they acknowledged a first call, so that they die mid-work.
EARLY_EVERY = 4
EARLY_KILL = (0.0, 0.4)
WORKING_KILL = (0.0, 0.5)
#: Only for a worker that is stuck, or a machine under heavy load: never reached otherwise.
TIMEOUT = 60.0


@attrs.define
class Target:
    """Where the workers keep their records: a diskcache directory, or a schema of the
    test's PostgreSQL (``dsn``, whose connections say ``application_name``)."""

    backend: str
    #: the directory or the schema
    where: str
    dsn: str = ""
    application_name: str = ""

    def store(self) -> trio_pgs.Store:
        if self.backend == "postgres":
            return trio_pgs.PostgresStore(self.dsn, schema=self.where)
        return trio_pgs.DiskCacheStore(self.where)

    def environment(self) -> dict[str, str]:
        if self.backend == "postgres":
            return {**os.environ, worker.DSN_VARIABLE: self.dsn}
        return dict(os.environ)


@attrs.define
class Run:
    run_id: str
    early: bool
    #: ops whose call returned "applied", in the order each client sent them
    acked: list[str]
    #: ops whose cast was accepted (not durable)
    cast: list[str]


def run_worker(
    target: Target, logs: Path, run_id: str, early: bool, rng: random.Random
) -> Run:
    """Start the worker, SIGKILL it at a random moment, and read what it acknowledged."""
    stderr_path = logs / f"{run_id}.stderr"
    lines: list[bytes] = []
    working = threading.Event()  # set at the first acknowledgement, or at the end of stdout
    with (
        stderr_path.open("wb") as stderr,
        subprocess.Popen(
            [sys.executable, str(WORKER), target.backend, target.where, run_id],
            stdout=subprocess.PIPE,
            stderr=stderr,
            env=target.environment(),
        ) as proc,
    ):
        assert proc.stdout is not None

        def read() -> None:
            for line in proc.stdout:
                lines.append(line)
                if line.startswith(b"A "):
                    working.set()
            working.set()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            if early:
                time.sleep(rng.uniform(*EARLY_KILL))
            else:
                working.wait(TIMEOUT)
                time.sleep(rng.uniform(*WORKING_KILL))
        finally:
            if proc.poll() is None:  # not reaped: the pid is still this worker's
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(TIMEOUT)
            reader.join(TIMEOUT)
    message = f"run {run_id}: worker stderr:\n{stderr_path.read_text()}"
    assert proc.returncode == -signal.SIGKILL, (
        f"the worker was not killed: it exited by itself with status {proc.returncode}; {message}"
    )
    assert not reader.is_alive(), f"its stdout did not end after the kill; {message}"
    run = Run(run_id, early, [], [])
    for line in lines:
        if not line.endswith(b"\n"):
            continue  # cut short by the kill: not an acknowledgement
        tag, _, op = line.decode().rstrip("\n").partition(" ")
        assert tag in ("A", "C") and op.startswith(f"{run_id}-"), f"unexpected line {line!r}"
        (run.acked if tag == "A" else run.cast).append(op)
    assert early or run.acked, f"no call acknowledged within {TIMEOUT}s; {message}"
    return run


def split_op(op: str) -> tuple[str, int]:
    """``r3-h5-17`` -> (``r3-h5``, 17): the client that sent it, and its sequence number."""
    client, _, n = op.rpartition("-")
    return client, int(n)


def sequences(ops: list[str]) -> dict[str, list[int]]:
    by_client: dict[str, list[int]] = collections.defaultdict(list)
    for op in ops:
        client, n = split_op(op)
        by_client[client].append(n)
    return by_client


async def read_tickers(target: Target) -> dict[str, tuple[int, float, float]]:
    """Each stored ticker's (count, first due, next due), read from its record."""
    store = target.store()
    await store.open()
    try:
        found = {}
        async for record in store.scan(worker.TickerServer.kind):
            state = json.loads(record.data)
            (tick,) = record.reminders
            assert tick.name == "tick" and tick.every == worker.TICK_EVERY, record
            found[record.key] = (state["count"], state["first_due"], tick.due)
        return found
    finally:
        await store.close()


async def read_store(
    target: Target,
) -> tuple[dict[str, list[str]], trio_pgs.SupervisorStatistics]:
    """Every ledger's applied ops, read through a fresh supervisor (as an application would)."""
    store = target.store()
    states: dict[str, list[str]] = {}
    async with PersistentSupervisor(store=store, servers=worker.SERVERS) as sup:
        with trio.fail_after(TIMEOUT):
            keys = []
            for cls in worker.SERVERS:
                async for record in store.scan(cls.kind):
                    assert not record.crashes and not record.quarantined, record
                    keys.append((cls, record.key))
            for cls, key in keys:
                states[key] = await sup.ref(cls, key).call("get")
        stats = sup.statistics()
    return states, stats


def make_target(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Target:
    if backend == "diskcache":
        return Target(backend, str(tmp_path / "store"))
    postgres: Server = request.getfixturevalue("postgres")
    schema = postgres.schema()
    name = f"trio-pgs-durability-{schema}"
    dsn = psycopg.conninfo.make_conninfo(postgres.dsn, application_name=name)
    return Target(backend, schema, dsn, name)


def connections_of(target: Target) -> int:
    """How many connections of the workers (and the check) the server still has."""
    with psycopg.connect(target.dsn, autocommit=True, application_name="trio-pgs-check") as db:
        row = db.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
            (target.application_name,),
        ).fetchone()
    assert row is not None
    return int(row[0])


@pytest.mark.parametrize("backend", worker.BACKENDS)
def test_every_acknowledged_call_survives_sigkill(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    target = make_target(backend, tmp_path, request)
    started = time.monotonic()
    rng = random.Random()
    # The last run is always killed mid-work, so that every server exists to be checked.
    early = [i % EARLY_EVERY == 0 and i < KILLS - 1 for i in range(KILLS)]
    runs = [run_worker(target, tmp_path, f"r{i}", early[i], rng) for i in range(KILLS)]
    worked = time.monotonic() - started

    # What the worker wrote is consistent: each client's acknowledgements are 0, 1, 2, ...
    for run in runs:
        for client, ns in sequences(run.acked).items():
            assert ns == list(range(len(ns))), f"{client}: acknowledgements out of order"
    acked = [op for run in runs for op in run.acked]
    assert acked, "no run acknowledged anything: the kills all came before any work"

    states, stats = trio.run(read_store, target)
    assert sorted(states) == sorted(worker.HOT + worker.NAPPING)
    assert stats.crashes == 0, stats  # every record decoded and activated
    stored = [op for ops in states.values() for op in ops]

    # Nothing applied twice.
    twice = [op for op, count in collections.Counter(stored).items() if count > 1]
    assert not twice, f"applied twice: {twice[:10]}"

    # Every acknowledged call is in the store.
    stored_set = set(stored)
    lost = [op for op in acked if op not in stored_set]
    assert not lost, f"{len(lost)} acknowledged call(s) lost, e.g. {lost[:10]}"

    # Nothing invented: per client, the store holds exactly what it sent, i.e. its
    # acknowledged ops, and perhaps the one op it was waiting on when the kill came.
    # A caster's accepted casts need not all be stored, but what is stored is a prefix
    # of what it sent (one sender, one server: handled and committed in order).
    acked_count = collections.Counter(split_op(op)[0] for run in runs for op in run.acked)
    cast_count = collections.Counter(split_op(op)[0] for run in runs for op in run.cast)
    by_client = sequences(stored)
    for client in [*acked_count, *cast_count]:  # a client with nothing stored is checked too
        by_client.setdefault(client, [])
    run_ids = {run.run_id for run in runs}
    for client, ns in by_client.items():
        run_id, _, role = client.partition("-")
        assert run_id in run_ids, f"stored ops of an unknown run: {client}"
        have = sorted(ns)
        if role.startswith(("h", "n")):
            count = acked_count[client]
            assert have in (list(range(count)), list(range(count + 1))), (
                f"{client}: acknowledged 0..{count - 1}, stored {have[:5]}...{have[-5:]}"
            )
        else:
            assert role.startswith("k"), f"stored ops of an unknown client: {client}"
            count = cast_count[client]
            assert have == list(range(len(have))) and len(have) <= count + 1, (
                f"{client}: {count} casts accepted, stored {have[:5]}...{have[-5:]}"
            )

    # Every tick of every ticker counted once: the count is the ticks from the first
    # one delivered to the reminder's next (a kill during a delivery left the tick due,
    # and it was delivered again; one folded with missed ticks counts them all).
    tickers = trio.run(read_tickers, target)
    assert sorted(tickers) == sorted(worker.TICKERS), "a ticker or its reminder was lost"
    for key, (count, first_due, next_due) in tickers.items():
        if count == 0:
            continue  # started, never ticked before the kills: nothing to count
        ticks = (next_due - first_due) / worker.TICK_EVERY
        assert abs(ticks - count) < 0.01, f"{key}: {count} ticks counted, {ticks:.2f} came"
    assert any(count for count, _, _ in tickers.values()), "no ticker ever ticked"

    if backend == "diskcache":  # the SQLite file itself is intact
        with contextlib.closing(sqlite3.connect(Path(target.where) / "cache.db")) as db:
            assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    else:  # the server ended the killed workers' sessions (and their transactions)
        deadline = time.monotonic() + TIMEOUT
        while connections_of(target) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert connections_of(target) == 0, "connections of killed workers remain"

    working = sum(1 for run in runs if run.acked)
    casts = sum(len(run.cast) for run in runs)
    print(
        f"\ndurability ({backend}): {KILLS} SIGKILLs survived ({working} mid-work, "
        f"{sum(run.early for run in runs)} at random moments from spawn); "
        f"{len(acked)} acknowledged calls checked, none lost; {len(stored)} ops stored, "
        f"none twice ({casts} casts accepted, {sum(1 for op in stored if '-k' in op)} "
        f"stored); {sum(count for count, _, _ in tickers.values())} reminder ticks "
        f"counted once each; workers {worked:.1f}s, "
        f"check {time.monotonic() - started - worked:.1f}s"
    )
