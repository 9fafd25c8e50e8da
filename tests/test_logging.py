"""What a crash prints: one line when the application configured no logging, the full
record (traceback included) as soon as it configured any."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap

import pytest
import trio

from trio_pgs import (
    MemoryStore,
    Persistence,
    PersistentSupervisor,
    RequestError,
    ServerCrashed,
)

from .servers import FaultyStore, TallyServer

#: A program with a server that crashes once; CONFIGURE is replaced by its logging setup.
CRASHING_PROGRAM = textwrap.dedent("""
    import logging
    import trio
    import trio_pgs
    from trio_pgs import PersistentServer, Reply

    CONFIGURE

    class Boom(PersistentServer[int]):
        kind = "boom"

        async def init(self) -> int:
            return 0

        async def handle_call(self, request, state):
            raise ValueError("the handler failed")

    async def main():
        async with trio_pgs.PersistentSupervisor(store=trio_pgs.MemoryStore()) as sup:
            ref = await sup.start(Boom, key="k")
            try:
                await ref.call("go")
            except trio_pgs.ServerCrashed:
                pass

    trio.run(main)
""")


def run_program(configure: str) -> str:
    """Run CRASHING_PROGRAM with *configure* as its logging setup; return its stderr."""
    result = subprocess.run(
        [sys.executable, "-c", CRASHING_PROGRAM.replace("CONFIGURE", configure)],
        capture_output=True, text=True, timeout=60, check=True,
    )
    return result.stderr


def test_without_logging_configured_a_crash_prints_one_line_saying_how_to_see_more():
    stderr = run_program("")
    assert stderr.splitlines() == [
        "boom/k crashed: ValueError('the handler failed') "
        "(configure logging, e.g. logging.basicConfig(), to see the traceback)"
    ]


def test_with_logging_configured_a_crash_is_logged_with_its_traceback():
    stderr = run_program("logging.basicConfig(format='%(levelname)s %(message)s')")
    assert stderr.startswith("ERROR boom/k crashed: ValueError('the handler failed')\n")
    assert "Traceback (most recent call last):" in stderr
    assert "ValueError: the handler failed" in stderr
    assert "configure logging" not in stderr


def test_a_handler_on_the_trio_pgs_logger_alone_also_gets_tracebacks():
    stderr = run_program(
        "logging.getLogger('trio_pgs').addHandler(logging.StreamHandler())"
    )
    assert "Traceback (most recent call last):" in stderr
    assert "configure logging" not in stderr


def test_records_of_the_child_loggers_are_one_line_without_logging_configured():
    program = textwrap.dedent("""
        import logging
        import trio_pgs
        try:
            raise OSError("disk full")
        except OSError:
            logging.getLogger("trio_pgs.writer").exception("a commit callback raised")
    """)
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                            timeout=60, check=True)
    assert result.stderr == (
        "a commit callback raised "
        "(configure logging, e.g. logging.basicConfig(), to see the traceback)\n"
    )


async def test_a_crash_record_carries_its_exception_for_handlers(caplog):
    # pytest's capture is a configured handler: the record is complete.
    async with PersistentSupervisor(store=MemoryStore()) as sup:
        ref = await sup.start(TallyServer, key="k")
        with pytest.raises(ServerCrashed):
            await ref.call("crash")
    [record] = [r for r in caplog.records if "crashed" in r.getMessage()]
    assert record.levelno == logging.ERROR
    assert record.exc_info is not None and record.exc_info[1] is not None
    assert "configure logging" not in record.getMessage()


async def test_every_record_about_one_server_carries_its_kind_and_key(caplog, autojump_clock):
    """guide.md: every record about one server carries its ``kind`` and ``key``. Here:
    a crash, a deferred write that fails (it lacked them), its retry, a refusal after
    an in-place change, a hibernation."""

    class Behind(TallyServer):
        kind = "behind"
        persistence = Persistence.WRITE_BEHIND
        max_lag = 0.5
        idle_timeout = 5.0

    caplog.set_level(logging.DEBUG, logger="trio_pgs")
    store = FaultyStore()
    async with PersistentSupervisor(store=store) as sup:
        ref = await sup.start(Behind, key="k")
        with pytest.raises(ServerCrashed):
            await ref.call("crash")
        store.failing = True
        await ref.call(("add", "x"))
        await trio.sleep(2)  # the deferred write fails, and is retried
        store.failing = False
        with pytest.raises(RequestError):
            await ref.call(("mutate-then-refuse", "y"))
        await trio.sleep(10)  # written, then hibernated
    about = [r for r in caplog.records if r.getMessage().startswith("behind/k")]
    assert len({r.getMessage()[:40] for r in about}) >= 4, [r.getMessage() for r in about]
    for record in about:
        assert (getattr(record, "kind", None), getattr(record, "key", None)) == (
            "behind", "k"), record.getMessage()
