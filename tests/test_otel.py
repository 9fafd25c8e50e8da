"""OpenTelemetry (`trio_pgs.otel.Telemetry`), seen through the SDK's in-memory
exporters: spans parented from caller to handler (through casts, nested calls, and
across cluster nodes), errors on spans, and metrics that agree with
`PersistentSupervisor.statistics`. Providers are passed to `Telemetry`, never set
globally."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from trio_pgs import (
    MemoryStore,
    PersistentSupervisor,
    Reply,
    RequestError,
    ServerCrashed,
    ServerQuarantined,
)
from trio_pgs._events import Tracing
from trio_pgs.otel import Telemetry
from trio_pgs.testing import wait_all_idle

from . import otel_node
from .postgres import Server
from .servers import InlineTally, Tally, TallyServer


class Otel:
    """A `Telemetry` on providers of its own, and what their in-memory exporters got."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.tracer_provider = TracerProvider(shutdown_on_exit=False)
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader], shutdown_on_exit=False)
        self.telemetry = Telemetry(
            tracer_provider=self.tracer_provider, meter_provider=self.meter_provider
        )
        self.tracer = self.tracer_provider.get_tracer("test")

    def spans(self, name: str) -> list[ReadableSpan]:
        return [s for s in self.exporter.get_finished_spans() if s.name == name]

    def span(self, name: str) -> ReadableSpan:
        (span,) = self.spans(name)
        return span

    def points(self, name: str) -> list[Any]:
        """The data points of metric *name* in a collection made now."""
        return points_in(self.reader.get_metrics_data(), name)

    def value(self, name: str, attributes: dict[str, str] | None = None) -> float:
        """The sum of *name*'s points (of a histogram: their count) whose attributes
        include *attributes*."""
        return value_of(self.points(name), attributes or {})


def points_in(data: Any, name: str) -> list[Any]:
    if data is None:
        return []
    return [
        point
        for resource in data.resource_metrics for scope in resource.scope_metrics
        for metric in scope.metrics if metric.name == name
        for point in metric.data.data_points
    ]


def value_of(points: list[Any], attributes: dict[str, str]) -> float:
    return sum(
        p.count if hasattr(p, "bucket_counts") else p.value
        for p in points if attributes.items() <= dict(p.attributes).items()
    )


@pytest.fixture
def otel() -> Iterator[Otel]:
    kit = Otel()
    yield kit
    kit.tracer_provider.shutdown()
    kit.meter_provider.shutdown()


def parent_of(span: ReadableSpan) -> int | None:
    return None if span.parent is None else span.parent.span_id


def span_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return span.context.span_id


def trace_ids(*spans: ReadableSpan) -> set[int]:
    return {s.context.trace_id for s in spans if s.context is not None}


class Traced(TallyServer):
    """A tally whose handler starts a span of its own (as a user's code would)."""

    kind = "traced"
    tracer: Any = None

    async def handle_call(self, request: Any, state: Tally) -> Any:
        if request == "work":
            with self.tracer.start_as_current_span("the handler's own work"):
                await trio.lowlevel.checkpoint()
            return Reply("done", state)
        return await super().handle_call(request, state)


class Fragile(TallyServer):
    """Quarantined at its first crash."""

    kind = "fragile"
    max_crashes = 1


# -- spans ------------------------------------------------------------------------------


async def test_a_telemetry_is_a_hook_that_traces(otel: Otel):
    assert isinstance(otel.telemetry, Tracing)
    async with PersistentSupervisor(store=MemoryStore(), on_event=otel.telemetry) as sup:
        assert sup._tracing is otel.telemetry


@pytest.mark.parametrize("cls", [TallyServer, InlineTally])  # a traced call is never inline
async def test_a_calls_handler_span_is_the_child_of_the_callers_span(otel: Otel, cls: Any):
    async with PersistentSupervisor(store=MemoryStore(), on_event=otel.telemetry) as sup:
        ref = await sup.start(cls, key="k")
        await wait_all_idle(sup)
        with otel.tracer.start_as_current_span("request") as root:
            assert await ref.call(("add", "x")) == 1
            assert trace.get_current_span() is root  # the call's span is no longer current
    request = otel.span("request")
    call = otel.span(f"trio_pgs call {cls.kind}")
    handler = otel.span(f"trio_pgs handle call {cls.kind}")
    assert parent_of(call) == span_id(request)
    assert parent_of(handler) == span_id(call)
    assert len(trace_ids(request, call, handler)) == 1
    assert (call.kind, handler.kind) == (SpanKind.CLIENT, SpanKind.SERVER)
    assert dict(call.attributes or {}) == {
        "trio_pgs.supervisor": "default", "trio_pgs.server.kind": cls.kind,
        "trio_pgs.server.key": "k", "trio_pgs.message.kind": "call",
    }
    assert dict(handler.attributes or {}) == dict(call.attributes or {})
    assert call.status.status_code is handler.status.status_code is StatusCode.UNSET


async def test_the_handlers_span_is_current_in_the_handler(otel: Otel):
    Traced.tracer = otel.tracer
    async with PersistentSupervisor(store=MemoryStore(), on_event=otel.telemetry) as sup:
        ref = await sup.start(Traced, key="k")
        assert await ref.call("work") == "done"
    work = otel.span("the handler's own work")
    assert parent_of(work) == span_id(otel.span("trio_pgs handle call traced"))


async def test_a_server_calling_another_nests_the_spans(otel: Otel):
    async with PersistentSupervisor(store=MemoryStore(), on_event=otel.telemetry) as sup:
        first = await sup.start(TallyServer, key="first")
        second = await sup.start(TallyServer, key="second")
        with otel.tracer.start_as_current_span("request"):
            await first.call(("call", second, "get"))
    by_key = {
        (s.name, (s.attributes or {})["trio_pgs.server.key"]): s
        for s in otel.exporter.get_finished_spans() if s.name != "request"
    }
    chain = [
        otel.span("request"),
        by_key["trio_pgs call tally", "first"],
        by_key["trio_pgs handle call tally", "first"],
        by_key["trio_pgs call tally", "second"],
        by_key["trio_pgs handle call tally", "second"],
    ]
    assert [parent_of(s) for s in chain[1:]] == [span_id(s) for s in chain[:-1]]
    assert len(trace_ids(*chain)) == 1


async def test_casts_and_infos_are_children_of_their_senders_span(otel: Otel):
    async with PersistentSupervisor(store=MemoryStore(), on_event=otel.telemetry) as sup:
        ref = await sup.start(TallyServer, key="k")
        with otel.tracer.start_as_current_span("request"):
            await ref.cast(("add", "x"))
            await ref.send(("add", "y"))
        await ref.call("get")  # both handled
    request = otel.span("request")
    for kind in ("cast", "info"):
        sent = otel.span(f"trio_pgs {kind} tally")
        handler = otel.span(f"trio_pgs handle {kind} tally")
        assert parent_of(sent) == span_id(request)
        assert parent_of(handler) == span_id(sent)
        assert len(trace_ids(request, sent, handler)) == 1
        assert (sent.kind, handler.kind) == (SpanKind.PRODUCER, SpanKind.CONSUMER)


async def test_a_stop_is_a_client_span_and_its_handling_a_server_span(otel: Otel):
    async with PersistentSupervisor(store=MemoryStore(), on_event=otel.telemetry) as sup:
        ref = await sup.start(TallyServer, key="k")
        await ref.stop()
    stop, handler = otel.span("trio_pgs stop tally"), otel.span("trio_pgs handle stop tally")
    assert parent_of(handler) == span_id(stop)
    assert (stop.kind, handler.kind) == (SpanKind.CLIENT, SpanKind.SERVER)


async def test_an_exception_in_a_handler_marks_both_spans_as_errors(otel: Otel):
    async with PersistentSupervisor(store=MemoryStore(), on_event=otel.telemetry) as sup:
        ref = await sup.start(TallyServer, key="k")
        with pytest.raises(ServerCrashed):
            await ref.call("crash")
    handler = otel.span("trio_pgs handle call tally")
    assert handler.status.status_code is StatusCode.ERROR
    assert handler.status.description == "RuntimeError: asked to crash"
    assert (handler.attributes or {})["error.type"] == "RuntimeError"
    assert [e.name for e in handler.events] == ["exception"]
    call = otel.span("trio_pgs call tally")
    assert call.status.status_code is StatusCode.ERROR
    assert (call.attributes or {})["error.type"] == "trio_pgs.ServerCrashed"


async def test_a_refusal_is_an_error_for_the_caller_only(otel: Otel):
    async with PersistentSupervisor(store=MemoryStore(), on_event=otel.telemetry) as sup:
        ref = await sup.start(TallyServer, key="k")
        with pytest.raises(RequestError):
            await ref.call(("refuse", "x"))
    handler = otel.span("trio_pgs handle call tally")
    assert handler.status.status_code is StatusCode.UNSET  # the server answered
    assert [e.name for e in handler.events] == ["exception"]
    assert otel.span("trio_pgs call tally").status.status_code is StatusCode.ERROR


async def test_a_cancelled_call_marks_its_span_as_an_error(otel: Otel, autojump_clock):
    async with PersistentSupervisor(store=MemoryStore(), on_event=otel.telemetry) as sup:
        ref = await sup.start(TallyServer, key="k")
        with trio.move_on_after(1):
            await ref.call(("sleep", 5))
        await ref.call("get")  # the sleep was handled meanwhile
    (call, _) = otel.spans("trio_pgs call tally")
    assert call.status.status_code is StatusCode.ERROR
    assert call.status.description == "Cancelled"
    assert (call.attributes or {})["error.type"] == "trio.Cancelled"


# -- metrics ----------------------------------------------------------------------------


async def test_event_counters_agree_with_statistics(otel: Otel, autojump_clock):
    async with PersistentSupervisor(store=MemoryStore(), on_event=otel.telemetry,
                                    idle_timeout=5) as sup:
        ref = await sup.start(TallyServer, key="k")
        await ref.call(("add", "x"))
        await trio.sleep(6)  # hibernates
        with pytest.raises(ServerCrashed):
            await ref.call("crash")
        await ref.cast(("add", "y"))
        fragile = await sup.start(Fragile, key="f")
        with pytest.raises(ServerCrashed):
            await fragile.call("crash")
        with pytest.raises(ServerQuarantined):
            await fragile.call("get")
        await ref.call(("stop", "done"))
        stats = sup.statistics()
        assert (stats.hibernations, stats.crashes, stats.quarantined, stats.stops) == (1, 2, 1, 1)
        ours = {"trio_pgs.supervisor": "default"}
        assert otel.value("trio_pgs.server.activations", ours) == stats.activations
        assert otel.value("trio_pgs.server.hibernations", ours) == stats.hibernations
        crashed = {"error.type": "RuntimeError"}
        assert otel.value("trio_pgs.server.crashes", crashed) == stats.crashes
        assert otel.value("trio_pgs.server.crashes", {"trio_pgs.server.kind": "fragile"}) == 1
        assert otel.value("trio_pgs.server.quarantines", ours) == stats.quarantined
        tally = {"trio_pgs.server.kind": "tally"}
        assert otel.value("trio_pgs.server.stops", tally) == stats.stops


async def test_messages_sent_are_counted_by_kind(otel: Otel):
    async with PersistentSupervisor(store=MemoryStore(), on_event=otel.telemetry) as sup:
        ref = await sup.start(TallyServer, key="k")
        for _ in range(3):
            await ref.call("get")
        await ref.cast(("add", "x"))
        await ref.send(("add", "y"))
        await ref.stop()
        sent = {
            kind: otel.value("trio_pgs.messages.sent", {"trio_pgs.message.kind": kind})
            for kind in ("call", "cast", "info", "stop")
        }
    assert sent == {"call": 3, "cast": 1, "info": 1, "stop": 1}


async def test_commit_histograms_count_every_commit_and_record(otel: Otel):
    async with PersistentSupervisor(store=MemoryStore(), on_event=otel.telemetry) as sup:
        refs = [await sup.start(TallyServer, key=f"k{i}") for i in range(5)]
        async with trio.open_nursery() as nursery:  # concurrent: batched commits
            for ref in refs:
                nursery.start_soon(ref.call, ("add", "x"))
        stats = sup.statistics()
        assert stats.commits > 0
        ours = {"trio_pgs.supervisor": "default"}
        assert otel.value("trio_pgs.commit.duration", ours) == stats.commits
        (records,) = otel.points("trio_pgs.commit.records")
        assert records.count == stats.commits
        assert records.sum == stats.records_written


async def test_the_queued_gauge_reads_the_mailboxes(otel: Otel, autojump_clock):
    async with PersistentSupervisor(store=MemoryStore(), on_event=otel.telemetry) as sup:
        ref = await sup.start(TallyServer, key="k")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ref.call, ("sleep", 10))
            await trio.testing.wait_all_tasks_blocked()
            for i in range(3):
                await ref.cast(("add", str(i)))
            assert sup.statistics().queued == 3
            assert otel.value("trio_pgs.messages.queued") == 3
            assert otel.value("trio_pgs.server.active") == 1
        await ref.call("get")  # after the casts
        assert otel.value("trio_pgs.messages.queued") == 0


async def test_statistics_can_be_collected_from_another_thread(otel: Otel):
    """As an exporter's thread does (a periodic reader, a Prometheus scrape)."""
    async with PersistentSupervisor(store=MemoryStore(), on_event=otel.telemetry) as sup:
        for i in range(20):
            await sup.start(TallyServer, key=f"k{i}")
        data = await trio.to_thread.run_sync(otel.reader.get_metrics_data)
    assert value_of(points_in(data, "trio_pgs.server.active"), {}) == 20


@pytest.mark.parametrize("cls", [TallyServer, InlineTally])  # untraced: inline if it can
async def test_metrics_without_spans_on_the_no_op_tracer_provider(otel: Otel, cls: Any):
    telemetry = Telemetry(
        tracer_provider=trace.NoOpTracerProvider(), meter_provider=otel.meter_provider
    )
    async with PersistentSupervisor(store=MemoryStore(), on_event=telemetry) as sup:
        ref = await sup.start(cls, key="k")
        await wait_all_idle(sup)
        with otel.tracer.start_as_current_span("request"):
            await ref.call(("add", "x"))
        assert otel.value("trio_pgs.messages.sent") == 1
        assert otel.value("trio_pgs.server.active") == 1
    assert [s.name for s in otel.exporter.get_finished_spans()] == ["request"]


async def test_a_closed_supervisor_is_no_longer_observed(otel: Otel):
    async with PersistentSupervisor(store=MemoryStore(), on_event=otel.telemetry) as sup:
        await sup.start(TallyServer, key="k")
        assert otel.value("trio_pgs.server.active") == 1
    assert otel.points("trio_pgs.server.active") == []
    assert otel.value("trio_pgs.server.activations") == 1  # what was counted stays


async def test_cluster_metrics_are_left_out_outside_a_cluster(otel: Otel):
    async with PersistentSupervisor(store=MemoryStore(), on_event=otel.telemetry):
        for name in ("trio_pgs.messages.forwarded", "trio_pgs.messages.served_for_others",
                     "trio_pgs.cluster.nodes"):
            assert otel.points(name) == [], name
        assert otel.value("trio_pgs.writes.fenced") == 0
        assert otel.value("trio_pgs.reminders.delivered") == 0


async def test_one_telemetry_serves_several_supervisors(otel: Otel):
    async with (
        PersistentSupervisor(store=MemoryStore(), name="one", on_event=otel.telemetry) as one,
        PersistentSupervisor(store=MemoryStore(), name="two", on_event=otel.telemetry) as two,
    ):
        await one.start(TallyServer, key="a")
        await two.start(TallyServer, key="a")
        await two.start(TallyServer, key="b")
        ref = two.ref(TallyServer, "b")
        await ref.call("get")
        assert otel.value("trio_pgs.server.active", {"trio_pgs.supervisor": "one"}) == 1
        assert otel.value("trio_pgs.server.active", {"trio_pgs.supervisor": "two"}) == 2
        assert otel.value("trio_pgs.server.activations", {"trio_pgs.supervisor": "two"}) == 2
        # each commit names its supervisor
        assert {p.attributes["trio_pgs.supervisor"]
                for p in otel.points("trio_pgs.commit.duration")} == {"one", "two"}
    assert (otel.span("trio_pgs call tally").attributes or {})["trio_pgs.supervisor"] == "two"


async def test_a_telemetry_per_supervisor_on_one_meter_provider(otel: Otel):
    """As with ``on_event=Telemetry()`` written at each supervisor: all are observed,
    and each one's commits are told apart."""
    second = Telemetry(
        tracer_provider=otel.tracer_provider, meter_provider=otel.meter_provider
    )
    async with (
        PersistentSupervisor(store=MemoryStore(), name="one", on_event=otel.telemetry) as one,
        PersistentSupervisor(store=MemoryStore(), name="two", on_event=second) as two,
    ):
        await one.start(TallyServer, key="a")
        await two.start(TallyServer, key="a")
        await two.start(TallyServer, key="b")
        assert otel.value("trio_pgs.server.active", {"trio_pgs.supervisor": "one"}) == 1
        assert otel.value("trio_pgs.server.active", {"trio_pgs.supervisor": "two"}) == 2
        for sup in (one, two):
            commits = sup.statistics().commits
            ours = {"trio_pgs.supervisor": sup.name}
            assert otel.value("trio_pgs.commit.duration", ours) == commits


# -- without OpenTelemetry ---------------------------------------------------------------


def run_python(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_trio_pgs_imports_without_opentelemetry():
    out = run_python(
        "import sys, trio_pgs\n"
        "print('opentelemetry' in sys.modules)\n"  # nothing imports it but trio_pgs.otel
        "sys.modules['opentelemetry'] = None  # as if not installed\n"
        "from trio_pgs.otel import Telemetry\n"
        "try:\n    Telemetry()\nexcept ImportError as exc:\n    print(exc)\n"
    )
    assert out.splitlines() == [
        "False",
        "trio_pgs.otel.Telemetry needs OpenTelemetry: pip install 'trio-pgs[otel]'",
    ]


def test_the_howtos_console_program_prints_its_spans_and_metrics(tmp_path: Path):
    """docs/howto/telemetry.md's program runs as written (in a process of its own: it
    sets the global providers)."""
    page = (Path(__file__).parent.parent / "docs" / "howto" / "telemetry.md").read_text()
    (program,) = [
        body for body in re.findall(r"^```python\n(.*?)^```$", page, re.M | re.S)
        if body.startswith("# telemetry_console.py")
    ]
    (tmp_path / "telemetry_console.py").write_text(program)
    result = subprocess.run([sys.executable, "telemetry_console.py"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "visits: 1" in result.stdout
    for name in ("GET /", "trio_pgs call visits", "trio_pgs handle call visits",
                 "trio_pgs.server.activations", "trio_pgs.commit.duration"):
        assert f'"name": "{name}"' in result.stdout, name


# -- across nodes ------------------------------------------------------------------------


@pytest.mark.processes
def test_the_trace_context_crosses_a_forwarded_call(postgres: Server, tmp_path: Path):
    """Node a calls, inside a span of its own, a server that node b owns: b's handler
    span is in a's trace, the child of a's call span."""
    from .test_cluster import LEASE, run_programs

    schema = postgres.schema()
    spans = {role: tmp_path / f"{role}.jsonl" for role in "ab"}
    outs = run_programs(Path(otel_node.__file__), [
        [postgres.dsn, schema, role, str(spans[role]), str(LEASE)] for role in "ab"
    ])
    answer = json.loads(outs[0])
    assert answer["reply"] == 1
    on_a = [json.loads(line) for line in spans["a"].read_text().splitlines()]
    on_b = [json.loads(line) for line in spans["b"].read_text().splitlines()]
    (root,) = [s for s in on_a if s["name"] == otel_node.ROOT]
    (call,) = [s for s in on_a if s["name"] == "trio_pgs call otel.counter"]
    (handler,) = [s for s in on_b if s["name"] == "trio_pgs handle call otel.counter"]
    assert call["parent_id"] == root["span_id"] and call["kind"] == "CLIENT"
    assert handler["trace_id"] == root["trace_id"]
    assert handler["parent_id"] == call["span_id"]
    assert handler["attributes"]["trio_pgs.server.key"] == answer["key"]
    assert not [s for s in on_a if s["name"].startswith("trio_pgs handle")]  # served on b
