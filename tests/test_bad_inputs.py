"""The bad-input catalogue: what a user who gets something wrong observes.

One table. Each row is a mistake (a handler's result, a key, a ref, a stored record, a
state, an option, a store directory, a call from the wrong place), the error the user
observes (type and a message fragment that names the server or the way out, and the
cause when one is chained), and then, for every row, the same checks: nothing was lost
(the victim server's committed state, a bystander's state, both again after a restart
on the same store), the supervisor is alive (another server still takes a write), and
no "coroutine was never awaited" warning leaked. A row with no error documents an input
that is accepted. docs/reliability.md lists the table.
"""

from __future__ import annotations

import builtins
import contextlib
import gc
import math
import os
import shutil
import subprocess
import sys
import warnings
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import diskcache
import pytest
import trio
import trio.testing

from trio_pgs import (
    ActivationFailed,
    AlreadyStarted,
    CallCycleError,
    Delete,
    DiskCacheStore,
    MemoryStore,
    PersistenceError,
    PersistentSupervisor,
    Put,
    Record,
    Reply,
    ServerCrashed,
    ServerNotFound,
    ServerRef,
    StateEncodingError,
    SupervisorNotRunning,
    UnknownKind,
)
from trio_pgs.testing import hibernate

from . import bad_servers
from .bad_servers import BadTimeout, Careless, ForgetfulActivation, Migrating, Narrow
from .crafted_rows import craft_row, guarded, row_exists, unblocking
from .servers import Tally, TallyServer

ROOT = Path(__file__).resolve().parent.parent
SERVERS = [Careless, TallyServer, Migrating, Narrow]
#: The victim's committed state before the mistake; a bystander's.
VICTIM = ["v1", "v2"]
OTHER = ["o1"]
BIG = 16 * 2**20  # characters in the oversized state (no limit of trio-pgs's own)


@attrs.frozen
class Ctx:
    sup: PersistentSupervisor
    store: Any
    victim: ServerRef  # careless/v
    other: ServerRef  # tally/o
    tmp_path: Path
    directory: Path | None  # the DiskCacheStore's directory


Action = Callable[[Ctx], Awaitable[Any]]


@attrs.frozen
class Bad:
    act: Action
    #: What the user observes; None: the input is accepted (the row documents it).
    error: type[BaseException] | None
    match: str = ""
    cause: type[BaseException] | None = None
    #: Run on a DiskCacheStore (and real time: a store thread and a mock clock do not mix).
    disk: bool = False
    #: Threads or processes are involved: real time.
    real_time: bool = False
    #: A crash or a stop logged with this fragment (what a cast's sender cannot hear).
    log: str = ""
    #: The user deleted the store: only reads are checked afterwards, and no restart.
    store_gone: bool = False


def case(act: Action, error: type[BaseException] | None, match: str = "", **kw: Any) -> Bad:
    return Bad(act, error, match, **kw)


# -- actions ----------------------------------------------------------------------------


def call(request: Any) -> Action:
    return lambda ctx: ctx.victim.call(request)


def cast(message: Any) -> Action:
    return lambda ctx: ctx.victim.cast(message)


def send(info: Any) -> Action:
    return lambda ctx: ctx.victim.send(info)


def start(*args: Any, key: Any = "n", cls: Any = Careless) -> Action:
    async def act(ctx: Ctx) -> None:
        try:
            await ctx.sup.start(cls, *args, key=key)
        finally:  # a failed start stores nothing
            if isinstance(key, str) and key:
                with pytest.raises((ServerNotFound, ActivationFailed)):
                    await ctx.sup.ref(cls, key).call("get")

    return act


def ref(cls_or_kind: Any, key: Any) -> Action:
    async def act(ctx: Ctx) -> None:
        await trio.lowlevel.checkpoint()
        ctx.sup.ref(cls_or_kind, key)

    return act


def supervisor(**options: Any) -> Action:
    async def act(ctx: Ctx) -> None:
        await trio.lowlevel.checkpoint()
        PersistentSupervisor(store=MemoryStore(), name="other", **options)

    return act


def plant(key: str, data: bytes, state_version: int = 1, cls: Any = Careless) -> Action:
    """A record someone else wrote; activating it must fail and leave it as it is."""

    async def act(ctx: Ctx) -> None:
        record = Record(kind=cls.kind, key=key, data=data, version=1, state_version=state_version)
        await ctx.store.commit([Put(record, 0)])
        try:
            await ctx.sup.ref(cls, key).call("get")
        finally:
            # Untouched but for its epoch, which the activation's claim raised.
            stored = await ctx.store.load(cls.kind, key)
            assert stored is not None and stored.epoch > record.epoch
            assert attrs.evolve(stored, epoch=record.epoch) == record, "the record was changed"

    return act


def raw_row(key: str, value: Any) -> Action:
    """A row written straight into the diskcache directory, with diskcache's own (pickling)
    Disk; activating it must fail without unpickling anything."""

    async def act(ctx: Ctx) -> None:
        assert ctx.directory is not None
        with diskcache.Cache(ctx.directory) as cache:
            cache.set(f"careless\x1f{key}", value)
        try:
            await ctx.sup.ref(Careless, key).call("get")
        finally:
            assert bad_servers.SPRUNG == [], "a stored pickle was unpickled"

    return act


async def row_naming_a_fifo(ctx: Ctx) -> None:
    """A row whose value "is in" a FIFO: opening it would block the store thread."""
    assert ctx.directory is not None
    fifo = ctx.tmp_path / "fifo"
    os.mkfifo(fifo)
    craft_row(ctx.directory, Careless.kind, "f", filename=str(fifo))
    with unblocking(fifo), trio.fail_after(5):
        await ctx.sup.ref(Careless, "f").call("get")


async def row_naming_dev_zero(ctx: Ctx) -> None:
    """A row whose value "is" /dev/zero: reading it would take every byte of memory."""
    assert ctx.directory is not None
    craft_row(ctx.directory, Careless.kind, "z", filename="/dev/zero")
    with guarded("/dev/zero") as touched:
        try:
            await ctx.sup.ref(Careless, "z").call("get")
        finally:
            assert touched == [], "a row made trio-pgs open a file"


async def purge_row_naming_a_file(ctx: Ctx) -> None:
    """A row whose value "is" a file of the user's, then purged as `trio-pgs purge` does
    (an unconditional Delete): the row goes, the file and its directory stay."""
    assert ctx.directory is not None
    precious = ctx.tmp_path / "keep" / "precious"
    precious.parent.mkdir()
    precious.write_bytes(b"mine")
    craft_row(ctx.directory, Careless.kind, "d", filename=str(precious))
    with pytest.raises(ActivationFailed, match="careless/d: the stored row is not a valid"):
        await ctx.sup.ref(Careless, "d").call("get")
    await ctx.store.commit([Delete(Careless.kind, "d")])
    assert not row_exists(ctx.directory, Careless.kind, "d")
    assert precious.read_bytes() == b"mine", "purging a row deleted the file it names"


async def second_store_on_directory(ctx: Ctx) -> None:
    assert ctx.directory is not None
    async with PersistentSupervisor(store=DiskCacheStore(ctx.directory), name="second"):
        raise AssertionError("a second store opened on a directory in use")


async def start_twice(ctx: Ctx) -> None:
    try:
        await ctx.sup.start(Careless, "again", key="v")
    except AlreadyStarted as exc:
        assert exc.ref == ctx.victim
        raise


async def call_stopped(ctx: Ctx) -> None:
    stopped = await ctx.sup.start(Careless, "s1", key="s")
    await stopped.stop()
    await stopped.call("get")


async def closed_supervisor(ctx: Ctx) -> None:
    async with PersistentSupervisor(store=MemoryStore(), name="gone") as gone:
        ref = await gone.start(TallyServer, key="k")
    await ref.call("get")


async def second_with_name(ctx: Ctx) -> None:
    async with PersistentSupervisor(store=MemoryStore(), name=ctx.sup.name):
        raise AssertionError("a second supervisor with one name opened")


async def second_on_store(ctx: Ctx) -> None:
    async with PersistentSupervisor(store=ctx.store, name="second"):
        raise AssertionError("a second supervisor opened on a store in use")


async def oversized_state(ctx: Ctx) -> None:
    item = "x" * BIG
    big = await ctx.sup.start(TallyServer, item, key="big")
    await hibernate(big)  # the next call reads it back from the directory
    assert await big.call("get") == [item]


async def nul_key(ctx: Ctx) -> None:
    key = "nul\x00and\x1fseparator"
    odd = await ctx.sup.start(Careless, "n1", key=key)
    await hibernate(odd)
    assert await odd.call(("add", "n2")) == 2
    await hibernate(odd)
    assert await ctx.sup.ref(Careless, key).call("get") == ["n1", "n2"]


async def full_mailbox_cancelled_sender(ctx: Ctx) -> None:
    narrow = await ctx.sup.start(Narrow, key="n")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(narrow.call, ("sleep", 10))  # busy: the mailbox fills
        await trio.testing.wait_all_tasks_blocked()
        await narrow.cast(("add", "queued"))  # the one place in the mailbox
        with trio.move_on_after(1) as scope:
            await narrow.cast(("add", "cancelled"))  # waits for room, then gives up
        assert scope.cancelled_caught, "a cast to a full mailbox did not wait"
    assert await narrow.call("get") == ["queued"], "a cancelled sender's cast was handled"


async def rollback(ctx: Ctx, steps: Any) -> None:
    await hibernate(ctx.victim)
    await ctx.sup.rollback(ctx.victim, steps=steps)


async def release_dormant(ctx: Ctx) -> None:
    await hibernate(ctx.victim)
    await ctx.sup.release(ctx.victim)  # not quarantined: accepted, the state is kept


async def release_active(ctx: Ctx) -> None:
    await ctx.sup.release(ctx.victim)


async def from_plain_thread(ctx: Ctx) -> None:
    """Sync code (a thread with no trio.run) driving ``ref.call`` by hand."""

    def drive() -> BaseException | None:
        coroutine = ctx.victim.call(("add", "from-a-thread"))
        try:
            coroutine.send(None)
        except BaseException as exc:
            return exc
        finally:
            coroutine.close()
        return None

    error = await trio.to_thread.run_sync(drive)
    assert error is not None, "a call ran outside trio"
    raise error


async def from_another_trio_run(ctx: Ctx) -> None:
    """In a subprocess (a failure here can wedge a server): a ref used from another
    thread's trio.run. The error comes back here; the server must have survived."""
    code = "from tests.bad_servers import call_from_another_trio_run as f; f()"
    done = await trio.to_thread.run_sync(
        lambda: subprocess.run(
            [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=30
        )
    )
    lines = done.stdout.splitlines()
    errors = [line.split(" ", 2) for line in lines if line.startswith("ERROR ")]
    assert errors, f"no result: {done.stdout!r} {done.stderr[-2000:]!r}"
    _, name, message = errors[0]
    if "ALIVE" not in lines or "CLOSED" not in lines:
        raise AssertionError(
            f"the foreign call raised {name}: {message!r}, and then the server "
            f"stopped answering or the supervisor could not shut down (exit code "
            f"{done.returncode}, output {lines})"
        )
    raise getattr(builtins, name, AssertionError)(message)


@contextlib.contextmanager
def read_only_directory(path: Path) -> Iterator[None]:
    """A directory nobody can create files in, root included (chattr +i), or a skip."""
    path.mkdir()
    path.chmod(0o555)
    undo: Callable[[], Any] = lambda: path.chmod(0o755)  # noqa: E731
    try:
        (path / "probe").touch()
    except PermissionError:
        pass
    else:  # root: chmod does not stop it
        (path / "probe").unlink()
        chattr = shutil.which("chattr")
        if chattr is None or subprocess.run([chattr, "+i", path]).returncode:
            path.chmod(0o755)
            pytest.skip("cannot make a read-only directory here (root without chattr)")
        undo = lambda: subprocess.run([chattr, "-i", path], check=True)  # noqa: E731
    try:
        yield
    finally:
        undo()


async def read_only_store(ctx: Ctx) -> None:
    directory = ctx.tmp_path / "read-only"
    with read_only_directory(directory):
        async with PersistentSupervisor(store=DiskCacheStore(directory), name="ro"):
            raise AssertionError("a store opened in a read-only directory")


async def deleted_store(ctx: Ctx) -> None:
    assert ctx.directory is not None
    shutil.rmtree(ctx.directory)
    await ctx.victim.call(("add", "after-rmtree"))  # where would it be written?


# -- the table --------------------------------------------------------------------------

CRASHED = r"careless/v crashed handling a call: TypeError\(.careless/v: handle_call must return"
ENCODE = r"careless/v: the state cannot be stored as JSON at \$\.items\[2\]"

TABLE = [
    # What a handler returns.
    pytest.param(case(call(("return", None)), ServerCrashed, CRASHED + r".*not None",
                      cause=TypeError), id="call-returns-None"),
    pytest.param(case(call(("return", 42)), ServerCrashed, CRASHED + r".*not 42",
                      cause=TypeError), id="call-returns-int"),
    pytest.param(case(call(("return", ("value", Tally()))), ServerCrashed, CRASHED,
                      cause=TypeError), id="call-returns-tuple"),
    pytest.param(case(call(("return", Reply)), ServerCrashed, CRASHED + r".*not <class",
                      cause=TypeError), id="call-returns-Reply-class"),
    pytest.param(case(call("forget-await"), ServerCrashed, r"careless/v.*forget 'await'",
                      cause=TypeError), id="call-returns-coroutine"),
    pytest.param(case(cast(("return", Reply("x", Tally()))), None,
                      log="careless/v: handle_cast must return NoReply / Stop, not Reply"),
                 id="cast-returns-Reply"),
    pytest.param(case(send(("return", None)), None,
                      log="careless/v: handle_info must return NoReply / Stop, not None"),
                 id="info-returns-None"),
    pytest.param(case(call("call-self"), ServerCrashed, "careless/v crashed",
                      cause=CallCycleError), id="call-to-itself"),
    # A timer's delay: refused in the handler that arms it (a crash of that server
    # only; None was taken, then failed in the supervisor's nursery, ending it).
    *(pytest.param(case(call(("send-after", delay)), ServerCrashed,
                        r"careless/v crashed.*delay must be", cause=error),
                   id=f"send-after-{name}")
      for name, delay, error in [("None", None, TypeError), ("str", "1", TypeError),
                                 ("bool", True, TypeError), ("zero", 0, ValueError),
                                 ("negative", -1.0, ValueError),
                                 ("nan", math.nan, ValueError),
                                 ("huge-int", 10**400, ValueError)]),
    # init and on_activate.
    pytest.param(case(start("init-returns", 42), StateEncodingError,
                      "careless/n: the state could not be unstructured"),
                 id="init-returns-non-state"),
    pytest.param(case(start("init-forgets-await"), ServerCrashed,
                      r"careless/n.*forget 'await'", cause=TypeError),
                 id="init-returns-coroutine"),
    pytest.param(case(start("init-raises"), ServerCrashed,
                      r"careless/n: init\(\) raised LookupError", cause=LookupError),
                 id="init-raises"),
    pytest.param(case(start(key="f", cls=ForgetfulActivation), ActivationFailed,
                      r"forgetful/f.*forget 'await'", cause=TypeError),
                 id="on_activate-returns-coroutine"),
    # Keys.
    pytest.param(case(ref(Careless, 5), TypeError, r"key must be a str, not int \(5\)"),
                 id="key-int"),
    pytest.param(case(start(key=b"n"), TypeError, "key must be a str, not bytes"),
                 id="key-bytes-at-start"),
    pytest.param(case(ref(Careless, ""), ValueError, "key must not be empty"),
                 id="key-empty"),
    pytest.param(case(ref(Careless, "k" * 1025), ValueError,
                      "key must be at most 1024 characters, not 1025"), id="key-too-long"),
    pytest.param(case(nul_key, None, disk=True), id="key-with-NUL-and-separator"),
    pytest.param(case(ref(Careless, "k\udc80"), ValueError,
                      "key must be encodable as UTF-8"), id="key-lone-surrogate"),
    pytest.param(case(start(key="k\udc80"), ValueError, "key must be encodable as UTF-8",
                      disk=True), id="key-lone-surrogate-at-start"),
    # A ref built by hand (or read from data) with a key `ref` refuses: the same error
    # at its first message (it was ActivationFailed on a DiskCacheStore, a crash).
    *(pytest.param(case(lambda ctx, key=key: ServerRef("main", "careless", key).call("get"),
                        error, match, disk=True), id=f"key-{name}-in-ref-data")
      for name, key, error, match in [
          ("empty", "", ValueError, "key must not be empty"),
          ("int", 5, TypeError, "key must be a str"),
          ("lone-surrogate", "k\udc80", ValueError, "key must be encodable as UTF-8"),
      ]),
    # Kinds, refs and supervisors.
    pytest.param(case(ref("no.such.kind", "k"), UnknownKind,
                      r"serves no kind 'no.such.kind'.*servers="), id="kind-unknown"),
    pytest.param(case(lambda ctx: ServerRef("main", "no.such.kind", "k").call("get"),
                      UnknownKind, "serves no kind 'no.such.kind'"),
                 id="kind-unknown-in-ref-data"),
    pytest.param(case(closed_supervisor, SupervisorNotRunning,
                      r"tally/k: no supervisor named 'gone'.*open PersistentSupervisor"),
                 id="ref-to-closed-supervisor"),
    pytest.param(case(lambda ctx: ServerRef("never", "careless", "v").call("get"),
                      SupervisorNotRunning, "careless/v: no supervisor named 'never'"),
                 id="ref-to-never-opened-supervisor"),
    pytest.param(case(second_with_name, ValueError, "'main' is already open.*another name"),
                 id="two-supervisors-one-name"),
    pytest.param(case(second_on_store, ValueError, "already open in another supervisor"),
                 id="two-supervisors-one-store"),
    pytest.param(case(start_twice, AlreadyStarted, "careless/v is already started"),
                 id="start-twice"),
    pytest.param(case(call_stopped, ServerNotFound,
                      r"careless/s: no such server.*supervisor.start\(\)"),
                 id="call-stopped-server"),
    pytest.param(case(lambda ctx: ctx.sup.ref(Careless, "ghost").call("get"),
                      ServerNotFound, "careless/ghost: no such server"),
                 id="call-never-started"),
    pytest.param(case(lambda ctx: ctx.sup.ref(Careless, "ghost").cast(("add", "x")),
                      ServerNotFound, "careless/ghost: no such server"),
                 id="cast-never-started"),
    # Stored records.
    pytest.param(case(plant("g", b"\xff not json"), ActivationFailed,
                      "careless/g: the stored state is not JSON"), id="record-not-json"),
    pytest.param(case(plant("g", b'{"items": 5}'), ActivationFailed,
                      "careless/g: the stored state does not fit Tally"),
                 id="record-wrong-shape"),
    pytest.param(case(plant("g", b'{"items": []}', state_version=7), ActivationFailed,
                      "careless/g: the record is at state_version 7, newer than"),
                 id="record-newer-than-code"),
    pytest.param(case(plant("m", b'{"items": ["m1"]}', cls=Migrating), ActivationFailed,
                      r"migrating/m: migration 1 -> 2 raised KeyError"),
                 id="migration-fails"),
    pytest.param(case(raw_row("g", b"garbage bytes"), ActivationFailed,
                      "careless/g: the stored row is not a valid trio-pgs record",
                      cause=PersistenceError, disk=True), id="row-garbage-bytes"),
    pytest.param(case(raw_row("p", bad_servers.Trap()), ActivationFailed,
                      "careless/p: a row of this store holds a pickle; trio-pgs refuses",
                      cause=PersistenceError, disk=True), id="row-tampered-pickle"),
    pytest.param(case(row_naming_a_fifo, ActivationFailed,
                      "careless/f: the stored row is not a valid trio-pgs record.*names a file",
                      cause=PersistenceError, disk=True), id="row-names-a-FIFO"),
    pytest.param(case(row_naming_dev_zero, ActivationFailed,
                      "careless/z: the stored row is not a valid trio-pgs record.*names a file",
                      cause=PersistenceError, disk=True), id="row-names-dev-zero"),
    pytest.param(case(purge_row_naming_a_file, None, disk=True), id="row-names-a-file-purged"),
    # States that cannot be encoded, and a large one.
    pytest.param(case(call(("unencodable", math.nan)), StateEncodingError,
                      ENCODE + r" \(nan: JSON has no NaN"), id="state-NaN"),
    pytest.param(case(call(("unencodable", {object()})), StateEncodingError,
                      ENCODE + r" \(set\)"), id="state-set-of-objects"),
    pytest.param(case(call(("unencodable", lambda: None)), StateEncodingError,
                      ENCODE + r" \(function\)"), id="state-lambda"),
    pytest.param(case(oversized_state, None, disk=True), id="state-16-MiB"),
    # Mailboxes and options.
    pytest.param(case(full_mailbox_cancelled_sender, None), id="cast-full-mailbox-cancelled"),
    pytest.param(case(supervisor(idle_timeout=-1), ValueError, "idle_timeout must be > 0"),
                 id="idle_timeout-negative"),
    pytest.param(case(supervisor(idle_timeout=math.nan), ValueError,
                      "idle_timeout must be > 0.*nan"), id="idle_timeout-NaN"),
    pytest.param(case(supervisor(mailbox_size=0), ValueError, "mailbox_size must be >= 1"),
                 id="mailbox_size-zero"),
    pytest.param(case(supervisor(mailbox_size=math.nan), TypeError,
                      "mailbox_size must be an int"), id="mailbox_size-NaN"),
    pytest.param(case(supervisor(state_version=2**63), ValueError,
                      "state_version must be at most 9223372036854775807"),
                 id="state_version-beyond-64-bits"),
    pytest.param(case(supervisor(restart="permanent"), TypeError,
                      "restart must be a trio_pgs.Restart"), id="restart-str"),
    pytest.param(case(supervisor(idel_timeout=1), TypeError,
                      r"unknown server option\(s\) idel_timeout"), id="option-misspelt"),
    pytest.param(case(ref(BadTimeout, "k"), ValueError, "bad.timeout.*idle_timeout must be > 0"),
                 id="class-option-bad"),
    # Quarantine tools.
    pytest.param(case(lambda ctx: rollback(ctx, 3), ValueError,
                      "careless/v keeps 0 earlier state.*keep_history"),
                 id="rollback-beyond-history"),
    pytest.param(case(lambda ctx: rollback(ctx, 0), ValueError, "steps must be an int >= 1"),
                 id="rollback-zero-steps"),
    pytest.param(case(release_active, ValueError, "careless/v is active"),
                 id="release-active"),
    pytest.param(case(release_dormant, None), id="release-not-quarantined"),
    pytest.param(case(lambda ctx: ctx.sup.release(ctx.sup.ref(Careless, "ghost")),
                      ServerNotFound, "careless/ghost: no such server"),
                 id="release-never-started"),
    # Store directories.
    pytest.param(case(read_only_store, PersistenceError,
                      "cannot open the store directory .*read-only.*writable", disk=True),
                 id="store-directory-read-only"),
    pytest.param(case(second_store_on_directory, PersistenceError,
                      r"already open in this process \(pid \d+ on host .*\).*close", disk=True),
                 id="store-directory-in-use"),
    pytest.param(case(deleted_store, PersistenceError, "careless/v.*deleted or replaced", disk=True,
                      store_gone=True), id="store-directory-deleted"),
    # Calls from outside trio.
    pytest.param(case(from_plain_thread, RuntimeError, "careless/v: not in a trio run",
                      real_time=True),
                 id="call-outside-trio"),
    pytest.param(case(from_another_trio_run, RuntimeError, "tally/v", real_time=True),
                 id="call-from-another-trio-run"),
]


@pytest.fixture
def case_clock(request: pytest.FixtureRequest) -> trio.testing.MockClock | None:
    """autojump_clock, except where a thread or a process runs (it would jump past
    every deadline while they work): pytest-trio uses a fixture that is a Clock."""
    bad: Bad = request.node.callspec.params["bad"]
    if bad.disk or bad.real_time:
        return None
    return trio.testing.MockClock(autojump_threshold=0)


@pytest.mark.parametrize("bad", TABLE)
async def test_bad_input_fails_clearly_and_loses_nothing(
    bad: Bad, case_clock: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bad_servers.SPRUNG.clear()
    with warnings.catch_warnings():  # garbage of an earlier, failed row is not this row's
        warnings.simplefilter("ignore")
        gc.collect()
    directory = tmp_path / "store" if bad.disk else None
    store = MemoryStore() if directory is None else DiskCacheStore(directory)
    with trio.fail_after(60):
        async with PersistentSupervisor(store=store, name="main", servers=SERVERS) as sup:
            victim = await sup.start(Careless, VICTIM[0], key="v")
            assert await victim.call(("add", VICTIM[1])) == 2
            other = await sup.start(TallyServer, *OTHER, key="o")
            ctx = Ctx(sup, store, victim, other, tmp_path, directory)

            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                if bad.error is None:
                    await bad.act(ctx)
                else:
                    with pytest.raises(bad.error, match=bad.match) as info:
                        await bad.act(ctx)
                    if bad.cause is not None:
                        assert isinstance(info.value.__cause__, bad.cause), info.value.__cause__
                    del info
                gc.collect()
            leaked = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
            assert not leaked, f"warnings leaked: {leaked}"

            if bad.store_gone:
                # Nothing can be read any more: said plainly, never a stale answer.
                with pytest.raises(ActivationFailed, match="deleted or replaced") as gone:
                    await victim.call("get")
                assert isinstance(gone.value.__cause__, PersistenceError)
                assert await other.call("get") == OTHER  # active: served from memory
                return
            # Nothing lost, and the supervisor still serves.
            assert await victim.call("get") == VICTIM
            assert await other.call("get") == OTHER
            assert await other.call(("add", "o2")) == 2
            if bad.log:
                assert any(bad.log in record.getMessage() for record in caplog.records)

        # ... and after a restart on the same store.
        async with PersistentSupervisor(store=store, name="main", servers=SERVERS) as sup:
            assert await sup.ref(Careless, "v").call("get") == VICTIM
            assert await sup.ref(TallyServer, "o").call("get") == [*OTHER, "o2"]
            assert sup.statistics().crashes == 0


def test_the_table_is_a_catalogue() -> None:
    ids = [param.id for param in TABLE]
    assert len(ids) == len(set(ids)) >= 25
