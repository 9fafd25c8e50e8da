"""A peer: Pykka, an in-memory, thread-based actor library.

Section ``peer`` of ``benchmarks/run.py``: ``actor_ref.ask(message)`` round trips on
one actor, from the main thread, in a loop (a warm-up, then the measured window),
against trio-pgs' un-persisted and persisted calls, 1 server x 1 caller. Pykka keeps
nothing on disk: the persisted row compares a durable call with an in-memory one.
Needs the ``bench`` extra (``pip install -e '.[bench]'``).
"""

from __future__ import annotations

import importlib.metadata
import statistics
import time

from calls import persisted_figure, rate_cell, unpersisted_figure
from common import WARMUP, Row, Section, report


def pykka_rate(seconds: float) -> float:
    import pykka

    class CounterActor(pykka.ThreadingActor):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.state = 0

        def on_receive(self, message: object) -> int:
            if message == "incr":
                self.state += 1
            return self.state

    ref = CounterActor.start()
    try:
        warm_until = time.perf_counter() + WARMUP * seconds
        while time.perf_counter() < warm_until:
            ref.ask("peek")
        calls = 0
        began = time.perf_counter()
        end = began + seconds
        while (now := time.perf_counter()) < end:
            ref.ask("incr")
            calls += 1
        return calls / (now - began)
    finally:
        ref.stop()


def peer_section(seconds: float, rounds: int) -> Section | None:
    try:
        version = importlib.metadata.version("pykka")
    except importlib.metadata.PackageNotFoundError:
        print("  peer: pykka is not installed (pip install -e '.[bench]'); skipped",
              flush=True)
        return None
    half = seconds / 2  # the same windows as the Calls section's 1-server rows
    theirs = statistics.median(pykka_rate(half) for _ in range(rounds))
    report("1 actor x 1 caller", f"pykka {version} ask()", f"{theirs:,.0f} calls/s")
    baseline = f"pykka {version} ask() round trip"
    rows = []
    for name, ours in [
        ("un-persisted call, 1 server x 1 caller", unpersisted_figure(half, rounds)),
        ("persisted call, 1 server x 1 caller", persisted_figure(1, half, rounds)),
    ]:
        rows.append(Row(name, rate_cell(ours), baseline, f"{theirs:,.0f} calls/s",
                        ours.rate / theirs))
    notes = [
        "Pykka: one ThreadingActor, `ref.ask(message)` (send, then block on the reply "
        "future) from the main thread; the actor runs on its own thread, so every round "
        "trip crosses threads twice. trio-pgs rows are the Calls section's figures.",
    ]
    return Section("Peer: Pykka", rows, notes)
