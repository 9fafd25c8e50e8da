"""A cluster node with OpenTelemetry tracing, for tests/test_otel.py.

Run as ``python tests/otel_node.py DSN SCHEMA ROLE SPANS LEASE``: it opens a
`PersistentSupervisor` named ``NAME`` on a `PostgresStore` in SCHEMA, as a node of a
cluster (127.0.0.1, a lease of LEASE seconds), with ``on_event=Telemetry(...)`` whose
tracer provider writes every finished span to the file SPANS, one JSON object a line
(name, kind, trace_id, span_id, parent_id in hex, attributes).

Role ``a``, once both nodes see each other, starts a server that node b owns, then calls
it inside a span of its own named ``ROOT``, and prints ``{"key": ..., "reply": ...}``.
Role ``b`` serves that call, then leaves a moment later (or after ``DEADLINE`` s).
"""

from __future__ import annotations

import json
import sys
from typing import Any

import attrs
import trio
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor

import trio_pgs
from trio_pgs import PersistentServer, PersistentSupervisor, Reply
from trio_pgs.otel import Telemetry

NAME = "otel-test"
ROOT = "the test's request"
SECRET = b"trio-pgs otel test secret, 32 bytes+"
#: How long node b waits for the call before it gives up.
DEADLINE = 30.0

#: Set by the server's handler, in the process that handles the call.
handled: trio.Event | None = None


@attrs.define
class Count:
    n: int = 0


class Counter(PersistentServer[Count]):
    kind = "otel.counter"
    idle_timeout = None

    async def init(self) -> Count:
        return Count()

    async def handle_call(self, request: Any, state: Count) -> Any:
        if request == "incr":
            if handled is not None:
                handled.set()
            return Reply(state.n + 1, Count(state.n + 1))
        return await super().handle_call(request, state)


def as_json(span: ReadableSpan) -> str:
    context, parent = span.context, span.parent
    assert context is not None
    return json.dumps({
        "name": span.name,
        "kind": span.kind.name,
        "trace_id": f"{context.trace_id:032x}",
        "span_id": f"{context.span_id:016x}",
        "parent_id": None if parent is None else f"{parent.span_id:016x}",
        "attributes": dict(span.attributes or {}),
    }) + "\n"


async def main(dsn: str, schema: str, role: str, spans: str, lease: str) -> None:
    global handled
    handled = trio.Event()
    with open(spans, "w") as out:
        provider = TracerProvider(shutdown_on_exit=False)
        exporter = ConsoleSpanExporter(out=out, formatter=as_json)
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        try:
            await run(dsn, schema, role, lease, provider)
        finally:
            provider.shutdown()


async def run(dsn: str, schema: str, role: str, lease: str, provider: TracerProvider) -> None:
    assert handled is not None
    store = trio_pgs.PostgresStore(dsn, schema=schema)
    cluster = trio_pgs.Cluster(secret=SECRET, lease=float(lease))
    async with PersistentSupervisor(
        store=store, name=NAME, servers=[Counter], cluster=cluster,
        on_event=Telemetry(tracer_provider=provider),
    ) as sup:
        while sup.statistics().nodes < 2:
            await trio.sleep(0.05)
        await trio.sleep(float(lease))  # both see both: the same owners
        if role == "b":
            with trio.move_on_after(DEADLINE):
                await handled.wait()
            await trio.sleep(1)  # the reply reaches node a
            return
        node = sup._node
        assert node is not None
        key = next(f"k{i}" for i in range(100)
                   if node.owner_of(sup.ref(Counter, f"k{i}")) != node.node)
        ref = await sup.start(Counter, key=key)
        with provider.get_tracer("otel_node").start_as_current_span(ROOT):
            reply = await ref.call("incr")
        print(json.dumps({"key": key, "reply": reply}), flush=True)

if __name__ == "__main__":
    trio.run(main, *sys.argv[1:])
