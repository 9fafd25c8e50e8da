"""Progress for the examples' long steps (not part of trio-pgs).

On a terminal, one status line rewritten in place a few times a second, and erased when
the step ends; in a pipe or a file, a plain line every few seconds, so that a log shows
what happened without a screenful of carriage returns.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
from collections.abc import AsyncIterator, Callable

import trio

#: Seconds between two redraws of the line on a terminal.
REDRAW_EVERY = 0.2


def on_terminal() -> bool:
    return sys.stdout.isatty()


@contextlib.asynccontextmanager
async def progress(describe: Callable[[float], str], *, every: float = 2.0) -> AsyncIterator[None]:
    """Show ``describe(seconds since the step started)`` while the body runs.

    On a terminal the line is redrawn every REDRAW_EVERY seconds (cut to the terminal's
    width, since a wrapped line cannot be redrawn) and erased at the end; in a pipe it is
    printed every *every* seconds, so a step shorter than that prints nothing.
    """
    terminal = on_terminal()
    started = trio.current_time()

    async def report() -> None:
        while True:
            await trio.sleep(REDRAW_EVERY if terminal else every)
            line = describe(trio.current_time() - started)
            if terminal:
                width = shutil.get_terminal_size().columns - 1
                print(f"\r\033[K{line[:width]}", end="", flush=True)
            else:
                print(line, flush=True)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(report)
            yield
            nursery.cancel_scope.cancel()
    finally:
        if terminal:
            print("\r\033[K", end="", flush=True)
