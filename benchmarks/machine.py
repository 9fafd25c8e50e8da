"""What this machine and trio allow, under the PostgreSQL figures of docs/performance.md.

    python benchmarks/machine.py

Prints two things, each the best of 3:

- CPU contention: the CPU time (``time.thread_time``) a pure-Python loop takes alone,
  then while another process spins on the other cores. On a machine whose cores slow
  each other (shared physical cores, an oversubscribed host), the second is larger:
  the database server's work then slows the trio thread whenever the two overlap.
- trio's floor: the CPU time of one round trip between two tasks (two task
  switches), through a trio memory channel and through trio-pgs's `Mailbox`. A
  persisted call is two such switches (the server's task, then the caller's).
"""

from __future__ import annotations

import multiprocessing
import os
import time
from typing import Any

import trio

from trio_pgs._mailbox import Mailbox

LOOP = 2_000_000
ROUND_TRIPS = 100_000


def _work() -> float:
    start = time.thread_time()
    total = 0
    for i in range(LOOP):
        total += i * i
    return time.thread_time() - start


def _spin(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def contention() -> tuple[float, float]:
    alone = min(_work() for _ in range(3))
    others = max(1, (os.cpu_count() or 2) - 1)
    spinners = [multiprocessing.Process(target=_spin, args=(alone * 3 * 3,))
                for _ in range(others)]
    for spinner in spinners:
        spinner.start()
    try:
        time.sleep(0.2)
        shared = min(_work() for _ in range(3))
    finally:
        for spinner in spinners:
            spinner.join()
    return alone, shared


async def _ping_pong(make: Any) -> float:
    to_server_send, to_server_receive = make()
    to_client_send, to_client_receive = make()

    async def server() -> None:
        for _ in range(ROUND_TRIPS):
            to_client_send.send_nowait(await to_server_receive.receive())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(server)
        start = time.thread_time()
        for i in range(ROUND_TRIPS):
            to_server_send.send_nowait(i)
            await to_client_receive.receive()
        return (time.thread_time() - start) / ROUND_TRIPS


def _channel() -> Any:
    return trio.open_memory_channel[int](100)


def _mailbox() -> Any:
    box = Mailbox[int](100)
    return box, box


async def floor() -> tuple[float, float]:
    channel = min([await _ping_pong(_channel) for _ in range(3)])
    mailbox = min([await _ping_pong(_mailbox) for _ in range(3)])
    return channel, mailbox


def main() -> None:
    alone, shared = contention()
    print(f"CPU contention: a Python loop takes {alone * 1e3:.0f} ms of CPU alone, "
          f"{shared * 1e3:.0f} ms while the other cores are busy ({shared / alone:.2f}x)")
    channel, mailbox = trio.run(floor)
    print(f"trio's floor: a round trip between two tasks (two task switches) costs "
          f"{channel * 1e6:.1f} us of CPU through a trio memory channel, "
          f"{mailbox * 1e6:.1f} us through trio-pgs's Mailbox")


if __name__ == "__main__":
    main()
