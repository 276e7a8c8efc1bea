"""Run traces in process (`TestApp`, the memory bus): the exact tree of a run with fan-out,
a chain, a retry, a dead letter, a `Reject` and a cancellation; runs listed by status; the
per-run bound; traces turned off; and the OpenTelemetry ids agreeing with the trace."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import pytest

from omnidaemon import App, Context, Reject, Retry
from omnidaemon.envelope import Envelope
from omnidaemon.settings import Settings
from omnidaemon.testing import TestApp
from omnidaemon.traces import EventTrace
from omnidaemon.traces.records import START_AFTER

pytestmark = pytest.mark.anyio


def shape(event: EventTrace) -> dict[str, Any]:
    return {
        "topic": event.topic,
        "by": event.published_by,
        "agents": {h.agent: [a.outcome for a in h.attempts] for h in event.handlings},
        "children": [shape(child) for child in event.children],
    }


def pipeline_app(settings: Settings | None = None) -> App:
    app = App("docs", broker="memory://", settings=settings)

    @app.agent("doc.uploaded", publishes="text.extracted")
    async def extract(event: dict[str, Any], ctx: Context) -> dict[str, Any]:
        await ctx.publish("doc.audited", event)
        return event

    @app.agent("doc.audited")
    async def audit(event: dict[str, Any]) -> None: ...

    @app.agent("text.extracted", publishes="text.summarised", max_retries=3)
    async def summarise(event: dict[str, Any], ctx: Context) -> dict[str, Any]:
        if ctx.attempt < 3:
            raise Retry(reason=f"overloaded {ctx.attempt}")
        return event

    @app.agent("text.extracted")
    async def index(event: dict[str, Any]) -> None:
        if event["doc"] == "bad":
            raise Reject("unsupported format")

    @app.agent("text.summarised", max_retries=0)
    async def notify(event: dict[str, Any]) -> None:
        if event["doc"] == "bad":
            raise RuntimeError("smtp down")

    return app


async def test_a_run_is_one_tree_with_every_attempt_in_its_place() -> None:
    app = pipeline_app()
    async with TestApp(app) as bus:
        bad = await bus.publish("doc.uploaded", {"doc": "bad"})
        await bus.drain()
        trace = await app.trace(bad)
    assert trace is not None and trace.run_id == bad
    assert [shape(e) for e in trace.events] == [
        {
            "topic": "doc.uploaded",
            "by": None,
            "agents": {"extract": ["succeeded"]},
            "children": [
                # Published in this order by extract: ctx.publish first, the return value last.
                {
                    "topic": "doc.audited",
                    "by": "extract",
                    "agents": {"audit": ["succeeded"]},
                    "children": [],
                },
                {
                    "topic": "text.extracted",
                    "by": "extract",
                    "agents": {
                        "index": ["rejected"],
                        "summarise": ["retrying", "retrying", "succeeded"],
                    },
                    "children": [
                        {
                            "topic": "text.summarised",
                            "by": "summarise",
                            "agents": {"notify": ["dead_lettered"]},
                            "children": [],
                        }
                    ],
                },
            ],
        }
    ]
    assert trace.status == "failed"
    assert [(f["agent"], f["error"]["type"]) for f in trace.failures] == [
        ("index", "Reject"),
        ("notify", "RuntimeError"),
    ]
    summarise = trace.events[0].children[1].handlings[1]
    assert [a.error for a in summarise.attempts] == [
        {"type": "Retry", "message": "overloaded 1"},
        {"type": "Retry", "message": "overloaded 2"},
        None,
    ]
    assert all(a.duration is not None and a.duration >= 0 for a in summarise.attempts)
    assert trace.event_count == 4 and trace.attempt_count == 7
    assert trace.duration is not None and trace.ended_at is not None


async def test_runs_lists_recent_runs_with_their_status_and_failing_agent() -> None:
    app = pipeline_app()
    async with TestApp(app) as bus:
        good = await bus.publish("doc.uploaded", {"doc": "good"})
        bad = await bus.publish("doc.uploaded", {"doc": "bad"})
        await bus.drain()
        runs = await app.runs()
        failed = await app.runs(status="failed")
        succeeded = await app.runs(status="succeeded", since=timedelta(minutes=5))
    assert {r.run_id: r.status for r in runs} == {good: "succeeded", bad: "failed"}
    assert [(r.run_id, r.failed_agent) for r in failed] == [(bad, "index")]
    assert [r.run_id for r in succeeded] == [good]
    assert all(r.events == 4 for r in runs)


async def test_a_cancelled_event_and_a_run_still_going() -> None:
    app = App("c", broker="memory://")
    started = anyio.Event()

    @app.agent("job.asked")
    async def job(event: dict[str, Any]) -> None:
        started.set()
        await anyio.sleep(30)

    async with TestApp(app) as bus:
        event_id = await bus.publish("job.asked", {})
        await started.wait()
        with anyio.fail_after(5):
            while (running := await app.trace(event_id)) is None:
                await anyio.sleep(0.01)  # the start record goes out within 50 ms
        assert running.status == "running"
        assert running.events[0].handlings[0].attempts[0].ended_at is None
        await app.cancel(event_id, reason="user left")
        await bus.drain()
        trace = await app.trace(event_id)
    assert trace is not None and trace.status == "cancelled"
    [attempt] = trace.events[0].handlings[0].attempts
    assert attempt.outcome == "cancelled"
    assert attempt.error == {"type": "Cancelled", "message": "user left"}


async def test_a_long_attempt_that_succeeds_keeps_when_it_began_and_replaces_its_start() -> None:
    app = App("slow", broker="memory://", settings=Settings(trace_max_records=1))
    started, release = anyio.Event(), anyio.Event()

    @app.agent("job.asked")
    async def job(event: dict[str, Any]) -> None:
        started.set()
        await release.wait()

    async with TestApp(app) as bus:
        event_id = await bus.publish("job.asked", {})
        await started.wait()
        with anyio.fail_after(5):
            while await app.trace(event_id) is None:
                await anyio.sleep(0.01)  # its start record, once it has run START_AFTER
        release.set()
        await bus.drain()
        trace = await app.trace(event_id)
    assert trace is not None and trace.status == "succeeded"
    [attempt] = trace.events[0].handlings[0].attempts
    assert attempt.outcome == "succeeded"
    assert attempt.duration is not None and attempt.duration >= START_AFTER
    assert trace.dropped == 0  # the end replaced the start (the bound is 1 record)


@pytest.fixture
def berlin(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The process's local time zone is not UTC (as on a developer's machine)."""
    monkeypatch.setenv("TZ", "Europe/Berlin")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.mark.usefixtures("berlin")
async def test_a_publishers_time_with_no_zone_is_taken_as_utc() -> None:
    app = App("naive", broker="memory://")

    @app.agent("job.asked")
    async def job(event: dict[str, Any]) -> None: ...

    naive = datetime(2026, 12, 4, 10, 0)
    async with TestApp(app) as bus:
        event = Envelope.new("job.asked", {}).model_copy(update={"created_at": naive})
        await app.broker.publish("job.asked", event.encode())
        await bus.drain()
        trace = await app.trace(event.id)
    assert trace is not None and trace.events[0].created_at == naive.replace(tzinfo=UTC)


async def test_a_run_keeps_at_most_its_bound_and_counts_the_rest() -> None:
    app = App("fan", broker="memory://", settings=Settings(trace_max_records=5))

    @app.agent("fan.out")
    async def fan(event: dict[str, Any], ctx: Context) -> None:
        for n in range(9):
            await ctx.publish("fan.leaf", {"n": n})

    @app.agent("fan.leaf")
    async def leaf(event: dict[str, Any]) -> None: ...

    async with TestApp(app) as bus:
        root = await bus.publish("fan.out", {})
        await bus.drain()
        trace = await app.trace(root)
    assert trace is not None
    assert trace.attempt_count == 5 and trace.dropped == 5  # 10 attempts in all


async def test_traces_can_be_turned_off() -> None:
    app = pipeline_app(Settings(trace_ttl=0))
    async with TestApp(app) as bus:
        event_id = await bus.publish("doc.uploaded", {"doc": "good"})
        await bus.drain()
        assert await app.trace(event_id) is None
        assert await app.runs() == []


@pytest.fixture
def spans(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    pytest.importorskip("opentelemetry.sdk.trace")
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from omnidaemon.observability import tracing

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: provider)
    monkeypatch.setattr(tracing, "_unconfigured_until", 0.0)
    yield exporter
    provider.shutdown()


async def test_the_opentelemetry_spans_and_the_trace_share_their_ids(spans: Any) -> None:
    app = pipeline_app()
    async with TestApp(app) as bus:
        run = await bus.publish("doc.uploaded", {"doc": "good"})
        await bus.drain()
        trace = await app.trace(run)
    assert trace is not None
    process = {
        (
            s.attributes["messaging.message.id"],
            s.attributes["messaging.consumer.group.name"],
            s.attributes["omnidaemon.attempt"],
        ): s
        for s in spans.get_finished_spans()
        if s.name.startswith("process ")
    }
    checked = 0
    stack = list(trace.events)
    while stack:
        event = stack.pop()
        stack += event.children
        for handling in event.handlings:
            for attempt in handling.attempts:
                span = process[(event.id, handling.agent, attempt.attempt)]
                assert span.attributes["messaging.message.conversation_id"] == run
                assert attempt.otel_trace_id == f"{span.context.trace_id:032x}"
                assert attempt.otel_span_id == f"{span.context.span_id:016x}"
                checked += 1
    assert checked == trace.attempt_count == 7
