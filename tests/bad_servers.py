"""Servers that misbehave on purpose, and helpers, for tests/test_bad_inputs.py."""

from __future__ import annotations

import logging
import os
import sys
import threading
from typing import Any

import trio

from trio_pgs import MemoryStore, PersistentSupervisor, Reply

from .servers import Tally, TallyServer

#: What unpickling a `Trap` did: it must stay empty (trio-pgs never unpickles).
SPRUNG: list[str] = []


class Trap:
    """Pickles to a call of ``SPRUNG.append``: unpickling it shows."""

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (SPRUNG.append, ("unpickled",))


class Careless(TallyServer):
    """A tally server whose mistakes are on request."""

    kind = "careless"

    async def init(self, *items: Any) -> Any:
        match items:
            case ("init-returns", value):
                await trio.lowlevel.checkpoint()
                return value
            case ("init-forgets-await",):
                return self._first_state()  # no await: a coroutine
            case ("init-raises",):
                raise LookupError("init failed on purpose")
        return await super().init(*items)

    async def _first_state(self) -> Tally:
        await trio.lowlevel.checkpoint()
        return Tally()

    async def _reply(self, state: Tally) -> Any:
        await trio.lowlevel.checkpoint()
        return state

    async def handle_call(self, request: Any, state: Tally) -> Any:
        match request:
            case "forget-await":
                return self._reply(state)  # no await: a coroutine
            case ("send-after", delay):
                self.send_after(delay, "tick")
                return Reply("armed", state)
        return await super().handle_call(request, state)

    async def handle_info(self, message: Any, state: Tally) -> Any:
        match message:
            case ("return", value):
                await trio.lowlevel.checkpoint()
                return value
        return await super().handle_info(message, state)


class ForgetfulActivation(TallyServer):
    """`on_activate` returns a coroutine instead of a state."""

    kind = "forgetful"

    async def on_activate(self, state: Tally) -> Any:
        return self._state(state)  # no await: a coroutine

    async def _state(self, state: Tally) -> Tally:
        await trio.lowlevel.checkpoint()
        return state


def _broken_migration(raw: Any) -> Any:
    raise KeyError("the migration expected a field that is not there")


class Migrating(TallyServer):
    """At state_version 2, with a migration from 1 that raises."""

    kind = "migrating"
    state_version = 2
    migrations = {1: _broken_migration}


class Narrow(TallyServer):
    """A mailbox of one message."""

    kind = "narrow"
    mailbox_size = 1


class BadTimeout(TallyServer):
    """A class attribute that is not a valid option (found at registration)."""

    kind = "bad.timeout"
    idle_timeout = -1.0


def call_from_another_trio_run() -> None:
    """Run in a subprocess: a ref used from another thread's ``trio.run``.

    Prints ``ERROR <type> <message>`` for what the foreign call raised, then ``ALIVE``
    if the server still answers its own supervisor's callers, and ``CLOSED`` once the
    supervisor shut down. A watchdog ends the process if anything hangs.
    """
    logging.disable(logging.CRITICAL)
    threading.Timer(6, os._exit, (3,)).start()

    async def foreign(ref: Any) -> Any:
        with trio.fail_after(2):
            return await ref.call("get")

    def in_thread(ref: Any) -> str:
        try:
            trio.run(foreign, ref)
        except BaseException as exc:  # whatever it is, it is the observation
            return f"ERROR {type(exc).__name__} {exc}"
        return "ERROR none the call returned"

    async def main() -> None:
        async with PersistentSupervisor(
            store=MemoryStore(), name="main", shutdown_timeout=1
        ) as sup:
            ref = await sup.start(TallyServer, "v1", key="v")
            print(await trio.to_thread.run_sync(in_thread, ref), flush=True)
            with trio.fail_after(2):
                assert await ref.call("get") == ["v1"]
                assert await ref.call(("add", "v2")) == 2
            print("ALIVE", flush=True)
        print("CLOSED", flush=True)

    trio.run(main)
    sys.stdout.flush()
    os._exit(0)
