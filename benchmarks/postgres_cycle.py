"""Where a cycle of the 100-server PostgreSQL scenario goes: the commit, and the trio thread.

    python benchmarks/postgres_cycle.py [DSN] [SECONDS]

On the PostgreSQL of *DSN* (else ``TRIO_PGS_POSTGRES_DSN``), in a fresh schema dropped
after: 100 counters, one closed-loop caller each (``call("incr")``, every call commits),
for *SECONDS* (5). Prints calls/s, the store transactions (the writer's batches), the
time of a cycle (a batch: 100 calls), the commit's wall time per batch (the writer's
``COMMITTED`` events) and the CPU the trio thread spent per batch (``time.thread_time``):
the part of the cycle the runtime, not the store, takes.
"""

from __future__ import annotations

import sys
import time

import trio
from common import drive, start_counters
from postgres import Database

import trio_pgs


async def cycle(db: Database, seconds: float) -> str:
    commits: list[float] = []

    def on_event(event: trio_pgs.ServerEvent) -> None:
        if event.type is trio_pgs.EventType.COMMITTED:
            commits.append(event.seconds)

    with db.schema() as schema:
        store = trio_pgs.PostgresStore(db.dsn, schema=schema)
        async with trio_pgs.PersistentSupervisor(store=store, on_event=on_event) as sup:
            refs = await start_counters(sup, 100)
            commits.clear()
            wall, cpu = time.perf_counter(), time.thread_time()
            result = await drive(100, seconds, lambda i: refs[i].call("incr"))
            wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
    n = len(commits)
    return (
        f"{result.rate:,.0f} calls/s; {n} batches; cycle {1000 * wall / n:.2f} ms; "
        f"commit {1000 * sum(commits) / n:.2f} ms; trio-thread CPU {1000 * cpu / n:.2f} ms"
    )


def main() -> None:
    db = Database.from_argv("postgres_cycle.py DSN [SECONDS]")
    seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 5.0
    print(trio.run(cycle, db, seconds))


if __name__ == "__main__":
    main()
