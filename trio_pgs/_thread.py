"""A dedicated, long-lived thread for a blocking store library.

`trio.to_thread.run_sync` may pick a different OS thread for every call, even with a
`CapacityLimiter(1)`; libraries that keep per-thread connections (SQLite, so diskcache)
must see one thread for their whole life.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import TypeVar

import outcome
import trio

T = TypeVar("T")

_STOP = None


class DedicatedThread:
    """Runs the functions given to `run` one at a time, in order, on one OS thread."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name=self._name, daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while (job := self._jobs.get()) is not _STOP:
            job()

    async def run(self, fn: Callable[[], T]) -> T:
        """Run *fn* on the thread and return its result.

        Cancelled while *fn* is queued or running, the caller stops waiting (it gets
        `trio.Cancelled`) but *fn* still runs, in order with the other jobs, and its
        result is dropped: so a caller that must know whether a store operation
        happened treats a cancelled call as one whose outcome is unknown."""
        if self._thread is None:
            raise RuntimeError(f"{self._name} is not running")
        task = trio.lowlevel.current_task()
        token = trio.lowlevel.current_trio_token()
        abandoned = False

        def deliver(result: outcome.Outcome[T]) -> None:  # on the trio thread
            if not abandoned:
                trio.lowlevel.reschedule(task, result)

        def job() -> None:
            result = outcome.capture(fn)
            try:
                token.run_sync_soon(deliver, result)
            except trio.RunFinishedError:
                pass  # abandoned, and the trio run is over

        def abort(_: object) -> trio.lowlevel.Abort:
            nonlocal abandoned
            abandoned = True
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.checkpoint_if_cancelled()
        self._jobs.put(job)
        result: T = await trio.lowlevel.wait_task_rescheduled(abort)
        return result

    def post(self, fn: Callable[[], object]) -> None:
        """Run *fn* on the thread after the jobs queued before it, without waiting
        for it; what it raises is dropped."""
        if self._thread is None:
            raise RuntimeError(f"{self._name} is not running")

        def job() -> None:
            outcome.capture(fn)

        self._jobs.put(job)

    async def stop(self) -> None:
        """Let the queued jobs finish, then end the thread. Cancelled, it stops
        waiting: the thread (a daemon) ends once its jobs are done."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._jobs.put(_STOP)
        await trio.to_thread.run_sync(thread.join, abandon_on_cancel=True)
