"""The supervisor: names, kinds, options, statistics, shutdown."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from trio_pgs import (
    ActivationFailed,
    AlreadyStarted,
    MemoryStore,
    OutcomeUnknown,
    PersistentServer,
    PersistentSupervisor,
    Reply,
    Restart,
    ServerCrashed,
    ServerRef,
    SupervisorNotRunning,
    UnknownKind,
)

from .servers import TallyServer


async def test_start_returns_a_ref_and_runs_init(sup):
    ref = await sup.start(TallyServer, "a", "b", key="k")
    assert ref == ServerRef("default", "tally", "k")
    assert await ref.call("get") == ["a", "b"]


async def test_start_without_key_makes_a_unique_one(sup):
    first = await sup.start(TallyServer)
    second = await sup.start(TallyServer)
    assert first.key != second.key and len(first.key) == 32


async def test_start_of_an_existing_key_raises_already_started(sup):
    ref = await sup.start(TallyServer, "first", key="k")
    with pytest.raises(AlreadyStarted) as info:
        await sup.start(TallyServer, "second", key="k")
    assert info.value.ref == ref
    assert await ref.call("get") == ["first"]


async def test_start_of_a_dormant_key_raises_already_started(store, autojump_clock, lifecycle):
    async with PersistentSupervisor(store=store, idle_timeout=1) as sup:
        await sup.start(TallyServer, "first", key="k")
        await trio.sleep(2)
        with pytest.raises(AlreadyStarted):
            await sup.start(TallyServer, "second", key="k")
        assert sup.statistics().active == 0  # the refused start did not wake it
        assert lifecycle.activations == {"k": 1}
        assert await sup.ref(TallyServer, "k").call("get") == ["first"]


async def test_init_failure_raises_server_crashed_and_stores_nothing(sup, store):
    class Picky(PersistentServer[int]):
        async def init(self, n: int) -> int:
            raise ValueError("n must be even")

    with pytest.raises(ServerCrashed) as info:
        await sup.start(Picky, 3, key="p")
    assert isinstance(info.value.__cause__, ValueError)
    assert await store.load("Picky", "p") is None


@pytest.mark.parametrize(
    ("key", "error"),
    [(3, TypeError), (b"k", TypeError), (None, TypeError), ("", ValueError),
     ("k" * 1025, ValueError)],
    ids=["int", "bytes", "none", "empty", "too-long"],
)
async def test_bad_keys_are_refused(sup, key, error):
    with pytest.raises(error):
        sup.ref(TallyServer, key)
    if key is not None:
        with pytest.raises(error):
            await sup.start(TallyServer, key=key)


async def test_ref_with_an_unregistered_kind_raises_unknown_kind(sup):
    with pytest.raises(UnknownKind, match=r"'os\.system'"):
        await ServerRef("default", "os.system", "k").call("x")
    with pytest.raises(UnknownKind):
        sup.ref("nope", "k")


async def test_a_kind_maps_to_one_class_per_supervisor(sup):
    class Impostor(PersistentServer[int]):
        kind = "tally"

    with pytest.raises(ValueError, match="already served by TallyServer"):
        await sup.start(Impostor, 0)


async def test_two_open_supervisors_with_one_name_is_a_value_error():
    async with PersistentSupervisor(store=MemoryStore(), name="x"):
        with pytest.raises(ValueError, match="already open"):
            async with PersistentSupervisor(store=MemoryStore(), name="x"):
                pass  # pragma: no cover


async def test_differently_configured_supervisors_work_side_by_side(autojump_clock):
    async with (
        PersistentSupervisor(store=MemoryStore(), name="fast", idle_timeout=1) as fast,
        PersistentSupervisor(store=MemoryStore(), name="slow", idle_timeout=100) as slow,
    ):
        a = await fast.start(TallyServer, "fast", key="k")
        b = await slow.start(TallyServer, "slow", key="k")
        assert a != b
        await trio.sleep(2)
        assert (fast.statistics().active, slow.statistics().active) == (0, 1)
        assert await a.call("get") == ["fast"]
        assert await b.call("get") == ["slow"]


async def test_ref_of_a_closed_supervisor_raises_supervisor_not_running(store):
    async with PersistentSupervisor(store=store) as sup:
        ref = await sup.start(TallyServer, key="k")
    with pytest.raises(SupervisorNotRunning, match="'default'"):
        await ref.call("get")


async def test_unknown_option_is_a_type_error(store):
    with pytest.raises(TypeError, match="idle_timout"):
        PersistentSupervisor(store=store, idle_timout=3)


@pytest.mark.parametrize(
    ("option", "value", "error"),
    [("idle_timeout", -1, ValueError), ("idle_timeout", "3", TypeError),
     ("mailbox_size", 0, ValueError), ("restart", "permanent", TypeError)],
)
async def test_bad_option_values_are_refused(store, option, value, error):
    with pytest.raises(error):
        PersistentSupervisor(store=store, **{option: value})


async def test_supervisor_options_override_the_class(store, autojump_clock):
    async with PersistentSupervisor(store=store, restart=Restart.TEMPORARY) as sup:
        ref = await sup.start(TallyServer, key="k")
        with pytest.raises(ServerCrashed):
            await ref.call("crash")
        assert await store.load("tally", "k") is None  # TEMPORARY wiped it


async def test_statistics_count_what_happened(store, autojump_clock):
    async with PersistentSupervisor(store=store, idle_timeout=5) as sup:
        ref = await sup.start(TallyServer, key="k")
        await ref.call(("add", "x"))
        await trio.sleep(6)
        await ref.call(("add", "y"))
        stats = sup.statistics()
    assert stats.name == "default"
    assert (stats.active, stats.activations, stats.hibernations) == (1, 2, 1)
    assert (stats.messages, stats.commits, stats.records_written) == (2, 3, 3)
    assert stats.mean_batch_size == 1.0
    assert stats.crashes == stats.stops == stats.failed_commits == 0


async def test_leaving_the_block_shuts_servers_down_and_keeps_their_state(store, lifecycle):
    async with PersistentSupervisor(store=store) as sup:
        ref = await sup.start(TallyServer, key="k")
        await ref.call(("add", "x"))
    assert lifecycle.terminations == [("k", "shutdown")]
    assert (await store.load("tally", "k")).data == b'{"items":["x"]}'


async def started_at_shutdown(store, cls) -> list[OutcomeUnknown]:
    """`start(cls)` in a task of its own, the supervisor leaving half a second later
    with a shutdown_timeout of 0.1 s: what the start raised (`OutcomeUnknown`)."""
    failures = []
    async with trio.open_nursery() as nursery:
        async with PersistentSupervisor(store=store, shutdown_timeout=0.1) as sup:

            async def start() -> None:
                try:
                    await sup.start(cls, key="k")
                except OutcomeUnknown as exc:
                    failures.append(exc)

            nursery.start_soon(start)
            await trio.sleep(0.5)  # created; its activation is under way
    return failures


async def test_a_start_whose_on_activate_is_cut_off_at_shutdown_says_the_server_exists(
    store, autojump_clock
):
    """start() created the record; the shutdown's deadline cuts off its on_activate.
    The caller hears that the server exists (`OutcomeUnknown`, not the
    `SupervisorNotRunning` of a message never handled, whose retry then met
    `AlreadyStarted`), and its next message activates it."""

    class Warming(TallyServer):
        kind = "warming"
        warm = True

        async def on_activate(self, state):
            if Warming.warm:
                await trio.sleep(1.0)
            return state

    [failure] = await started_at_shutdown(store, Warming)
    assert "was created" in str(failure) and "AlreadyStarted" in str(failure)
    assert (await store.load("warming", "k")) is not None
    Warming.warm = False
    async with PersistentSupervisor(store=store, servers=[Warming]) as sup:
        with pytest.raises(AlreadyStarted):
            await sup.start(Warming, key="k")
        assert await sup.ref(Warming, "k").call("get") == []


async def test_a_start_cut_off_committing_the_reminders_on_activate_set_says_it_exists(
    autojump_clock,
):
    """As above, but on_activate is done and sets a reminder, whose commit is with a
    store that does not answer at the deadline."""
    from trio_pgs.testing import FaultyStore

    class Reminding(TallyServer):
        kind = "reminding"

        async def on_activate(self, state):
            self.remind("tick", after=3600)
            store.hold_commits()  # the reminders' commit hangs
            return state

    store = FaultyStore(MemoryStore())
    [failure] = await started_at_shutdown(store, Reminding)
    store.release_commits()
    assert "was created" in str(failure)
    assert await store.inner.load("reminding", "k") is not None


async def test_a_start_whose_on_activate_runs_a_nursery_cut_off_at_shutdown_says_it_exists(
    store, autojump_clock
):
    """on_activate waits inside a nursery of its own: cut off, it raises a group of
    cancellations, not a bare one, and that start said "never handled; retry"."""

    class Nursing(TallyServer):
        kind = "nursing"

        async def on_activate(self, state):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trio.sleep, 5)
                await trio.sleep(5)
            return state

    [failure] = await started_at_shutdown(store, Nursing)
    assert "was created" in str(failure)


async def test_a_start_whose_on_activate_fails_and_whose_record_cannot_be_deleted_says_so(
    autojump_clock,
):
    """on_activate raises, and the delete of the record start() created fails (or is
    cut off at shutdown): start() said "Nothing was stored" (or "retry") though the
    server exists; it says that the record stays."""
    from trio_pgs.testing import FaultyStore

    class Failing(TallyServer):
        kind = "failing"

        async def on_activate(self, state):
            store.fail_next("commit")  # the delete that follows
            raise LookupError("on_activate failed")

    store = FaultyStore(MemoryStore())
    async with PersistentSupervisor(store=store) as sup:
        with pytest.raises(ActivationFailed, match="could not be deleted: the server exists"):
            await sup.start(Failing, key="k")
        with pytest.raises(AlreadyStarted):
            await sup.start(Failing, key="k")


async def test_queued_messages_are_handled_at_shutdown(store, autojump_clock):
    async with PersistentSupervisor(store=store) as sup:
        ref = await sup.start(TallyServer, key="k")
        sup._spawn(ref.call, ("sleep", 1))
        await trio.testing.wait_all_tasks_blocked()
        await ref.cast(("add", "queued"))
    assert (await store.load("tally", "k")).data == b'{"items":["queued"]}'


async def test_user_exception_comes_out_of_the_block_as_itself(store):
    with pytest.raises(KeyError):
        async with PersistentSupervisor(store=store) as sup:
            await sup.start(TallyServer, key="k")
            raise KeyError("mine")
    assert await store.load("tally", "k") is not None


async def test_cancellation_shuts_down_cleanly(store, autojump_clock, lifecycle):
    with trio.move_on_after(5):
        async with PersistentSupervisor(store=store) as sup:
            ref = await sup.start(TallyServer, key="k")
            await ref.call(("add", "x"))
            await trio.sleep_forever()
    assert lifecycle.terminations == [("k", "shutdown")]
    assert (await store.load("tally", "k")).data == b'{"items":["x"]}'


async def test_a_handler_past_shutdown_timeout_is_cancelled_and_not_committed(
    store, autojump_clock, caplog, lifecycle
):
    failures = []
    async with trio.open_nursery() as callers:
        async with PersistentSupervisor(store=store, shutdown_timeout=2) as sup:
            ref = await sup.start(TallyServer, key="k")
            await ref.call(("add", "x"))

            async def stuck() -> None:
                try:
                    await ref.call(("sleep", 100))
                except SupervisorNotRunning as exc:
                    failures.append(exc)

            callers.start_soon(stuck)
            await trio.testing.wait_all_tasks_blocked()
            start = trio.current_time()
    assert trio.current_time() - start == pytest.approx(2)
    assert "still busy after shutdown_timeout" in caplog.text and "tally/k" in caplog.text
    # The cut-off caller is answered, and terminate runs with the last committed state.
    assert len(failures) == 1 and "shutdown_timeout" in str(failures[0])
    assert lifecycle.terminations == [("k", "shutdown")]
    assert sup.statistics().unflushed == ("tally/k",)
    assert (await store.load("tally", "k")).data == b'{"items":["x"]}'


async def test_an_unwritable_store_directory_fails_at_open(tmp_path):
    from trio_pgs import DiskCacheStore, PersistenceError

    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(PersistenceError, match="cannot open the store directory"):
        async with PersistentSupervisor(store=DiskCacheStore(blocker / "store")):
            pass  # pragma: no cover


async def test_a_store_serves_one_supervisor_at_a_time(store):
    async with PersistentSupervisor(store=store, name="one") as sup:
        with pytest.raises(ValueError, match="already open"):
            async with PersistentSupervisor(store=store, name="two"):
                pass  # pragma: no cover
        ref = await sup.start(TallyServer, key="k")  # the first one is unharmed
        assert await ref.call(("add", "x")) == 1
    with pytest.raises(SupervisorNotRunning):
        await ref.call("get")


async def test_state_survives_a_supervisor_restart(store):
    async with PersistentSupervisor(store=store) as sup:
        ref = await sup.start(TallyServer, key="k")
        await ref.call(("add", "x"))
    async with PersistentSupervisor(store=store, servers=[TallyServer]):
        assert await ref.call(("add", "y")) == 2


class Echo(PersistentServer[int]):
    async def handle_call(self, request, state):
        return Reply(request, state)


async def test_a_server_with_a_plain_int_state(sup):
    ref = await sup.start(Echo, 7, key="e")
    assert await ref.call("hi") == "hi"


async def test_an_internal_error_answers_every_waiting_caller(store, monkeypatch, caplog):
    from trio_pgs import _runtime

    async def broken(entry):
        raise AttributeError("a bug in trio-pgs")

    async with PersistentSupervisor(store=store) as sup:
        monkeypatch.setattr(_runtime, "activate", broken)
        with trio.fail_after(5), pytest.raises(ServerCrashed, match="internal error"):
            await sup.start(TallyServer, key="k")
        with trio.fail_after(5), pytest.raises(ServerCrashed, match="internal error"):
            await sup.ref(TallyServer, "other").call("get")
        monkeypatch.undo()
        assert await sup.start(TallyServer, key="k")  # the supervisor goes on
    assert "internal error in trio-pgs" in caplog.text
