"""trio-pgs benchmarks: every trio-pgs figure next to its baselines, measured in the same run.

    python benchmarks/run.py [--only SECTION ...] [--scale full] [--rounds 3]
                             [--seconds 2] [--quick] [--markdown PATH]

Sections (all by default, in this order; ``--only`` picks some):

- ``calls``: persisted calls with 1, 100 and 1,000 servers against a hand-written
  ``to_thread(cache.set)`` per call and a hand-written group commit; an un-persisted
  call against a raw trio round trip (benchmarks/calls.py);
- ``modes``: EACH_MESSAGE, WRITE_BEHIND and ON_STOP with 100 servers: calls/s and
  store transactions per message, against the same baselines (benchmarks/calls.py);
- ``activation``: dormant -> first reply latency over 1,000 dormant servers, against
  spawning a trio task that reads the row with ``to_thread.run_sync(cache.get)``
  (benchmarks/activation.py);
- ``memory``: RSS per active idle server against a bare trio task blocked on a
  memory channel; bytes on disk and RAM per dormant server (benchmarks/memory.py);
- ``scale``: N servers started and hibernated; 1,000 random activations among D
  dormant records against the same among 10,000 (benchmarks/activation.py);
  ``--scale full`` uses N = 100,000 and D = 1,000,000;
- ``peer``: Pykka's ``ask()`` round trip against trio-pgs calls (benchmarks/peer.py);
- ``postgres``: `PostgresStore` persisted calls with 1, 100 and 1,000 servers against
  hand-written psycopg (a conditional UPDATE per call; 100 per transaction through
  ``executemany``; ``UPDATE ... FROM unnest``), and activation against one SELECT
  round trip (benchmarks/postgres.py). It uses the server of TRIO_PGS_POSTGRES_DSN,
  or starts a throwaway one with pgserver; skipped without psycopg (or without
  either server). ``--scale full``: 10,000 dormant servers, and every scenario runs
  ``--seconds`` long.
- ``cluster``: a persisted call forwarded to the node that owns its server against a
  local one (p50, p90), and 100 servers' calls/s on one node against three, every node
  a process on this machine (benchmarks/cluster.py); the same PostgreSQL as
  ``postgres``, skipped likewise.
- ``reminders``: supervisor startup time and RSS on a `DiskCacheStore` of 1,000,000
  dormant servers with one reminder each, against the same records without reminders
  (a fresh process per figure); 10,000 reminders due in the same second, delivered
  and committed per second, against 10,000 calls each activating a dormant server
  (benchmarks/reminders.py). ``--reminder-servers`` and ``--reminders-due`` change
  the sizes (``--quick``: 20,000 and 2,000).

Every figure is the median of ``--rounds`` rounds, each on a fresh temporary
directory (memory: in a fresh process). Compare ratios, not absolute figures:
machines (and their neighbours) differ.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable

import diskcache
import trio
from activation import activation_section, scale_section
from calls import calls_section, modes_section
from cluster import cluster_section
from common import Row, Section
from memory import memory_section
from peer import peer_section
from postgres import postgres_section
from reminders import reminders_section

import trio_pgs

SECTIONS = ("calls", "modes", "activation", "memory", "scale", "peer", "postgres", "cluster",
            "reminders")
#: --scale: (servers started and hibernated, dormant records, active servers for memory)
SCALES = {"default": (20_000, 200_000, 10_000), "full": (100_000, 1_000_000, 10_000)}


# -- the tables -----------------------------------------------------------------------------

HEADER = ("scenario", "trio-pgs", "baseline", "ratio", "target")


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


def markdown_section(section: Section) -> str:
    out = [f"### {section.title}", "", "| " + " | ".join(HEADER) + " |",
           "|---|---|---|--:|---|"]
    out += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row.cells()) + " |"
            for row in section.rows]
    out += ["", *(f"- {note}" for note in section.notes)]
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description="trio-pgs benchmarks, each figure beside baselines of the same run")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, metavar="SECTION",
                        help=f"run only these sections ({', '.join(SECTIONS)})")
    parser.add_argument("--scale", choices=sorted(SCALES), default="default",
                        help="sizes of the scale section: default (20,000 servers, "
                             "200,000 dormant records) or full (100,000 and 1,000,000); "
                             "full also runs the postgres section longer (10,000 "
                             "dormant servers)")
    parser.add_argument("--servers", type=int, help="servers started and hibernated "
                        "(overrides --scale)")
    parser.add_argument("--dormant", type=int, help="dormant records (overrides --scale)")
    parser.add_argument("--reminder-servers", type=int, metavar="N",
                        help="reminders section: dormant servers with one reminder each "
                             "at startup (default 1,000,000; --quick: 20,000)")
    parser.add_argument("--reminders-due", type=int, metavar="N",
                        help="reminders section: reminders due in the same second, and "
                             "calls of its baseline (default 10,000; --quick: 2,000)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per figure (median)")
    parser.add_argument("--seconds", type=float, default=2.0,
                        help="measured seconds per round of the 100-server scenarios "
                             "(the 1- and 1,000-server ones run half as long)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 1 round of 1 s, small sizes")
    parser.add_argument("--markdown", metavar="PATH",
                        help="also write the tables as Markdown to PATH")
    args = parser.parse_args()
    if args.rounds < 1 or args.seconds <= 0:
        parser.error("--rounds must be >= 1 and --seconds > 0")
    rounds, seconds = (1, 1.0) if args.quick else (args.rounds, args.seconds)
    servers, dormant, active = SCALES[args.scale]
    if args.quick:
        servers, dormant, active = 2_000, 20_000, 2_000
    servers = args.servers or servers
    dormant = args.dormant or dormant
    reminder_servers, reminders_due = (20_000, 2_000) if args.quick else (1_000_000, 10_000)
    if args.reminder_servers is not None:
        reminder_servers = args.reminder_servers
    if args.reminders_due is not None:
        reminders_due = args.reminders_due
    if reminder_servers < 1 or reminders_due < 1:
        parser.error("--reminder-servers and --reminders-due must be >= 1")
    if dormant <= 10_000:
        parser.error("--dormant must be above 10,000 (it is compared with 10,000)")
    chosen = args.only or list(SECTIONS)

    preamble = [
        f"Python {platform.python_version()} ({platform.python_implementation()}), "
        f"trio {trio.__version__}, diskcache {diskcache.__version__}, "
        f"trio-pgs {trio_pgs.__version__}; {platform.system()} {platform.machine()}, "
        f"{os.cpu_count()} CPUs",
        f"command: {shlex.join(['python', *sys.argv])}",
        f"median of {rounds} round(s); {seconds:g} s measured per round of the 100-server "
        f"scenarios; sections: {', '.join(s for s in SECTIONS if s in chosen)}",
    ]
    print("\n".join(preamble), flush=True)
    runs: dict[str, Callable[[], Section | None]] = {
        "calls": lambda: calls_section(seconds, rounds, args.quick),
        "modes": lambda: modes_section(seconds, rounds),
        "activation": lambda: activation_section(1000, rounds),
        "memory": lambda: memory_section(active, dormant, rounds),
        "scale": lambda: scale_section(servers, dormant, 1.0, rounds),
        "peer": lambda: peer_section(seconds, rounds),
        "postgres": lambda: postgres_section(seconds, rounds, args.quick,
                                             args.scale == "full"),
        "cluster": lambda: cluster_section(seconds, rounds),
        "reminders": lambda: reminders_section(reminder_servers, reminders_due, rounds),
    }
    began = time.perf_counter()
    sections = []
    for name in SECTIONS:
        if name in chosen:
            print(f"[{name}]", flush=True)
            section_began = time.perf_counter()
            section = runs[name]()
            if section is not None:
                section.notes.append(f"Section took {time.perf_counter() - section_began:.0f} s.")
                sections.append(section)
    print()
    for section in sections:
        print(f"== {section.title}\n{text_table(section.rows)}\n")
    print(f"ratio = trio-pgs / baseline (rates: higher is better; latencies and sizes: "
          f"lower is better); took {time.perf_counter() - began:.0f} s")
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as out:
            out.write("\n".join(line + "  " for line in preamble) + "\n\n")
            out.write("\n".join(markdown_section(section) for section in sections))
        print(f"Markdown tables written to {args.markdown}")


if __name__ == "__main__":
    main()
