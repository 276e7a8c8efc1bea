"""Optional OpenTelemetry tracing: publish and handle spans, linked through envelope headers.

omnidaemon does not depend on OpenTelemetry. When `opentelemetry-api` is installed *and* the
application has configured a tracer provider (`opentelemetry.trace.set_tracer_provider`, or
the `OTEL_PYTHON_TRACER_PROVIDER` variable, as `opentelemetry-instrument` does), every
published event gets a short PRODUCER span and carries its W3C trace context (`traceparent`,
`tracestate`, and any baggage of the configured propagators) in the envelope's `headers`;
every handled event gets a CONSUMER span in the same trace. Otherwise the functions below do
nothing and cost next to nothing: the check for OpenTelemetry runs once, when this module is
imported, and OpenTelemetry itself is imported only on first use.

The spans follow the OpenTelemetry messaging conventions:

- `publish <topic>`, kind PRODUCER, a child of whatever span is current where the event is
  published (a new trace when none is). It marks the creation of the message, so its duration
  is the encoding of the event, not the round trip to the bus; its context is the message's
  creation context, carried in the headers.
- `process <topic>`, kind CONSUMER, one per handling attempt of each agent. Its parent is the
  creation context from the headers, so publisher and consumers share one trace (each agent of
  a fan-out, and each retry, is another child of the same PRODUCER span); the creation context
  is also added as a span link, which is what the conventions require. Events without trace
  headers start a new trace: a consumer span never inherits an unrelated span that happens to
  be current in the worker.

Trust: the headers are the publisher's to write. Adopting their context as the parent lets a
publisher choose the trace id of the worker's spans and, through the sampled flag and a
parent-based sampler (the SDK's default), whether they are recorded at all. The flags are
passed on as they came, never forced. With `trust_parent=False` (`Settings.
trust_trace_context`, `OMNIDAEMON_TRUST_TRACE_CONTEXT=0`) the consumer span starts a trace of
its own, sampled by the worker's own sampler, and keeps the publisher's context as a span link
only, which samplers do not follow.

Attributes: `messaging.system` (`omnidaemon`), `messaging.destination.name` (the topic),
`messaging.operation.name` / `messaging.operation.type`, `messaging.message.id` (the event id,
when known), and on consumer spans `messaging.consumer.group.name` (the agent) and
`omnidaemon.attempt` (1-based).

The tracer is named `omnidaemon` with the package's version. The global tracer provider is
looked up on every call, so one configured after omnidaemon was imported is used; tests may
pass `tracer_provider=` explicitly instead.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager
from contextvars import ContextVar
from importlib.util import find_spec
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.trace import Span, Tracer, TracerProvider

__all__ = [
    "MESSAGING_SYSTEM",
    "TRACER_NAME",
    "TRACING_AVAILABLE",
    "handle_span",
    "publish_headers",
    "record_failure",
    "recording",
]


def _otel_installed() -> bool:
    try:
        return (
            find_spec("opentelemetry.trace") is not None
            and find_spec("opentelemetry.propagate") is not None
        )
    except (ImportError, ValueError):  # a broken or half-installed namespace package
        return False


TRACING_AVAILABLE: bool = _otel_installed()
"""Whether `opentelemetry-api` is installed. When false, every function here is a no-op."""

TRACER_NAME = "omnidaemon"
"""The instrumentation scope name of omnidaemon's spans."""

MESSAGING_SYSTEM = "omnidaemon"
"""The `messaging.system` attribute of omnidaemon's spans."""

# The tracer of the provider last used: (provider, tracer). Providers hand out a new tracer
# object per `get_tracer` call, so one is kept rather than asked for on every event.
_tracer_cache: tuple[object, Tracer] | None = None

# The CONSUMER span of the handling under way in this task (for `record_failure`).
_handling_span: ContextVar[Span | None] = ContextVar("omnidaemon_handling_span", default=None)

_NULL_CONTEXT: AbstractContextManager[Any] = contextlib.nullcontext()


_trace_api: Any = None  # the `opentelemetry.trace` module, once imported
_unconfigured: tuple[type, ...] = ()  # its provider classes that mean "nothing configured"
# While no provider is configured, that is looked at again at most this often: asking costs
# about as much as the rest of handling a no-op event. A provider configured after the worker
# started is used within this many seconds.
_RECHECK_UNCONFIGURED = 1.0
_unconfigured_until = 0.0


def _tracer(tracer_provider: TracerProvider | None) -> Tracer | None:
    """The omnidaemon tracer of `tracer_provider` (default: the global provider), or `None`
    when no provider is configured (OpenTelemetry's default proxy or no-op provider)."""
    global _tracer_cache, _trace_api, _unconfigured, _unconfigured_until
    provider = tracer_provider
    if provider is None:
        if _unconfigured_until and time.monotonic() < _unconfigured_until:
            return None
        # Called for every event published and handled: the module and the classes are
        # looked up once.
        if _trace_api is None:
            from opentelemetry import trace as api

            _trace_api = api
            _unconfigured = (api.ProxyTracerProvider, api.NoOpTracerProvider)
        provider = _trace_api.get_tracer_provider()
        # The API's default when nothing was configured: its spans would all be no-ops.
        if isinstance(provider, _unconfigured):
            _unconfigured_until = time.monotonic() + _RECHECK_UNCONFIGURED
            return None
        _unconfigured_until = 0.0
    cached = _tracer_cache
    if cached is not None and cached[0] is provider:
        return cached[1]
    from omnidaemon import __version__  # lazily: omnidaemon imports this package

    tracer = provider.get_tracer(TRACER_NAME, __version__)
    _tracer_cache = (provider, tracer)
    return tracer


def recording(tracer_provider: TracerProvider | None = None) -> bool:
    """True when spans are recorded: OpenTelemetry is installed and a tracer provider is
    configured. A cheap check the hot path makes before building a span's attributes."""
    return TRACING_AVAILABLE and _tracer(tracer_provider) is not None


def publish_headers(
    topic: str,
    headers: Mapping[str, str] | None,
    *,
    event_id: str | None = None,
    tracer_provider: TracerProvider | None = None,
) -> Mapping[str, str] | None:
    """Return the headers to publish an event with: `headers` plus the trace context.

    With OpenTelemetry installed and a tracer provider configured, records a PRODUCER span
    `publish <topic>` (a child of the current span, if any) and returns a copy of `headers`
    with that span's context injected by the configured propagators (by default W3C
    `traceparent` and `tracestate`, and baggage); trace headers already in `headers` are
    replaced. Otherwise returns `headers` itself, unchanged.

    Args:
        topic: The topic the event is published to.
        headers: The event's headers as given by the publisher (not modified).
        event_id: The event's id, recorded as `messaging.message.id` when given.
        tracer_provider: Use this provider instead of the global one (mainly for tests).
    """
    if not TRACING_AVAILABLE:
        return headers
    tracer = _tracer(tracer_provider)
    if tracer is None:
        return headers
    from opentelemetry import propagate, trace

    attributes: dict[str, str] = {
        "messaging.system": MESSAGING_SYSTEM,
        "messaging.destination.name": topic,
        "messaging.operation.name": "publish",
        "messaging.operation.type": "send",
    }
    if event_id is not None:
        attributes["messaging.message.id"] = event_id
    span = tracer.start_span(
        f"publish {topic}", kind=trace.SpanKind.PRODUCER, attributes=attributes
    )
    try:
        if not span.get_span_context().is_valid:  # a disabled SDK: nothing to propagate
            return headers
        carrier: dict[str, str] = dict(headers) if headers else {}
        propagate.inject(carrier, context=trace.set_span_in_context(span))
        return carrier
    finally:
        span.end()


def handle_span(
    *,
    topic: str,
    agent: str,
    event_id: str,
    attempt: int,
    headers: Mapping[str, str] | None,
    tracer_provider: TracerProvider | None = None,
    trust_parent: bool = True,
    run_id: str | None = None,
) -> AbstractContextManager[Any]:
    """A context manager that traces one handling attempt as the CONSUMER span `process <topic>`.

    The span is current inside the block, so events published there are its children. Its
    parent is the trace context carried in `headers` (set by `publish_headers`), which is also
    added as a link; with `trust_parent=False` that context is only the link, and the span
    starts a new trace. If the block raises an `Exception`, it is recorded on the span and the
    span's status is ERROR; cancellation is not an error. It is a plain (synchronous) context
    manager that may enclose `await`s: the span stays current across them, within one task.
    Entering it yields the span.

    With OpenTelemetry missing or no tracer provider configured, returns a shared
    `contextlib.nullcontext()` (which yields `None`).

    Args:
        topic: The topic the event was published to.
        agent: The handling agent's name (its consumer group).
        event_id: The event's id.
        attempt: The delivery attempt, 1-based.
        headers: The envelope's headers, carrying the publisher's trace context, if any.
        tracer_provider: Use this provider instead of the global one (mainly for tests).
        trust_parent: Whether the publisher's context becomes the span's parent (its trace
            and its sampled flag), or only a link from a new trace.
        run_id: The event's correlation id, recorded as `messaging.message.conversation_id`:
            the id `omnidaemon trace` shows the run under.
    """
    if not TRACING_AVAILABLE:
        return _NULL_CONTEXT
    tracer = _tracer(tracer_provider)
    if tracer is None:
        return _NULL_CONTEXT
    return _consumer_span(tracer, topic, agent, event_id, attempt, headers, trust_parent, run_id)


@contextlib.contextmanager
def _consumer_span(
    tracer: Tracer,
    topic: str,
    agent: str,
    event_id: str,
    attempt: int,
    headers: Mapping[str, str] | None,
    trust_parent: bool,
    run_id: str | None,
) -> Iterator[Span]:
    from opentelemetry import propagate, trace
    from opentelemetry.context import Context

    # Extract into an empty context: an event without trace headers starts a new trace.
    parent = propagate.extract(headers, context=Context()) if headers else Context()
    producer = trace.get_current_span(parent).get_span_context()
    links = [trace.Link(producer)] if producer.is_valid else None
    if not trust_parent:
        # The publisher's context stays a link only: the worker's sampler decides on a new
        # root, and the publisher picks neither its trace id nor whether it is recorded.
        # (Baggage from the headers is dropped with it: it is the publisher's too.)
        parent = Context()
    attributes: dict[str, str | int] = {
        "messaging.system": MESSAGING_SYSTEM,
        "messaging.destination.name": topic,
        "messaging.consumer.group.name": agent,
        "messaging.message.id": event_id,
        "messaging.operation.name": "process",
        "messaging.operation.type": "process",
        "omnidaemon.attempt": attempt,
    }
    if run_id is not None:
        attributes["messaging.message.conversation_id"] = run_id
    with tracer.start_as_current_span(
        f"process {topic}",
        context=parent,
        kind=trace.SpanKind.CONSUMER,
        attributes=attributes,
        links=links,
    ) as span:
        token = _handling_span.set(span)
        try:
            yield span
        finally:
            _handling_span.reset(token)


handling_span = _handling_span.get
"""The handling span under way in this task (see `handle_span`), or `None`: one C call, for a
hot path that asks `current_ids` only when there is one."""


def current_ids() -> tuple[str, str] | None:
    """`(trace id, span id)` in hex of the handling span under way in this task (see
    `handle_span`), as OpenTelemetry exporters show them; `None` outside one or when it is
    not recorded."""
    if not TRACING_AVAILABLE:
        return None
    span = _handling_span.get()
    if span is None or not span.is_recording():
        return None
    context = span.get_span_context()
    return f"{context.trace_id:032x}", f"{context.span_id:016x}"


def record_failure(exc: BaseException, description: str | None = None) -> None:
    """Mark the handling span under way in this task (see `handle_span`) as failed.

    Records `exc` on the span and sets its status to ERROR, with `description` (default
    `"<type>: <message>"`). For failures that the worker settles itself rather than letting
    them propagate out of the `handle_span` block (a retry, a dead letter). Does nothing
    outside a handling span, or when tracing is off.
    """
    if not TRACING_AVAILABLE:
        return
    span = _handling_span.get()
    if span is None or not span.is_recording():
        return
    from opentelemetry.trace import Status, StatusCode

    span.record_exception(exc)
    span.set_status(Status(StatusCode.ERROR, description or f"{type(exc).__name__}: {exc}"))
