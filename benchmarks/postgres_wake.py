"""A burst of activations on PostgreSQL: N dormant servers called at once.

    python benchmarks/postgres_wake.py [DSN] [N]

On the PostgreSQL of *DSN* (else ``TRIO_PGS_POSTGRES_DSN``), in a fresh schema dropped
after: N (1,000) dormant counters, then one ``call("peek")`` to each, all at once.
Prints the time until the last first reply (docs/performance.md, "A burst of
activations").
"""

from __future__ import annotations

import sys
import time

import trio
from common import Counter
from postgres import Database, write_dormant

import trio_pgs


async def wake(db: Database, servers: int) -> str:
    with db.schema() as schema:
        await write_dormant(db, schema, servers)
        store = trio_pgs.PostgresStore(db.dsn, schema=schema)
        async with trio_pgs.PersistentSupervisor(store=store, servers=[Counter]) as sup:
            began = time.perf_counter()
            async with trio.open_nursery() as nursery:
                for i in range(servers):
                    nursery.start_soon(sup.ref(Counter, f"c{i}").call, "peek")
            took = time.perf_counter() - began
            if sup.statistics().activations != servers:
                raise AssertionError("every call should have activated a dormant server")
    return f"{servers:,} dormant servers woken in {1000 * took:,.0f} ms"


def main() -> None:
    db = Database.from_argv("postgres_wake.py DSN [N]")
    servers = int(sys.argv[2]) if len(sys.argv) > 2 else 1000
    print(trio.run(wake, db, servers))


if __name__ == "__main__":
    main()
