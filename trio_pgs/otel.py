"""OpenTelemetry metrics and traces for supervisors: ``on_event=Telemetry()``.

Needs the ``otel`` extra (``pip install 'trio-pgs[otel]'``), which is the OpenTelemetry
API only: the application installs the SDK and the exporters it wants, and sets them up
(or passes its providers to `Telemetry`). The module imports without OpenTelemetry
installed; `Telemetry()` then raises `ImportError` saying what to install.

Nothing here is on the path of a supervisor without a `Telemetry`: the supervisor wraps
its deliveries in spans only when its ``on_event`` hook has the tracing methods.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING

from . import __version__
from ._errors import RequestError
from ._events import EventType, ServerEvent
from ._ref import ServerRef
from ._statistics import SupervisorStatistics
from ._supervisor import PersistentSupervisor

_missing: ImportError | None = None
try:
    from opentelemetry import context as otel_context
    from opentelemetry import metrics, propagate, trace
    from opentelemetry.trace import SpanKind, Status, StatusCode
except ImportError as exc:  # without the extra the module imports (the docs build's)
    _missing = exc

if TYPE_CHECKING:
    from types import TracebackType

    from opentelemetry.context import Context
    from opentelemetry.metrics import (
        CallbackOptions,
        Histogram,
        Meter,
        MeterProvider,
        Observation,
    )
    from opentelemetry.trace import Span, Tracer, TracerProvider

__all__ = ["Telemetry"]

#: The instrumentation scope of every span and metric.
SCOPE = "trio_pgs"

#: The counters of server events: (event, name, unit, description).
EVENT_COUNTERS = (
    (EventType.ACTIVATED, "trio_pgs.server.activations", "{activation}",
     "Activations: a server started, or woken from the store"),
    (EventType.HIBERNATED, "trio_pgs.server.hibernations", "{hibernation}",
     "Activations that ended with the server idle (or above max_active)"),
    (EventType.CRASHED, "trio_pgs.server.crashes", "{crash}",
     "Handler, init and activation failures"),
    (EventType.QUARANTINED, "trio_pgs.server.quarantines", "{quarantine}",
     "Crashes that put their server in quarantine (max_crashes reached)"),
    (EventType.STOPPED, "trio_pgs.server.stops", "{stop}",
     "Servers that stopped, for any reason"),
)

#: Read from `PersistentSupervisor.statistics` at each collection: (field, instrument,
#: name, unit, description, cluster only).
OBSERVED = (
    ("active", "updown", "trio_pgs.server.active", "{server}",
     "Servers active or in transition now", False),
    ("queued", "updown", "trio_pgs.messages.queued", "{message}",
     "Messages waiting in the mailboxes of the active servers now", False),
    ("reminders", "counter", "trio_pgs.reminders.delivered", "{reminder}",
     "Reminders delivered to handle_info (a redelivery after a crash counts again)", False),
    ("fenced_writes", "counter", "trio_pgs.writes.fenced", "{write}",
     "Writes the store refused because a later activation had claimed the server", False),
    ("forwarded", "counter", "trio_pgs.messages.forwarded", "{message}",
     "Messages sent to the node that owns their server", True),
    ("served_for_others", "counter", "trio_pgs.messages.served_for_others", "{message}",
     "Messages other nodes sent here", True),
    ("nodes", "gauge", "trio_pgs.cluster.nodes", "{node}",
     "The live nodes of the cluster, as this node sees them", True),
)

#: The buckets of the commit histograms (OpenTelemetry's advice for durations in
#: seconds; powers of two for batch sizes).
DURATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.075,
                    0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
BATCH_BUCKETS = tuple(float(2**i) for i in range(13))

#: The context of a message's delivery and handling when no span is made.
UNTRACED = contextlib.nullcontext()

#: Messages whose sender waits for an answer (client and server spans); the others
#: are sent and consumed (producer and consumer spans).
WAITED = frozenset({"call", "stop", "crash"})


class Telemetry:
    """OpenTelemetry metrics and spans for the supervisors it is given to as
    ``PersistentSupervisor(on_event=Telemetry())``.

    ``tracer_provider`` and ``meter_provider`` default to OpenTelemetry's global
    providers (set by the application, or by ``opentelemetry-instrument``): without an
    SDK set up, everything is a no-op. One `Telemetry` may serve several supervisors;
    their spans and metrics carry the attribute ``trio_pgs.supervisor``.

    Spans: every message sent through a ref (``call``, ``cast``, ``send``, ``stop``) is
    a span in the sender, current while the message is delivered (for a call, until
    its reply), named ``trio_pgs call <server kind>`` (``cast``, ``info``, ``stop``): of
    kind CLIENT for calls and stops, PRODUCER for casts and infos. The server handles
    the message inside a child of that span, ``trio_pgs handle call <server kind>``
    (SERVER, or CONSUMER), current in the handler: what the handler sends is its
    child in turn. In a cluster, the trace context travels with a forwarded message
    (the global propagator's headers, W3C trace context by default). A message that
    raised marks its spans as errors (status ERROR, the exception recorded), except a
    `RequestError` in the handler's span: the server answered; the caller's span
    still is an error.

    Given OpenTelemetry's ``NoOpTracerProvider()``, it makes no span at all: metrics
    only. The metrics and the spans' attributes are listed in the how-to,
    docs/howto/telemetry.md.

    Raises:
        ImportError: OpenTelemetry is not installed (``pip install 'trio-pgs[otel]'``).
    """

    def __init__(
        self,
        *,
        tracer_provider: TracerProvider | None = None,
        meter_provider: MeterProvider | None = None,
    ) -> None:
        if _missing is not None:
            raise ImportError(
                "trio_pgs.otel.Telemetry needs OpenTelemetry: pip install 'trio-pgs[otel]'"
            ) from _missing
        self._tracer: Tracer = trace.get_tracer(SCOPE, __version__, tracer_provider)
        #: Given OpenTelemetry's no-op tracer provider (metrics only), no span is made:
        #: a message costs an increment of an int.
        self._spans = not isinstance(self._tracer, trace.NoOpTracer)
        if meter_provider is None:
            meter_provider = metrics.get_meter_provider()
        meter = metrics.get_meter(SCOPE, __version__, meter_provider)
        #: The supervisors open with this Telemetry.
        self._open: dict[PersistentSupervisor, None] = {}
        self._observed = _Observed.on(meter_provider, meter)
        self._events = {
            event: meter.create_counter(name, unit, description)
            for event, name, unit, description in EVENT_COUNTERS
        }
        self._commit_duration = _histogram(
            meter, "trio_pgs.commit.duration", "s",
            "How long each store transaction of the writer took", DURATION_BUCKETS,
        )
        self._commit_records = _histogram(
            meter, "trio_pgs.commit.records", "{record}",
            "Records written (or deleted) in each store transaction: the group commit's "
            "batch size", BATCH_BUCKETS,
        )
        #: The spans' names, kinds and attributes, by supervisor, server kind, message
        #: kind and whether sending: made once, as the messages go.
        self._shapes: dict[tuple[str, str, str, bool], _Shape] = {}

    def __repr__(self) -> str:
        return f"<Telemetry of {len(self._open)} open supervisor(s)>"

    # -- metrics ----------------------------------------------------------------------

    def __call__(self, event: ServerEvent) -> None:
        """Count *event* (called by the supervisor, on its trio thread)."""
        ref = event.ref
        if ref is None:  # COMMITTED: the writes of many servers, of one supervisor
            attributes = {"trio_pgs.supervisor": event.supervisor}
            self._commit_duration.record(event.seconds, attributes)
            self._commit_records.record(event.records, attributes)
            return
        counter = self._events.get(event.type)
        if counter is None:
            return
        attributes = {"trio_pgs.supervisor": ref.supervisor, "trio_pgs.server.kind": ref.kind}
        if event.error is not None:
            attributes["error.type"] = _error_type(event.error)
        counter.add(1, attributes)

    def opened(self, supervisor: PersistentSupervisor) -> None:
        """*supervisor* opened: its statistics are observed from now on."""
        self._open[supervisor] = None
        self._observed.add(supervisor)

    def closed(self, supervisor: PersistentSupervisor) -> None:
        """*supervisor* closed: its statistics are no longer observed."""
        self._open.pop(supervisor, None)
        self._observed.remove(supervisor)

    # -- traces -------------------------------------------------------------------------

    def sending(self, ref: ServerRef, kind: str) -> AbstractContextManager[Span | None]:
        """The span of a message sent to *ref*, current while it is delivered."""
        shape = self._shapes.get((ref.supervisor, ref.kind, kind, True))
        if shape is None:
            shape = self._shape(ref, kind, sending=True)
        shape.sent += 1  # reported when the metrics are collected: no work per message
        if not self._spans:
            return UNTRACED
        span = self._tracer.start_span(
            shape.name, kind=shape.kind,
            attributes={**shape.attributes, "trio_pgs.server.key": ref.key},
        )
        return _Current(span, trace.set_span_in_context(span), refusal_is_error=True)

    def capture(self) -> Context | None:
        """The sender's context, carried by its message to the server; None when no
        span is made (metrics only): the message then goes to its handler as an
        untraced one does."""
        return otel_context.get_current() if self._spans else None

    def handling(
        self, ref: ServerRef, kind: str, carried: Context
    ) -> AbstractContextManager[Span | None]:
        """The span of *ref*'s handler, a child of the span *carried* has current."""
        if not self._spans:
            return UNTRACED
        shape = self._shapes.get((ref.supervisor, ref.kind, kind, False))
        if shape is None:
            shape = self._shape(ref, kind, sending=False)
        span = self._tracer.start_span(
            shape.name, context=carried, kind=shape.kind,
            attributes={**shape.attributes, "trio_pgs.server.key": ref.key},
        )
        return _Current(span, trace.set_span_in_context(span, carried), refusal_is_error=False)

    def _shape(self, ref: ServerRef, kind: str, *, sending: bool) -> _Shape:
        """What the spans of *kind* messages to *ref*'s kind share, made once."""
        waited = kind in WAITED
        if sending:
            shape = _Shape(f"trio_pgs {kind} {ref.kind}",
                           SpanKind.CLIENT if waited else SpanKind.PRODUCER)
        else:
            shape = _Shape(f"trio_pgs handle {kind} {ref.kind}",
                           SpanKind.SERVER if waited else SpanKind.CONSUMER)
        shape.attributes = {
            "trio_pgs.supervisor": ref.supervisor, "trio_pgs.server.kind": ref.kind,
            "trio_pgs.message.kind": kind,
        }
        self._shapes[ref.supervisor, ref.kind, kind, sending] = shape
        if sending:
            self._observed.count(shape)
        return shape

    def inject(self) -> dict[str, str]:
        """The current context as headers (the global propagator's), for another node."""
        headers: dict[str, str] = {}
        propagate.inject(headers)
        return headers

    @contextlib.contextmanager
    def receiving(self, headers: Mapping[str, str]) -> Iterator[None]:
        """The context another node's *headers* carry, current while its message is
        delivered here."""
        token = otel_context.attach(propagate.extract(headers))
        try:
            yield
        finally:
            otel_context.detach(token)


class _Observed:
    """The open supervisors whose statistics the observable instruments of one meter
    provider report, shared by every `Telemetry` on that provider: of two instruments
    of one name, the SDK keeps the first (and its callbacks), so each is made once."""

    _made: weakref.WeakKeyDictionary[object, _Observed] = weakref.WeakKeyDictionary()
    _making = threading.Lock()

    @classmethod
    def on(cls, provider: MeterProvider, meter: Meter) -> _Observed:
        """The one of *provider* (its instruments made on *meter*, the first time)."""
        with cls._making:
            observed = cls._made.get(provider)
            if observed is None:
                observed = cls._made[provider] = cls(meter)
            return observed

    def __init__(self, meter: Meter) -> None:
        #: Read by the thread that collects (an exporter's), changed by trio threads.
        self._lock = threading.Lock()
        self._open: dict[PersistentSupervisor, None] = {}
        create = {
            "updown": meter.create_observable_up_down_counter,
            "counter": meter.create_observable_counter,
            "gauge": meter.create_observable_gauge,
        }
        for field, instrument, name, unit, description, clustered in OBSERVED:
            create[instrument](name, [self._observer(field, clustered)], unit, description)
        #: The kinds of message sent (their counts are kept by the Telemetry that
        #: sends them, read here).
        self._sending: list[_Shape] = []
        meter.create_observable_counter(
            "trio_pgs.messages.sent", [self._observe_sent], "{message}",
            "Messages sent through refs, by trio_pgs.message.kind (call, cast, info, stop)",
        )

    def count(self, shape: _Shape) -> None:
        """Report how many messages of *shape* were sent."""
        with self._lock:
            self._sending.append(shape)

    def _observe_sent(self, options: CallbackOptions) -> Iterable[Observation]:
        with self._lock:
            shapes = list(self._sending)
        sent: dict[tuple[tuple[str, str], ...], int] = {}
        for shape in shapes:  # two Telemetry may have counted the same attributes
            key = tuple(shape.attributes.items())
            sent[key] = sent.get(key, 0) + shape.sent
        return [metrics.Observation(n, dict(key)) for key, n in sent.items()]

    def add(self, supervisor: PersistentSupervisor) -> None:
        with self._lock:
            self._open[supervisor] = None

    def remove(self, supervisor: PersistentSupervisor) -> None:
        with self._lock:
            self._open.pop(supervisor, None)

    def _observer(
        self, field: str, clustered: bool
    ) -> Callable[[CallbackOptions], Iterable[Observation]]:
        """The callback of the instrument that reports *field* of each open supervisor's
        statistics (of those in a cluster only, if *clustered*)."""

        def observe(options: CallbackOptions) -> Iterable[Observation]:
            with self._lock:
                open_now = list(self._open)
            observations = []
            for sup in open_now:
                if clustered and sup.cluster is None:
                    continue
                statistics = _statistics(sup)
                if statistics is not None:
                    observations.append(metrics.Observation(
                        getattr(statistics, field), {"trio_pgs.supervisor": sup.name}
                    ))
            return observations

        return observe


def _histogram(
    meter: Meter, name: str, unit: str, description: str, buckets: tuple[float, ...]
) -> Histogram:
    """A histogram with *buckets* as advice (an API older than 1.23 takes no advice)."""
    try:
        return meter.create_histogram(
            name, unit, description, explicit_bucket_boundaries_advisory=buckets
        )
    except TypeError:
        return meter.create_histogram(name, unit, description)


def _statistics(sup: PersistentSupervisor) -> SupervisorStatistics | None:
    """*sup*'s statistics, possibly read from another thread (an exporter's).

    They are read here rather than through `trio.from_thread`: a collection on the trio
    thread (a reader's ``collect()``) while another thread's waits for the trio thread
    would deadlock on the SDK's lock. Off the trio thread, a mailbox map changed while
    it was read raises RuntimeError: read again."""
    for _ in range(3):
        try:
            return sup.statistics()
        except RuntimeError:
            continue
    return None


def _error_type(error: BaseException) -> str:
    """The ``error.type`` of *error*: its class's full name, by the public module that
    exports it (``trio_pgs.ServerCrashed``, ``trio.Cancelled``), builtins by their name."""
    cls = type(error)
    module = cls.__module__
    if module == "builtins":
        return cls.__qualname__
    public = module.split("._")[0]
    if public != module and getattr(sys.modules.get(public), cls.__qualname__, None) is cls:
        module = public
    return f"{module}.{cls.__qualname__}"


class _Shape:
    """The name, kind and attributes (but the key) of a kind of span; for a message
    sent, how many were sent."""

    __slots__ = ("attributes", "kind", "name", "sent")

    def __init__(self, name: str, kind: SpanKind) -> None:
        self.name = name
        self.kind = kind
        self.attributes: dict[str, str] = {}
        self.sent = 0


class _Current:
    """*span* current (as *context*) in this task for a ``with`` block, then ended;
    marked as an error if the block raised. (A class: on every message, it costs less
    than a generator's context manager.)"""

    __slots__ = ("_context", "_refusal_is_error", "_span", "_token")

    def __init__(self, span: Span, context: Context, *, refusal_is_error: bool) -> None:
        self._span = span
        self._context = context
        self._refusal_is_error = refusal_is_error

    def __enter__(self) -> Span:
        self._token = otel_context.attach(self._context)
        return self._span

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        span = self._span
        try:
            if isinstance(exc, Exception):
                span.record_exception(exc)
                if self._refusal_is_error or not isinstance(exc, RequestError):
                    _failed(span, exc, f"{type(exc).__name__}: {exc}")
            elif exc is not None:  # cancelled, interrupted: no traceback worth keeping
                _failed(span, exc, type(exc).__name__)
        finally:
            otel_context.detach(self._token)
            span.end()


def _failed(span: Span, error: BaseException, description: str) -> None:
    span.set_attribute("error.type", _error_type(error))
    span.set_status(Status(StatusCode.ERROR, description))
