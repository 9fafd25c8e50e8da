"""Ctrl-C for real: SIGINT to a process whose WRITE_BEHIND servers hold acknowledged
states that only the shutdown writes. Every acknowledged value must be stored, and the
process must end with KeyboardInterrupt itself (not an exception group) within its
shutdown deadline. Real processes and real time, necessarily."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import trio

from trio_pgs import DiskCacheStore

from . import interrupt_worker as worker

WORKER = Path(worker.__file__)
RUNS = 5


def run_until_interrupted(directory: Path, acks: int) -> tuple[dict[str, int], str, float]:
    """Run the worker until it acknowledged *acks* calls, SIGINT it, and return what
    it acknowledged, its stderr and how long it took to exit after the signal."""
    acked: dict[str, int] = {}

    def note(line: str) -> None:
        if line.strip() != "ready":
            key, value = line.split()
            acked[key] = max(acked.get(key, 0), int(value))

    with subprocess.Popen(
        [sys.executable, str(WORKER), str(directory)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    ) as process:
        assert process.stdout is not None and process.stderr is not None
        try:
            for seen, line in enumerate(process.stdout, 1):
                note(line)
                if seen >= acks:
                    break
            process.send_signal(signal.SIGINT)
            interrupted = time.monotonic()
            for line in process.stdout:  # acknowledged before the signal landed
                note(line)
            stderr = process.stderr.read()
            process.wait(timeout=30)
            took = time.monotonic() - interrupted
        finally:
            if process.poll() is None:
                process.kill()
    assert process.returncode == 130, stderr[-3000:]
    return acked, stderr, took


async def stored_values(directory: Path) -> dict[str, int]:
    store = DiskCacheStore(directory)
    await store.open()
    try:
        return {
            record.key: json.loads(record.data)
            async for record in store.scan(worker.Counter.kind)
        }
    finally:
        await store.close()


def test_ctrl_c_commits_every_acknowledged_write_behind_state(tmp_path: Path) -> None:
    directory = tmp_path / "state"
    rng = random.Random()
    acked: dict[str, int] = {}
    for _ in range(RUNS):
        run_acked, stderr, took = run_until_interrupted(directory, rng.randrange(50, 1000))
        for key, value in run_acked.items():
            acked[key] = max(acked.get(key, 0), value)
        assert stderr.endswith("interrupted\n"), stderr[-3000:]  # nothing else came out
        assert took < 2 + 1 + 10, f"exit took {took:.1f} s"  # deadline, grace, a slow CI
        stored = trio.run(stored_values, directory)
        lost = {k: (v, stored.get(k)) for k, v in acked.items() if stored.get(k, 0) < v}
        assert not lost, f"acknowledged but not stored (acked, stored): {lost}"
