"""Reminders (issue 15): what a due index costs at startup, and how fast due reminders
are delivered.

Section ``reminders`` of ``benchmarks/run.py``:

- startup: N dormant servers with one reminder each, due far in the future, on a
  `DiskCacheStore`, against the same N records without reminders. A fresh Python
  process per figure (``python benchmarks/reminders.py child startup ...``, STARTUPS
  per store and round, a round's figure their median) opens a supervisor and
  measures from just before the store object is made until the supervisor is
  entered and the Wakeups task has had its first look at the due index (the first
  `due` query returned), and the process's CPU time over the same span (wall time
  on a shared machine is mostly waiting), then its resident set size (``VmRSS``)
  and peak (``VmHWM``). Both stores are built once per run, their records written straight
  through `Store.commit` in transactions of 50,000 (``Put`` of a `Record`; a startup
  writes nothing, so every round reuses them);
- delivery: D dormant servers whose one-off reminders come due in the same second,
  against D plain calls to D other dormant servers (each call activates its server),
  on the same store, in the same process, rounds interleaved. Reminders: the records
  are written with their reminder due a few seconds ahead (wall clock, no autojump),
  a supervisor opens, and the figure runs from the due time until the writer has
  committed D records (every reminder handled by ``handle_info`` and its delivery
  committed). Calls: a supervisor opens on D fresh dormant records, D tasks each
  ``call("incr")`` one server (a commit each, like a delivery), from the first call
  until the writer has committed D records.

Standalone (what the section runs, with its own options)::

    python benchmarks/reminders.py --servers 1000000 --due 10000 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import trio
from common import Row, Section, directory_size, report

import trio_pgs
from trio_pgs import (
    CallResult,
    CastResult,
    Due,
    NoReply,
    PersistentServer,
    PersistentSupervisor,
    Put,
    Record,
    Reminder,
    Reply,
    StoredReminder,
    SupportsReminders,
)

HERE = os.path.dirname(os.path.abspath(__file__))
#: The stored bytes of a Ticker's state 0 (an int is JSON: what the writer stores).
STATE = b"0"
#: Records per store transaction when building the stores.
BATCH = 50_000
#: Reminders of the startup stores are due this far ahead (and one second apart).
FAR = 365 * 86400.0
#: Seconds between opening the delivery supervisor and its reminders coming due, at
#: least (the time to write the records is added).
LEAD = 2.0
#: Startup children per store and round (cheap, and noisy alone).
STARTUPS = 7


class Ticker(PersistentServer[int]):
    """Counts what it was given: a call ``"incr"`` or a reminder, each committed."""

    kind = "ticker"

    async def handle_call(self, request: Any, state: int) -> CallResult[int]:
        if request == "incr":
            return Reply(state + 1, state + 1)
        return Reply(state, state, persist=False)

    async def handle_info(self, message: Any, state: int) -> CastResult[int]:
        if isinstance(message, Reminder):
            return NoReply(state + 1)
        return NoReply(state)


def make_store(kind: str, directory: str) -> trio_pgs.Store:
    if kind == "diskcache":
        return trio_pgs.DiskCacheStore(directory)
    if kind == "memory":  # its due index sorts everything: small sizes only
        return _memory_stores.setdefault(directory, trio_pgs.MemoryStore())
    raise ValueError(f"unknown store {kind!r}")


_memory_stores: dict[str, trio_pgs.MemoryStore] = {}


def require_due_index(store: trio_pgs.Store) -> SupportsReminders:
    if not isinstance(store, SupportsReminders):
        raise SystemExit(f"{type(store).__name__} has no due index (SupportsReminders): "
                         "the reminders section cannot run on it")
    return store


async def write_records(store: trio_pgs.Store, prefix: str, count: int,
                        due: Callable[[int], float] | None) -> None:
    """Write *count* dormant tickers (keys ``{prefix}{i}``, state 0) through the store's
    commit API, BATCH per transaction; with *due*, ticker ``i`` has one reminder
    ``"tick"`` due at ``due(i)`` (a one-off, payload None)."""
    await store.open()
    try:
        now = time.time()
        for first in range(0, count, BATCH):
            await store.commit([
                Put(Record(kind=Ticker.kind, key=f"{prefix}{i}", data=STATE, updated_at=now,
                           reminders=() if due is None else
                           (StoredReminder("tick", due(i), None, "null"),)), 0)
                for i in range(first, min(count, first + BATCH))
            ])
    finally:
        await store.close()


def far_due(now: float) -> Callable[[int], float]:
    return lambda i: now + FAR + i


# -- startup, in a child process ------------------------------------------------------------


def memory_status() -> dict[str, int]:
    """VmRSS and VmHWM of this process, in bytes."""
    found = {}
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                found[name] = int(value.split()[0]) * 1024
    return found


async def child_startup(store_kind: str, where: str, servers: int,
                        reminders: bool) -> dict[str, Any]:
    if store_kind == "memory":  # nothing to reopen across processes: built here, untimed
        await write_records(make_store("memory", where), "s", servers,
                            far_due(time.time()) if reminders else None)
    began, cpu = time.perf_counter(), time.process_time()
    store = require_due_index(make_store(store_kind, where))
    looked = trio.Event()
    looks: list[float] = []  # how long each due query took
    due_index = store.due

    async def due(kinds: Sequence[str], *, after: Due | None = None,
                  limit: int = 1000) -> list[Due]:
        asked = time.perf_counter()
        entries = await due_index(kinds, after=after, limit=limit)
        looks.append(time.perf_counter() - asked)
        looked.set()
        return entries

    store.due = due  # type: ignore[method-assign]  # tells when Wakeups first looked
    async with PersistentSupervisor(store=store, servers=[Ticker]) as sup:  # type: ignore[arg-type]
        entered = time.perf_counter() - began
        await looked.wait()
        ready, cpu = time.perf_counter() - began, time.process_time() - cpu
        memory = memory_status()
        stats = sup.statistics()
        first = await due_index([Ticker.kind], limit=1)
    if stats.active or stats.activations:
        raise AssertionError(f"{stats.activations} servers were activated at startup")
    if bool(first) != reminders:
        raise AssertionError(f"the due index holds {first!r}, reminders={reminders}")
    if reminders and first[0].due < time.time() + FAR / 2:
        raise AssertionError(f"a reminder is due soon: {first[0]!r}")
    return {"entered": entered, "ready": ready, "look": looks[0], "cpu": cpu,
            "rss": memory["VmRSS"], "hwm": memory["VmHWM"]}


def run_startup_child(store_kind: str, where: str, servers: int,
                      reminders: bool) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, os.path.join(HERE, "reminders.py"), "child", "startup", store_kind,
         where, str(servers), "1" if reminders else "0"],
        capture_output=True, text=True,
    )
    if out.returncode:
        raise RuntimeError(f"startup child failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def child(argv: list[str]) -> None:
    if argv[0] != "startup":
        raise SystemExit(f"unknown child {argv[0]!r}")
    store_kind, where, servers, reminders = argv[1], argv[2], int(argv[3]), argv[4] == "1"
    print(json.dumps(trio.run(child_startup, store_kind, where, servers, reminders)))


@dataclass(frozen=True)
class Startup:
    ready: float  # seconds
    look: float  # seconds the first due query took
    cpu: float  # CPU seconds of the process (all threads) over the same span as ready
    rss: int
    hwm: int


def startup_rounds(store_kind: str, servers: int, rounds: int
                   ) -> tuple[list[Startup], list[Startup], tuple[float, float],
                              tuple[int, int]]:
    """Build both stores once, then *rounds* rounds of STARTUPS pairs of children (the
    order alternating), a round's figure the median of its children. Returns the
    rounds' figures with reminders, without, the seconds each build took and the
    size of each store on disk."""
    ours: list[Startup] = []
    theirs: list[Startup] = []
    with tempfile.TemporaryDirectory(prefix="trio-pgs-bench-") as with_dir, \
            tempfile.TemporaryDirectory(prefix="trio-pgs-bench-") as without_dir:
        built = []
        for directory, due in ((with_dir, far_due(time.time())), (without_dir, None)):
            began = time.perf_counter()
            if store_kind == "diskcache":
                trio.run(write_records, make_store(store_kind, directory), "s", servers, due)
            built.append(time.perf_counter() - began)
        print(f"  built the stores of {servers:,} dormant servers in {built[0]:.0f} s (with "
              f"reminders) and {built[1]:.0f} s (without)", flush=True)
        for n in range(rounds):
            got: dict[bool, list[Startup]] = {True: [], False: []}
            for i in range(STARTUPS):
                for reminders in ((True, False) if i % 2 == 0 else (False, True)):
                    out = run_startup_child(store_kind,
                                            with_dir if reminders else without_dir,
                                            servers, reminders)
                    got[reminders].append(Startup(out["ready"], out["look"], out["cpu"],
                                                          out["rss"], out["hwm"]))
            ours.append(median_startup(got[True]))
            theirs.append(median_startup(got[False]))
            print(f"  round {n + 1}: startup {ours[-1].ready * 1e3:,.1f} ms with reminders, "
                  f"{theirs[-1].ready * 1e3:,.1f} ms without; RSS {mib(ours[-1].rss)} / "
                  f"{mib(theirs[-1].rss)}", flush=True)
        sizes = (directory_size(with_dir), directory_size(without_dir))
    return ours, theirs, (built[0], built[1]), sizes


def median_startup(figures: list[Startup]) -> Startup:
    return Startup(statistics.median(f.ready for f in figures),
                   statistics.median(f.look for f in figures),
                   statistics.median(f.cpu for f in figures),
                   int(statistics.median(f.rss for f in figures)),
                   int(statistics.median(f.hwm for f in figures)))


def mib(size: float) -> str:
    return f"{size / 2**20:,.1f} MiB"


# -- delivery, in this process --------------------------------------------------------------


@dataclass(frozen=True)
class Delivery:
    rate: float  # handled and committed per second
    seconds: float  # from due (or first call) to the last commit
    late_open: float  # reminders: seconds the supervisor was ready after the due time


class Committed:
    """An ``on_event`` hook: the wall-clock time at which the writer had committed
    *target* records in all."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.records = 0
        self.at: float | None = None
        self.done = trio.Event()

    def __call__(self, event: trio_pgs.ServerEvent) -> None:
        if event.type is trio_pgs.EventType.COMMITTED:
            self.records += event.records
            if self.at is None and self.records >= self.target:
                self.at = time.time()
                self.done.set()


async def deliver_reminders(store_kind: str, directory: str, prefix: str,
                            count: int) -> Delivery:
    """*count* dormant tickers whose reminder comes due at the same moment, a little
    after their supervisor has opened; delivered and committed per second."""
    began = time.time()
    write_began = time.perf_counter()
    # The due time: an estimate of the write's time for the write, as much again for
    # the supervisor's opening, then LEAD seconds (a late opening is reported below).
    estimate = max(1.0, count / 5_000)
    due = began + 2 * estimate + LEAD
    await write_records(make_store(store_kind, directory), prefix, count, lambda i: due)
    written = time.perf_counter() - write_began
    committed = Committed(count)
    store = require_due_index(make_store(store_kind, directory))
    async with PersistentSupervisor(store=store, servers=[Ticker],  # type: ignore[arg-type]
                                    on_event=committed) as sup:
        ready = time.time()
        await committed.done.wait()
        stats = sup.statistics()
        left = await store.due([Ticker.kind], limit=1)
    if stats.reminders != count or stats.woken_by_reminders != count:
        raise AssertionError(f"{stats.reminders} reminders delivered, "
                             f"{stats.woken_by_reminders} servers woken, for {count}")
    if left:
        raise AssertionError(f"a reminder is still in the due index: {left[0]!r}")
    await check_states(store_kind, directory, prefix, count)
    if ready > due:
        print(f"  (the records took {written:.1f} s to write and the supervisor was ready "
              f"{ready - due:.2f} s after the due time: measured from then)", flush=True)
    assert committed.at is not None
    start = max(due, ready)
    return Delivery(count / (committed.at - start), committed.at - start,
                    max(0.0, ready - due))


async def plain_calls(store_kind: str, directory: str, prefix: str, count: int) -> Delivery:
    """*count* dormant tickers, each called once at the same moment (``incr``: each
    call activates its server and commits); calls committed per second."""
    await write_records(make_store(store_kind, directory), prefix, count, None)
    committed = Committed(count)
    store = make_store(store_kind, directory)
    async with PersistentSupervisor(store=store, servers=[Ticker],
                                    on_event=committed) as sup:
        await trio.sleep(LEAD)  # as settled as the reminders' supervisor at its due time
        start = time.time()
        async with trio.open_nursery() as nursery:
            for i in range(count):
                nursery.start_soon(sup.ref(Ticker, f"{prefix}{i}").call, "incr")
        await committed.done.wait()
        stats = sup.statistics()
    if stats.activations != count or stats.messages != count:
        raise AssertionError(f"{stats.activations} activations, {stats.messages} calls "
                             f"handled, for {count}")
    await check_states(store_kind, directory, prefix, count)
    assert committed.at is not None
    return Delivery(count / (committed.at - start), committed.at - start, 0.0)


async def check_states(store_kind: str, directory: str, prefix: str, count: int) -> None:
    """Every ticker of the group handled exactly one message, and it is committed."""
    store = make_store(store_kind, directory)
    await store.open()
    try:
        for i in range(count):
            record = await store.load(Ticker.kind, f"{prefix}{i}")
            if record is None or record.data != b"1" or record.reminders:
                raise AssertionError(f"{prefix}{i}: {record!r}")
    finally:
        await store.close()


def delivery_rounds(store_kind: str, count: int, rounds: int
                    ) -> tuple[list[Delivery], list[Delivery]]:
    ours: list[Delivery] = []
    theirs: list[Delivery] = []
    with tempfile.TemporaryDirectory(prefix="trio-pgs-bench-") as directory:
        for n in range(rounds):
            order = ("reminders", "calls") if n % 2 == 0 else ("calls", "reminders")
            for what in order:
                if what == "reminders":
                    ours.append(trio.run(deliver_reminders, store_kind, directory,
                                         f"r{n}-", count))
                else:
                    theirs.append(trio.run(plain_calls, store_kind, directory,
                                           f"p{n}-", count))
            print(f"  round {n + 1}: {ours[-1].rate:,.0f} reminders/s "
                  f"({ours[-1].seconds:.2f} s), {theirs[-1].rate:,.0f} calls/s "
                  f"({theirs[-1].seconds:.2f} s)", flush=True)
        _memory_stores.pop(directory, None)
    return ours, theirs


# -- the section ----------------------------------------------------------------------------


def reminders_section(servers: int, due: int, rounds: int,
                      store_kind: str = "diskcache") -> Section | None:
    with tempfile.TemporaryDirectory(prefix="trio-pgs-bench-") as directory:
        if not isinstance(make_store(store_kind, directory), SupportsReminders):
            print(f"  skipped: this trio-pgs' {store_kind} store has no due index "
                  "(SupportsReminders)", flush=True)
            return None
    rows = []
    ours, theirs, built, sizes = startup_rounds(store_kind, servers, rounds)
    name = f"supervisor startup, {servers:,} dormant servers with 1 reminder each"
    ready = statistics.median(s.ready for s in ours)
    base = statistics.median(s.ready for s in theirs)
    report(name, "trio-pgs", f"{ready * 1e3:,.1f} ms")
    report(name, "without reminders", f"{base * 1e3:,.1f} ms")
    rows.append(Row(name, f"{ready * 1e3:,.1f} ms", "same records without reminders",
                    f"{base * 1e3:,.1f} ms", ready / base, "<= 1.1x", ready / base <= 1.1))
    cpu = statistics.median(s.cpu for s in ours)
    base_cpu = statistics.median(s.cpu for s in theirs)
    rows.append(Row(f"{name}, CPU time", f"{cpu * 1e3:,.1f} ms", "same",
                    f"{base_cpu * 1e3:,.1f} ms", cpu / base_cpu))
    name = f"process RSS after startup, {servers:,} dormant servers with 1 reminder each"
    rss = statistics.median(s.rss for s in ours)
    base_rss = statistics.median(s.rss for s in theirs)
    report(name, "trio-pgs", mib(rss))
    report(name, "without reminders", mib(base_rss))
    rows.append(Row(name, mib(rss), "same records without reminders", mib(base_rss),
                    rss / base_rss, "<= 1.1x", rss / base_rss <= 1.1))

    delivered, called = delivery_rounds(store_kind, due, rounds)
    name = f"{due:,} reminders due in the same second, delivered and committed"
    rate = statistics.median(d.rate for d in delivered)
    base_rate = statistics.median(d.rate for d in called)
    report(name, "trio-pgs", f"{rate:,.0f} /s")
    report(name, "plain calls to dormant servers", f"{base_rate:,.0f} /s")
    rows.append(Row(name, f"{rate:,.0f} reminders/s", f"{due:,} calls, each to a dormant server",
                    f"{base_rate:,.0f} calls/s", rate / base_rate, ">= 0.5x",
                    rate / base_rate >= 0.5))

    def per_round(figures: list[float], digits: int = 2) -> str:
        return " / ".join(f"{f:.{digits}f}" for f in figures)

    late = [d.late_open for d in delivered if d.late_open > 0]
    notes = [
        f"Store: {'DiskCacheStore' if store_kind == 'diskcache' else 'MemoryStore'}; "
        f"{rounds} round(s), figures are medians, rounds interleaved (the order "
        "alternating).",
        f"Startup: a fresh process per figure, {STARTUPS} per store and round (in "
        "alternating order; a round's figure is their median), from making the store "
        "object to the supervisor entered and the Wakeups task's first look at the due "
        "index done (its first `due` query returned); CPU time = `time.process_time()` over "
        "the same span (every thread of the process); RSS = VmRSS then. Both stores were "
        f"built once for the run ({built[0]:.0f} s with reminders, {built[1]:.0f} s "
        f"without; records written straight through `Store.commit`, {BATCH:,} per "
        "transaction) and reused by every round (a startup writes nothing); on disk "
        f"{mib(sizes[0])} with reminders, {mib(sizes[1])} without. Reminders due a year "
        "ahead, a second apart. Ratios of each round: startup "
        + per_round([a.ready / b.ready for a, b in zip(ours, theirs, strict=True)])
        + "; CPU " + per_round([a.cpu / b.cpu for a, b in zip(ours, theirs, strict=True)])
        + "; RSS " + per_round([a.rss / b.rss for a, b in zip(ours, theirs, strict=True)])
        + ". The first look at the index alone (its `due` query, on the store's thread): "
        f"{statistics.median(s.look for s in ours) * 1e3:.2f} ms with reminders, "
        f"{statistics.median(s.look for s in theirs) * 1e3:.2f} ms without"
        + f". Peak RSS (VmHWM): {mib(statistics.median(s.hwm for s in ours))} with "
        f"reminders, {mib(statistics.median(s.hwm for s in theirs))} without.",
        f"Delivery: {due:,} records written with one-off reminders all due at the same "
        "instant (wall clock, a few seconds ahead), then a supervisor opened: from the due "
        "time until the writer had committed as many records (`on_event` COMMITTED), "
        "every delivery checked afterwards (state 1, no reminder left, index empty). "
        f"Baseline: {due:,} other dormant records, a supervisor opened, and after "
        f"{LEAD:g} s one task per server doing `call(\"incr\")` at once, from the first "
        "call until as many records were committed. Same store directory (it grows by "
        "both groups each round), same process. Ratios of each round: "
        + per_round([a.rate / b.rate for a, b in zip(delivered, called, strict=True)])
        + ".",
    ]
    if late:
        notes.append(f"In {len(late)} round(s) the supervisor was ready only after the "
                     "reminders' due time (by " + per_round(late) + " s): measured from "
                     "when it was ready.")
    return Section("Reminders", rows, notes)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        child(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description="the reminders benchmark section alone")
    parser.add_argument("--servers", type=int, default=1_000_000,
                        help="dormant servers of the startup figures (default 1,000,000)")
    parser.add_argument("--due", type=int, default=10_000,
                        help="reminders due at once, and calls of the baseline")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--store", choices=("diskcache", "memory"), default="diskcache")
    args = parser.parse_args()
    section = reminders_section(args.servers, args.due, args.rounds, args.store)
    if section is None:
        return
    for row in section.rows:
        print(" | ".join(row.cells()))
    for note in section.notes:
        print(f"- {note}")


if __name__ == "__main__":
    main()
