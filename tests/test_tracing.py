"""Optional OpenTelemetry tracing (`omnidaemon.observability.tracing`).

The SDK tests use a private `TracerProvider` per test, passed explicitly or swapped in for the
global lookup with monkeypatch: the real global provider can be set only once per process.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel
import pytest

import omnidaemon
from omnidaemon.observability import tracing

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

TRACEPARENT_VERSION = "00"


@dataclass
class Traced:
    provider: TracerProvider
    exporter: InMemorySpanExporter

    def spans(self) -> tuple[ReadableSpan, ...]:
        return self.exporter.get_finished_spans()

    def span(self, name: str) -> ReadableSpan:
        found = [s for s in self.spans() if s.name == name]
        assert len(found) == 1, [s.name for s in self.spans()]
        return found[0]


@pytest.fixture
def traced() -> Iterator[Traced]:
    """A configured SDK provider recording finished spans in memory."""
    pytest.importorskip("opentelemetry.sdk.trace")
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield Traced(provider, exporter)
    provider.shutdown()


@pytest.fixture
def global_traced(traced: Traced, monkeypatch: pytest.MonkeyPatch) -> Traced:
    """`traced`, also returned by `opentelemetry.trace.get_tracer_provider()`."""
    from opentelemetry import trace

    monkeypatch.setattr(trace, "get_tracer_provider", lambda: traced.provider)
    # Forget an "unconfigured" verdict an earlier test left (it is kept for a second).
    monkeypatch.setattr(tracing, "_unconfigured_until", 0.0)
    return traced


def _trace_id(traceparent: str) -> int:
    version, trace_id, _span_id, _flags = traceparent.split("-")
    assert version == TRACEPARENT_VERSION
    return int(trace_id, 16)


def _span_id(traceparent: str) -> int:
    return int(traceparent.split("-")[2], 16)


def _handle(headers: Any, **options: Any) -> Any:
    fields: dict[str, Any] = {
        "topic": "document.uploaded",
        "agent": "extract_text",
        "event_id": "ev-1",
        "attempt": 2,
        "headers": headers,
    }
    fields.update(options)
    return tracing.handle_span(**fields)


# Publish ------------------------------------------------------------------------------------


def test_publish_inside_a_span_injects_its_trace(traced: Traced) -> None:
    from opentelemetry.trace import SpanKind

    tracer = traced.provider.get_tracer("test")
    given = {"x-app": "1"}
    with tracer.start_as_current_span("request") as parent:
        headers = tracing.publish_headers(
            "document.uploaded", given, event_id="ev-1", tracer_provider=traced.provider
        )
    assert headers is not None and headers is not given
    assert given == {"x-app": "1"}, "the caller's headers are not modified"
    assert headers["x-app"] == "1"
    parent_ctx = parent.get_span_context()
    assert _trace_id(headers["traceparent"]) == parent_ctx.trace_id

    publish = traced.span("publish document.uploaded")
    assert publish.kind is SpanKind.PRODUCER
    assert publish.parent is not None and publish.parent.span_id == parent_ctx.span_id
    assert publish.context is not None
    # What travels is the PRODUCER span's context: the message's creation context.
    assert _span_id(headers["traceparent"]) == publish.context.span_id
    assert dict(publish.attributes or {}) == {
        "messaging.system": "omnidaemon",
        "messaging.destination.name": "document.uploaded",
        "messaging.operation.name": "publish",
        "messaging.operation.type": "send",
        "messaging.message.id": "ev-1",
    }
    assert publish.instrumentation_scope is not None
    assert publish.instrumentation_scope.name == "omnidaemon"
    assert publish.instrumentation_scope.version == omnidaemon.__version__


def test_publish_without_a_current_span_starts_a_trace(traced: Traced) -> None:
    headers = tracing.publish_headers("a.b", None, tracer_provider=traced.provider)
    assert headers is not None and set(headers) >= {"traceparent"}
    publish = traced.span("publish a.b")
    assert publish.parent is None
    assert "messaging.message.id" not in (publish.attributes or {})
    assert publish.context is not None
    assert _trace_id(headers["traceparent"]) == publish.context.trace_id


def test_publish_replaces_stale_trace_headers(traced: Traced) -> None:
    stale = "00-" + "1" * 32 + "-" + "2" * 16 + "-01"
    headers = tracing.publish_headers(
        "a.b", {"traceparent": stale}, tracer_provider=traced.provider
    )
    assert headers is not None and headers["traceparent"] != stale


def test_publish_uses_the_global_provider(global_traced: Traced) -> None:
    headers = tracing.publish_headers("a.b", None)
    assert headers is not None and "traceparent" in headers
    assert [s.name for s in global_traced.spans()] == ["publish a.b"]


# Handle -------------------------------------------------------------------------------------


def test_handle_span_joins_the_publishers_trace_with_a_link(traced: Traced) -> None:
    from opentelemetry.trace import SpanKind, StatusCode

    headers = tracing.publish_headers(
        "document.uploaded", {"x-app": "1"}, tracer_provider=traced.provider
    )
    with _handle(headers, tracer_provider=traced.provider) as span:
        assert span is not None and span.is_recording()

    publish = traced.span("publish document.uploaded")
    process = traced.span("process document.uploaded")
    assert publish.context is not None and process.context is not None
    assert process.kind is SpanKind.CONSUMER
    assert process.context.trace_id == publish.context.trace_id
    assert process.parent is not None and process.parent.span_id == publish.context.span_id
    assert [link.context.span_id for link in process.links] == [publish.context.span_id]
    assert process.links[0].context.trace_id == publish.context.trace_id
    assert dict(process.attributes or {}) == {
        "messaging.system": "omnidaemon",
        "messaging.destination.name": "document.uploaded",
        "messaging.consumer.group.name": "extract_text",
        "messaging.message.id": "ev-1",
        "messaging.operation.name": "process",
        "messaging.operation.type": "process",
        "omnidaemon.attempt": 2,
    }
    assert process.status.status_code is StatusCode.UNSET


def test_handle_span_records_an_exception_as_error(traced: Traced) -> None:
    from opentelemetry.trace import StatusCode

    with (
        pytest.raises(ValueError, match="bad pdf"),
        _handle(None, tracer_provider=traced.provider),
    ):
        raise ValueError("bad pdf")
    process = traced.span("process document.uploaded")
    assert process.status.status_code is StatusCode.ERROR
    assert process.status.description == "ValueError: bad pdf"
    [event] = process.events
    assert event.name == "exception"
    assert (event.attributes or {})["exception.type"] == "ValueError"


def test_handle_span_without_trace_headers_starts_a_new_trace(traced: Traced) -> None:
    tracer = traced.provider.get_tracer("test")
    with (
        tracer.start_as_current_span("unrelated") as unrelated,
        _handle({"x-app": "1"}, tracer_provider=traced.provider),
    ):
        pass
    process = traced.span("process document.uploaded")
    assert process.parent is None, "a consumer span never inherits an unrelated current span"
    assert process.links == ()
    assert process.context is not None
    assert process.context.trace_id != unrelated.get_span_context().trace_id


FORGED_TRACE = 0x0AF7651916CD43DD8448EB211C80319C
FORGED_SPAN = 0xB7AD6B7169203331


def _forged(flags: str) -> dict[str, str]:
    """Trace headers a publisher wrote by hand, not from a span omnidaemon made."""
    return {"traceparent": f"00-{FORGED_TRACE:032x}-{FORGED_SPAN:016x}-{flags}"}


@pytest.mark.parametrize("flags", ["00", "01"])
def test_a_trusted_publishers_sampled_flag_is_respected_not_forced(
    traced: Traced, flags: str
) -> None:
    with _handle(_forged(flags), tracer_provider=traced.provider) as span:
        assert span.get_span_context().trace_id == FORGED_TRACE
        assert span.is_recording() is (flags == "01")
    if flags == "00":
        assert traced.spans() == ()
        return
    process = traced.span("process document.uploaded")
    assert process.parent is not None and process.parent.span_id == FORGED_SPAN


@pytest.mark.parametrize("flags", ["00", "01"])
def test_an_untrusted_publishers_context_is_a_link_from_a_new_trace(
    traced: Traced, flags: str
) -> None:
    """The publisher picks neither the trace the worker's span joins nor whether it is
    recorded: the worker's sampler decides (here: always on)."""
    with _handle(_forged(flags), tracer_provider=traced.provider, trust_parent=False) as span:
        assert span.is_recording()
    process = traced.span("process document.uploaded")
    assert process.parent is None
    assert process.context is not None and process.context.trace_id != FORGED_TRACE
    [link] = process.links
    assert (link.context.trace_id, link.context.span_id) == (FORGED_TRACE, FORGED_SPAN)
    assert link.context.trace_flags.sampled is (flags == "01")


def test_an_untrusted_publisher_cannot_force_sampling(traced: Traced) -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased

    provider = TracerProvider(sampler=ParentBased(ALWAYS_OFF))  # records only what it is told
    provider.add_span_processor(SimpleSpanProcessor(traced.exporter))
    with _handle(_forged("01"), tracer_provider=provider, trust_parent=False) as span:
        assert not span.is_recording()
    with _handle(_forged("01"), tracer_provider=provider) as span:
        assert span.is_recording(), "a trusted publisher's sampled flag stands"
    assert len(traced.spans()) == 1
    provider.shutdown()


@pytest.mark.anyio
async def test_a_worker_with_untrusted_trace_context_starts_its_own_traces(
    global_traced: Traced,
) -> None:
    from omnidaemon import App
    from omnidaemon.brokers import MemoryBroker
    from omnidaemon.envelope import Envelope
    from omnidaemon.settings import Settings
    from omnidaemon.testing import TestApp

    assert Settings.from_env({}).trust_trace_context is True
    settings = Settings.from_env({"OMNIDAEMON_TRUST_TRACE_CONTEXT": "0"})
    app = App("traced", broker=MemoryBroker(None), settings=settings)

    @app.agent("document.uploaded")
    async def extract_text(event: dict[str, str]) -> None: ...

    async with TestApp(app) as bus:
        # Written to the bus as an untrusted producer would, trace headers and all.
        envelope = Envelope.new("document.uploaded", {"file": "a.pdf"}, headers=_forged("01"))
        await bus.broker.publish("document.uploaded", envelope.encode())
        await bus.drain()
    process = global_traced.span("process document.uploaded")
    assert process.parent is None
    assert process.context is not None and process.context.trace_id != FORGED_TRACE
    assert [link.context.span_id for link in process.links] == [FORGED_SPAN]


def test_the_trust_setting_refuses_values_it_does_not_know() -> None:
    from omnidaemon import ConfigurationError
    from omnidaemon.settings import Settings

    assert Settings.from_env({"OMNIDAEMON_TRUST_TRACE_CONTEXT": "yes"}).trust_trace_context
    with pytest.raises(ConfigurationError, match="OMNIDAEMON_TRUST_TRACE_CONTEXT='maybe'"):
        Settings.from_env({"OMNIDAEMON_TRUST_TRACE_CONTEXT": "maybe"})


@pytest.mark.anyio
async def test_handle_span_stays_current_across_awaits(traced: Traced) -> None:
    from opentelemetry import trace

    headers = tracing.publish_headers("a.b", None, tracer_provider=traced.provider)

    async def handler() -> str | None:
        await anyio.lowlevel.checkpoint()
        current = trace.get_current_span().get_span_context()
        await anyio.lowlevel.checkpoint()
        assert trace.get_current_span().get_span_context() == current
        # What a handler publishes is a child of its CONSUMER span.
        out = tracing.publish_headers("c.d", None, tracer_provider=traced.provider)
        return None if out is None else out["traceparent"]

    with _handle(headers, topic="a.b", tracer_provider=traced.provider) as span:
        child_traceparent = await handler()
    assert trace.get_current_span() is not span, "the span is no longer current after"
    process = traced.span("process a.b")
    child = traced.span("publish c.d")
    assert process.context is not None and child.context is not None
    assert child.parent is not None and child.parent.span_id == process.context.span_id
    assert child_traceparent is not None
    assert _trace_id(child_traceparent) == process.context.trace_id


@pytest.mark.anyio
async def test_cancellation_is_not_an_error(traced: Traced) -> None:
    from opentelemetry.trace import StatusCode

    with anyio.move_on_after(0), _handle(None, tracer_provider=traced.provider):
        await anyio.sleep(10)
    assert traced.span("process document.uploaded").status.status_code is StatusCode.UNSET


def test_record_failure_marks_the_handling_span(traced: Traced) -> None:
    from opentelemetry.trace import StatusCode

    tracer = traced.provider.get_tracer("test")
    with tracer.start_as_current_span("outer"):
        tracing.record_failure(RuntimeError("outside"))  # no handling span: nothing to mark
        with _handle(None, tracer_provider=traced.provider):
            tracing.record_failure(RuntimeError("will retry"))
        tracing.record_failure(RuntimeError("after"))
    process = traced.span("process document.uploaded")
    assert process.status.status_code is StatusCode.ERROR
    assert process.status.description == "RuntimeError: will retry"
    assert [e.name for e in process.events] == ["exception"]
    outer = traced.span("outer")
    assert outer.status.status_code is StatusCode.UNSET and outer.events == ()


def test_handle_span_uses_the_global_provider(global_traced: Traced) -> None:
    with _handle(tracing.publish_headers("document.uploaded", None)):
        pass
    names = [s.name for s in global_traced.spans()]
    assert names == ["publish document.uploaded", "process document.uploaded"]


# No-ops -------------------------------------------------------------------------------------


@pytest.mark.parametrize("default", ["proxy", "noop"])
def test_no_configured_provider_means_no_op(default: str, monkeypatch: pytest.MonkeyPatch) -> None:
    trace = pytest.importorskip("opentelemetry.trace")
    provider = trace.ProxyTracerProvider() if default == "proxy" else trace.NoOpTracerProvider()
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: provider)
    headers = {"x-app": "1"}
    assert tracing.publish_headers("a.b", headers) is headers
    assert tracing.publish_headers("a.b", None) is None
    cm = _handle(headers)
    assert cm is _handle(None), "one shared nullcontext, nothing built per event"
    with cm as span:
        assert span is None
    tracing.record_failure(ValueError("x"))


def test_the_real_default_provider_is_unconfigured() -> None:
    trace = pytest.importorskip("opentelemetry.trace")
    if not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        pytest.skip("a global tracer provider was set in this process")
    assert tracing.publish_headers("a.b", None) is None
    with _handle({"x": "y"}) as span:
        assert span is None


def test_flag_off_means_no_op_even_with_a_provider(
    global_traced: Traced, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tracing, "TRACING_AVAILABLE", False)
    headers = {"x-app": "1"}
    assert tracing.publish_headers("a.b", headers, tracer_provider=global_traced.provider) is (
        headers
    )
    with _handle(headers, tracer_provider=global_traced.provider) as span:
        assert span is None
        tracing.record_failure(ValueError("x"))
    assert global_traced.spans() == ()


def _fresh_tracing_module(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """Load a private copy of the tracing module as if OpenTelemetry were not installed."""
    for name in [m for m in sys.modules if m == "opentelemetry" or m.startswith("opentelemetry.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "opentelemetry", None)  # makes any import of it fail
    assert tracing.__file__ is not None
    spec = importlib.util.spec_from_file_location("_tracing_without_otel", tracing.__file__)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_without_opentelemetry_installed_everything_is_a_no_op(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    module = _fresh_tracing_module(monkeypatch)
    assert module.TRACING_AVAILABLE is False
    headers = {"x-app": "1"}
    assert module.publish_headers("a.b", headers, event_id="e") is headers
    assert module.publish_headers("a.b", None) is None
    cm = module.handle_span(topic="a.b", agent="x", event_id="e", attempt=1, headers=headers)
    with cm as span:
        assert span is None
        module.record_failure(ValueError("x"))
    with pytest.raises(ValueError, match="propagates"), cm:
        raise ValueError("propagates")


def test_importing_the_module_does_not_import_opentelemetry() -> None:
    # Loaded by path in a fresh interpreter: `import omnidaemon` itself would bring in
    # redis-py, which imports OpenTelemetry on its own when it is installed.
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('t', {tracing.__file__!r})\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        "assert 'opentelemetry.trace' not in sys.modules, 'imported eagerly'\n"
        "print(module.TRACING_AVAILABLE)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr
    expected = importlib.util.find_spec("opentelemetry.trace") is not None
    assert out.stdout.strip() == str(expected)


# End to end (App + worker on the memory bus) ------------------------------------------------


@pytest.mark.anyio
async def test_a_pipeline_is_one_trace(global_traced: Traced) -> None:
    from opentelemetry.trace import SpanKind, StatusCode

    from omnidaemon import App, Context
    from omnidaemon.brokers import MemoryBroker
    from omnidaemon.testing import TestApp

    app = App("traced", broker=MemoryBroker(None))

    @app.agent("document.uploaded", publishes="text.extracted")
    async def extract_text(event: dict[str, str]) -> dict[str, str]:
        return {"text": event["file"].upper()}

    @app.agent("text.extracted")
    async def analyze(event: dict[str, str], ctx: Context) -> None:
        await ctx.publish("analysis.completed", {"words": 1})

    @app.agent("document.uploaded", max_retries=1)
    async def flaky(event: dict[str, str]) -> None:
        raise RuntimeError("model overloaded")

    tracer = global_traced.provider.get_tracer("test")
    async with TestApp(app) as bus:
        with tracer.start_as_current_span("request") as request:
            event_id = await bus.publish("document.uploaded", {"file": "a.pdf"})
        await bus.drain()
        [extracted] = bus.published("text.extracted")
        assert "traceparent" in extracted.headers
    assert len(bus.dead_letters("flaky")) == 1

    spans = global_traced.spans()
    assert {s.context.trace_id for s in spans if s.context is not None} == {
        request.get_span_context().trace_id
    }
    by_id = {s.context.span_id: s for s in spans if s.context is not None}

    def parent_name(span: ReadableSpan) -> str:
        assert span.parent is not None
        return by_id[span.parent.span_id].name

    def named(name: str, agent: str | None = None) -> list[ReadableSpan]:
        return [
            s
            for s in spans
            if s.name == name
            and (agent is None or (s.attributes or {})["messaging.consumer.group.name"] == agent)
        ]

    [publish] = named("publish document.uploaded")
    assert publish.kind is SpanKind.PRODUCER and publish.context is not None
    assert parent_name(publish) == "request"
    [extract] = named("process document.uploaded", "extract_text")
    assert extract.kind is SpanKind.CONSUMER
    assert (extract.attributes or {})["messaging.message.id"] == event_id
    assert parent_name(extract) == "publish document.uploaded"
    assert [link.context.span_id for link in extract.links] == [publish.context.span_id]
    assert extract.status.status_code is StatusCode.UNSET
    # A handler's return value is published inside its CONSUMER span, and so on downstream.
    assert parent_name(named("publish text.extracted")[0]) == "process document.uploaded"
    assert parent_name(named("process text.extracted")[0]) == "publish text.extracted"
    assert parent_name(named("publish analysis.completed")[0]) == "process text.extracted"
    # Each attempt is a CONSUMER span under the same publish; failed ones have ERROR status.
    attempts = named("process document.uploaded", "flaky")
    assert len(attempts) == 2
    assert {(s.attributes or {})["omnidaemon.attempt"] for s in attempts} == {1, 2}
    assert all(parent_name(s) == "publish document.uploaded" for s in attempts)
    assert all(s.status.status_code is StatusCode.ERROR for s in attempts)


def test_a_provider_configured_after_start_is_used_within_a_second(
    traced: Traced, monkeypatch: pytest.MonkeyPatch
) -> None:
    from opentelemetry import trace

    monkeypatch.setattr(tracing, "_unconfigured_until", 0.0)
    assert tracing.publish_headers("a.b", None) is None  # nothing configured yet
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: traced.provider)
    assert tracing.publish_headers("a.b", None) is None  # the verdict is kept a while
    monkeypatch.setattr(tracing, "_unconfigured_until", time.monotonic() - 0.001)
    headers = tracing.publish_headers("a.b", None)
    assert headers is not None and "traceparent" in headers
