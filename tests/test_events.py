"""Observability: the on_event hook and the kind/key on log records."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

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
from trio_pgs._ref import ServerRef

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


class RecordingTracing:
    """A `trio_pgs.Tracing` that records what the supervisor asks of it: the context
    is a contextvar holding the name of the innermost span."""

    def __init__(self) -> None:
        import contextvars

        self.current = contextvars.ContextVar("span", default="root")
        self.log: list[tuple[str, ...]] = []
        self.opened_with: list[object] = []

    def __call__(self, event: ServerEvent) -> None:
        pass

    def opened(self, supervisor: object) -> None:
        self.opened_with.append(supervisor)

    def closed(self, supervisor: object) -> None:
        self.opened_with.remove(supervisor)

    @contextlib.contextmanager
    def _span(self, name: str, parent: str) -> Iterator[None]:
        self.log.append((name, parent))
        token = self.current.set(name)
        try:
            yield
        finally:
            self.current.reset(token)

    def sending(self, ref: ServerRef, kind: str) -> contextlib.AbstractContextManager[None]:
        return self._span(f"send {kind} {ref.key}", self.current.get())

    def capture(self) -> str:
        return self.current.get()

    def handling(
        self, ref: ServerRef, kind: str, carried: str
    ) -> contextlib.AbstractContextManager[None]:
        return self._span(f"handle {kind} {ref.key}", carried)

    def inject(self) -> dict[str, str]:
        return {"span": self.current.get()}

    def receiving(self, headers: dict[str, str]) -> contextlib.AbstractContextManager[None]:
        return self._span("received", headers["span"])


async def test_a_hook_that_traces_gets_each_handler_inside_its_senders_span(autojump_clock):
    tracing = RecordingTracing()
    async with PersistentSupervisor(store=MemoryStore(), on_event=tracing) as sup:
        assert tracing.opened_with == [sup]
        ref = await sup.start(TallyServer, key="k")
        await ref.call(("add", "x"))
        await ref.cast(("add", "y"))
        other = await sup.start(TallyServer, key="other")
        await ref.call(("call", other, "get"))
    assert tracing.opened_with == []
    log = tracing.log
    assert ("send call k", "root") in log and ("handle call k", "send call k") in log
    assert ("send cast k", "root") in log and ("handle cast k", "send cast k") in log
    # a call made by a handler is a child of that handler's span, and so on down
    assert ("send call other", "handle call k") in log
    assert ("handle call other", "send call other") in log


async def test_without_a_tracing_hook_messages_carry_nothing(autojump_clock):
    _, hook = recorder()
    async with PersistentSupervisor(store=MemoryStore(), on_event=hook) as sup:
        assert sup._tracing is None and sup._host.tracing is None
        assert "_deliver_call" not in vars(sup)  # the plain method: nothing wrapped
