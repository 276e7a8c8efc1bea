"""Logging: JSON lines off a terminal, and every line about an event says which event."""

from __future__ import annotations

import io

import orjson
import pytest
import structlog
from structlog.testing import capture_logs

from omnidaemon import App, Context
from omnidaemon.brokers import MemoryBroker
from omnidaemon.observability import configure_logging
from omnidaemon.testing import TestApp


@pytest.fixture(autouse=True)
def reset_structlog() -> None:
    yield
    structlog.reset_defaults()


def test_json_lines_when_not_a_terminal() -> None:
    out = io.StringIO()
    configure_logging("INFO", "auto", stream=out)
    log = structlog.get_logger("t")
    log.info("hello", answer=42)
    log.debug("hidden")
    [line] = out.getvalue().splitlines()
    record = orjson.loads(line)
    assert record["event"] == "hello"
    assert record["answer"] == 42
    assert record["level"] == "info"
    assert record["timestamp"].endswith("Z")


def test_a_json_line_never_raises_into_the_code_that_logs() -> None:
    """A value JSON lines cannot hold as is (int keys, an int past 64 bits) is written as text:
    the supervisor crashed logging `pids={0: 1234}` while killing workers that did not stop."""
    out = io.StringIO()
    configure_logging("INFO", "json", stream=out)
    log = structlog.get_logger("t")
    log.error("killing", pids={0: 1234, 1: 1235})
    log.info("huge", n=2**70)
    first, second = (orjson.loads(line) for line in out.getvalue().splitlines())
    assert first["pids"] == {"0": 1234, "1": 1235}
    assert second["n"] == 2**70


def test_console_format_is_readable() -> None:
    out = io.StringIO()
    configure_logging("DEBUG", "console", stream=out)
    structlog.get_logger("t").debug("hello", answer=42)
    text = out.getvalue()
    assert "hello" in text and "answer=42" in text and not text.startswith("{")


@pytest.mark.anyio
async def test_lines_about_an_event_carry_its_identity() -> None:
    app = App("logs", broker=MemoryBroker(None))

    @app.agent("a.b", max_retries=1)
    async def flaky(event: dict[str, int], ctx: Context) -> None:
        ctx.log.info("working")
        raise RuntimeError("boom")

    with capture_logs() as logs:
        async with TestApp(app) as bus:
            event_id = await bus.publish("a.b", {"n": 1}, correlation_id="corr-1")
            await bus.drain()
    about_event = [e for e in logs if e.get("event_id") == event_id]
    kinds = [e["event"] for e in about_event]
    assert kinds.count("working") == 2
    assert "handler failed; will retry" in kinds
    assert "event dead-lettered" in kinds
    for entry in about_event:
        assert entry["correlation_id"] == "corr-1"
        assert entry["agent"] == "flaky"
        assert entry["topic"] == "a.b"
        assert entry["attempt"] in (1, 2)
