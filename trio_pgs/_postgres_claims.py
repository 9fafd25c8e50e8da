"""Claims, many to a statement: a burst of activations (a restart's PERMANENT servers,
a broadcast to dormant servers) claims its servers together.

Rule of this module: a claim raises its record's epoch once, for one claimer. A
statement holds at most one claim of each record (a second claim of the same record
waits for the next statement: each claim must fence the one before), and each
claimer gets its own record's row; a statement that fails fails the claims it held
and no other.

A claim made while no statement runs goes at once, alone (the statement of a single
claim, as before); claims made while one runs go together in the next, as the
group-commit writer batches writes. The statement runs on a worker thread that
nobody's cancellation stops: a claimer that stops waiting leaves its claim to the
others' statement, which may raise its record's epoch all the same, as a claim
cancelled on the server might have (the next claim raises it again).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

import outcome
import trio

Ident = tuple[str, str]
#: What a statement gives back: the claimed row of each record that has one.
Rows = dict[Ident, tuple[Any, ...]]
#: Runs the statement for some records off the trio thread, then calls the function
#: it is given, in the trio thread, with the statement's outcome (`Rows`).
Start = Callable[[list[Ident], Callable[[outcome.Outcome[Rows]], None]], None]
#: The most claims in one statement.
MOST = 1000


class _Waiter:
    __slots__ = ("done", "result")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.result: outcome.Outcome[tuple[Any, ...] | None] | None = None


class Claims:
    """The claims of one store, each statement started by *start*."""

    def __init__(self, start: Start) -> None:
        self._start = start
        #: The claims waiting for a statement, in order, per record.
        self._pending: dict[Ident, deque[_Waiter]] = {}
        self._running = False
        #: The trio run of the statement running: one whose run ended never reports.
        self._run: trio.lowlevel.TrioToken | None = None
        #: Statements run, and claims they held (for the statistics of tests).
        self.statements = 0
        self.claims = 0

    async def claim(self, kind: str, key: str) -> tuple[Any, ...] | None:
        """The row of (*kind*, *key*) once its epoch is raised, or None if it has no
        row. The statement's error if it failed."""
        ident = (kind, key)
        if self._running and self._run is not trio.lowlevel.current_trio_token():
            # A statement of an earlier trio run, which ended before it did: its
            # claimers are gone, and it will never report.
            self._pending, self._running = {}, False
        waiter = _Waiter()
        self._pending.setdefault(ident, deque()).append(waiter)
        if not self._running:
            self._next()
        try:
            await waiter.done.wait()
        except BaseException:
            waiting = self._pending.get(ident)
            if waiting is not None and waiter in waiting:  # not sent yet: never will be
                waiting.remove(waiter)
                if not waiting:
                    del self._pending[ident]
            raise
        assert waiter.result is not None
        return waiter.result.unwrap()

    def _next(self) -> None:
        """Send the first waiting claim of each record (up to `MOST`), if any."""
        if not self._pending:
            self._running = False
            return
        batch: list[tuple[Ident, _Waiter]] = []
        for ident in list(self._pending)[:MOST]:
            waiting = self._pending[ident]
            batch.append((ident, waiting.popleft()))
            if not waiting:
                del self._pending[ident]
        self._running = True
        self._run = trio.lowlevel.current_trio_token()
        self.statements += 1
        self.claims += len(batch)
        try:
            self._start([ident for ident, _ in batch], lambda result: self._done(batch, result))
        except Exception as exc:  # not started (the store is closed, say)
            self._done(batch, outcome.Error(exc))

    def _done(self, batch: list[tuple[Ident, _Waiter]], result: outcome.Outcome[Rows]) -> None:
        """In the trio thread: each claimer of *batch* gets its row (or the error, an
        exception of its own: each is raised in its own task)."""
        for ident, waiter in batch:
            if isinstance(result, outcome.Value):
                waiter.result = outcome.Value(result.value.get(ident))
            else:
                assert isinstance(result, outcome.Error)
                waiter.result = outcome.Error(_own(result.error))
            waiter.done.set()
        self._next()


def _own(error: BaseException) -> BaseException:
    """A copy of *error* for one claimer (caused by it), or *error* itself if its type
    cannot be made again from its arguments."""
    try:
        copy = type(error)(*error.args)
    except Exception:
        return error
    copy.__cause__ = error.__cause__ or error
    return copy
