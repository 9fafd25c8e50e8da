"""Observability: the on_event hook and the kind/key on log records."""

from __future__ import annotations

import logging

import pytest
import trio

from trio_pgs import (
    EventType,
    MemoryStore,
    PersistentSupervisor,
    ServerCrashed,
    ServerEvent,
    ServerQuarantined,
)

from .servers import TallyServer


def recorder() -> tuple[list[ServerEvent], object]:
    events: list[ServerEvent] = []
    return events, events.append


async def test_events_follow_a_servers_life(autojump_clock):
    events, hook = recorder()
    async with PersistentSupervisor(store=MemoryStore(), on_event=hook, idle_timeout=5,
                                    max_crashes=2) as sup:
        ref = await sup.start(TallyServer, key="k")
        await ref.call(("add", "x"))
        await trio.sleep(6)  # hibernates
        with pytest.raises(ServerCrashed):
            await ref.call("crash")
        with pytest.raises(ServerCrashed):
            await ref.call("crash")
        with pytest.raises(ServerQuarantined):
            await ref.call("get")
        await sup.release(ref)
        await ref.call(("stop", "normal"))
    lifecycle = [(e.type, e.ref.key) for e in events if e.type is not EventType.COMMITTED]
    assert lifecycle == [
        (EventType.ACTIVATED, "k"),
        (EventType.HIBERNATED, "k"),
        (EventType.ACTIVATED, "k"),
        (EventType.CRASHED, "k"),
        (EventType.ACTIVATED, "k"),
        (EventType.CRASHED, "k"),
        (EventType.QUARANTINED, "k"),
        (EventType.ACTIVATED, "k"),
        (EventType.STOPPED, "k"),
    ]
    crashed = [e for e in events if e.type is EventType.CRASHED]
    assert all(isinstance(e.error, RuntimeError) for e in crashed)
    assert [e.reason for e in events if e.type is EventType.STOPPED] == ["normal"]


async def test_committed_events_count_the_records_of_each_transaction():
    events, hook = recorder()
    async with PersistentSupervisor(store=MemoryStore(), on_event=hook) as sup:
        refs = [await sup.start(TallyServer, key=str(i)) for i in range(3)]
        async with trio.open_nursery() as nursery:
            for ref in refs:
                nursery.start_soon(ref.call, ("add", "x"))
        stats = sup.statistics()
    committed = [e for e in events if e.type is EventType.COMMITTED]
    assert len(committed) == stats.commits
    assert sum(e.records for e in committed) == stats.records_written
    assert all(e.ref is None and e.seconds >= 0 for e in committed)


async def test_a_raising_hook_is_logged_and_never_hurts_a_server(caplog):
    def broken(event: ServerEvent) -> None:
        raise ValueError("metrics backend down")

    async with PersistentSupervisor(store=MemoryStore(), on_event=broken) as sup:
        ref = await sup.start(TallyServer, key="k")
        assert await ref.call(("add", "x")) == 1
    assert "on_event raised (event: activated); ignored" in caplog.text


def test_on_event_must_be_callable():
    with pytest.raises(TypeError, match="on_event must be a callable"):
        PersistentSupervisor(store=MemoryStore(), on_event="print")  # type: ignore[arg-type]


async def test_log_records_about_a_server_carry_its_kind_and_key(caplog, autojump_clock):
    caplog.set_level(logging.DEBUG, logger="trio_pgs")
    async with PersistentSupervisor(store=MemoryStore(), idle_timeout=5) as sup:
        ref = await sup.start(TallyServer, key="k")
        with pytest.raises(ServerCrashed):
            await ref.call("crash")
        await ref.send("unknown info")
        await trio.sleep(6)
    about_k = [r for r in caplog.records if "tally/k" in r.getMessage()]
    assert len(about_k) >= 3  # activated, crashed, ignored info, hibernated...
    assert all((r.kind, r.key) == ("tally", "k") for r in about_k)
