"""trio_pgs.testing: the fault-injecting store and the helpers users test with."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from trio_pgs import PersistenceError, PersistentSupervisor, ServerCrashed
from trio_pgs.testing import FaultyStore, InjectedFault, crash, hibernate, wait_all_idle
from trio_pgs.testing.pytest_plugin import pgs_store, pgs_supervisor  # noqa: F401

from .servers import TallyServer


async def test_scripted_commit_faults_reach_callers_and_nothing_partial_is_stored(
    autojump_clock,
):
    store = FaultyStore()
    async with PersistentSupervisor(store=store) as sup:
        ref = await sup.start(TallyServer, key="k")
        store.fail_next("commit", times=2)
        for _ in range(2):
            with pytest.raises(PersistenceError) as info:
                await ref.call(("add", "lost"))
            assert isinstance(info.value.__cause__, InjectedFault)
        assert await ref.call(("add", "kept")) == 1
        assert (await store.inner.load("tally", "k")).data == b'{"items":["kept"]}'
    assert store.statistics().failed_commits == 2


async def test_load_faults_fail_the_activation_and_recover(autojump_clock):
    from trio_pgs import ActivationFailed

    store = FaultyStore()
    async with PersistentSupervisor(store=store, idle_timeout=1) as sup:
        ref = await sup.start(TallyServer, "x", key="k")
        await trio.sleep(2)
        store.fail_next("load")
        with pytest.raises(ActivationFailed):
            await ref.call("get")
        assert await ref.call("get") == ["x"]


async def test_random_faults_leave_every_server_consistent_and_recover(autojump_clock):
    store = FaultyStore(seed=7)
    async with PersistentSupervisor(store=store, max_crashes=10**6) as sup:
        refs = [await sup.start(TallyServer, key=str(i)) for i in range(20)]
        store.commit_failure_rate = 0.3
        store.commit_delay = 0.01
        acknowledged: dict[str, list[str]] = {ref.key: [] for ref in refs}

        async def work(ref) -> None:
            for n in range(20):
                try:
                    await ref.call(("add", str(n)))
                except PersistenceError:
                    continue
                acknowledged[ref.key].append(str(n))

        async with trio.open_nursery() as nursery:
            for ref in refs:
                nursery.start_soon(work, ref)
        assert store.statistics().failed_commits > 0
        store.heal()
        for ref in refs:
            assert await ref.call("get") == acknowledged[ref.key]  # exactly the acked ones


async def test_held_commits_show_the_output_gate(autojump_clock):
    store = FaultyStore()
    async with PersistentSupervisor(store=store) as sup:
        ref = await sup.start(TallyServer, key="k")
        store.hold_commits()
        with trio.move_on_after(10):
            await ref.call(("add", "x"))
            raise AssertionError("the reply came before the commit")
        store.release_commits()
        assert await ref.call("get") == ["x"]


async def test_crash_helper_crashes_the_server(pgs_supervisor, lifecycle):  # noqa: F811
    ref = await pgs_supervisor.start(TallyServer, "x", key="k")
    await crash(ref)
    assert pgs_supervisor.statistics().crashes == 1
    assert isinstance(lifecycle.terminations[-1][1], Exception)
    assert await ref.call("get") == ["x"]


async def test_hibernate_helper_hibernates_now(pgs_supervisor, lifecycle):  # noqa: F811
    ref = await pgs_supervisor.start(TallyServer, key="k")
    await hibernate(ref)
    assert pgs_supervisor.statistics().active == 0
    assert lifecycle.terminations == [("k", "hibernate")]
    await hibernate(ref)  # dormant: nothing to do


async def test_wait_all_idle_waits_for_queued_work(pgs_supervisor, autojump_clock):  # noqa: F811
    ref = await pgs_supervisor.start(TallyServer, key="k")
    pgs_supervisor._spawn(ref.call, ("sleep", 3))
    await trio.testing.wait_all_tasks_blocked()
    await ref.cast(("add", "x"))
    start = trio.current_time()
    await wait_all_idle(pgs_supervisor)
    assert trio.current_time() - start == pytest.approx(3)
    assert pgs_supervisor.statistics().messages == 2


async def test_pgs_store_fixture_starts_healthy(pgs_store, pgs_supervisor):  # noqa: F811
    ref = await pgs_supervisor.start(TallyServer, key="k")
    assert await ref.call(("add", "x")) == 1
    pgs_store.fail_next("commit")
    with pytest.raises(PersistenceError):
        await ref.call(("add", "y"))


def test_fail_next_checks_where():
    with pytest.raises(ValueError, match="'load' or 'commit'"):
        FaultyStore().fail_next("save")  # type: ignore[arg-type]


async def test_simulated_crash_is_a_server_crashed_for_callers(pgs_supervisor):  # noqa: F811
    from trio_pgs.testing import SimulatedCrash

    ref = await pgs_supervisor.start(TallyServer, key="k")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(crash, ref)
    with pytest.raises(ServerCrashed):
        await ref.call("crash")
    assert issubclass(SimulatedCrash, Exception)
