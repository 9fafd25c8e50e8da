"""The persisted 100-server scenario alone, for a profiler.

    py-spy record --threads --format raw -o calls.txt -- \
        python benchmarks/profile_calls.py [SECONDS]
    python benchmarks/profile_calls.py --summary calls.txt

The summary lists, per thread, the functions where the samples were (self) and the
ones the samples were under (total), as shares of that thread's samples.
"""

from __future__ import annotations

import collections
import sys
import tempfile

import trio
from calls import pgs_persisted


def summary(path: str, top: int = 15) -> None:
    own: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    under: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    totals: collections.Counter[str] = collections.Counter()
    with open(path, encoding="utf-8") as raw:
        for line in raw:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            thread, *frames = stack.split(";")
            n = int(count)
            totals[thread] += n
            if frames:
                own[thread][frames[-1]] += n
            for frame in set(frames):
                under[thread][frame] += n
    for thread, total in totals.most_common():
        print(f"== {thread}: {total} samples")
        for title, counter in (("self", own[thread]), ("total", under[thread])):
            print(f"  -- {title}")
            for frame, n in counter.most_common(top):
                print(f"  {100 * n / total:5.1f}%  {frame}")


def main() -> None:
    if sys.argv[1:2] == ["--summary"]:
        summary(sys.argv[2])
        return
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 10.0
    with tempfile.TemporaryDirectory(prefix="trio-pgs-bench-") as directory:
        figure = trio.run(pgs_persisted, directory, 100, seconds)
    print(f"{figure.rate:,.0f} calls/s, batch {figure.batch}")


if __name__ == "__main__":
    main()
