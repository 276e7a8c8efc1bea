"""The SDK's configuration, models, failure path and bus views."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from pydantic import ValidationError

from omnidaemon.compat import (
    AgentConfig,
    EventEnvelope,
    OmniDaemonSDK,
    PayloadBase,
    SubscriptionConfig,
    broker_url_from_env,
)
from omnidaemon.errors import ConfigurationError

pytestmark = pytest.mark.anyio


def test_an_unknown_event_bus_type_raises_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EVENT_BUS_TYPE", "kafka")
    monkeypatch.setenv("KAFKA_SERVERS", "localhost:9092")
    with pytest.raises(ConfigurationError, match="'kafka'"):
        OmniDaemonSDK()


def test_bus_selection_from_the_environment() -> None:
    assert broker_url_from_env({}) is None  # App's default: OMNIDAEMON_BROKER_URL or embedded
    assert broker_url_from_env({"EVENT_BUS_TYPE": "redis_stream"}) is None
    url = "redis://127.0.0.1:6390/0"
    assert broker_url_from_env({"EVENT_BUS_TYPE": "redis_stream", "REDIS_URL": url}) == url
    assert broker_url_from_env({"REDIS_URL": url}) == url


def test_a_store_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="store"):
        OmniDaemonSDK(event_bus="memory://", store=object())


def test_model_defaults_and_validation() -> None:
    env = EventEnvelope(topic="  file.uploaded ", payload=PayloadBase(content="x"))
    assert env.topic == "file.uploaded" and env.delivery_attempts == 1 and env.id is None
    assert env.tenant_id is None and isinstance(env.created_at, float)
    with pytest.raises(ValidationError):
        EventEnvelope(topic="  ", payload=PayloadBase(content="x"))
    with pytest.raises(ValidationError):
        PayloadBase()  # type: ignore[call-arg]
    sub = SubscriptionConfig()
    assert (sub.max_retries, sub.reclaim_idle_ms, sub.dlq_enabled, sub.consumer_count) == (
        3,
        None,
        True,
        1,
    )
    with pytest.raises(ValidationError):
        SubscriptionConfig(consumer_count=0)
    with pytest.raises(ValidationError):
        AgentConfig(topic="a.b")  # type: ignore[call-arg]


async def test_failures_are_retried_then_dead_lettered(sdk: OmniDaemonSDK) -> None:
    calls: list[int] = []

    async def flaky(message: dict) -> None:  # type: ignore[type-arg]
        calls.append(message["delivery_attempts"])
        raise RuntimeError("model unavailable")

    await sdk.register_agent(
        agent_config=AgentConfig(
            name="flaky-agent",
            topic="jobs.created",
            callback=flaky,
            tools=["search"],
            config=SubscriptionConfig(max_retries=1, consumer_count=2, dlq_enabled=False),
        )
    )
    assert sdk.app.get_agent("flaky-agent").concurrency == 2
    await sdk.start()
    task_id = await sdk.publish_task(
        event_envelope=EventEnvelope(
            topic="jobs.created", payload=PayloadBase(content={"n": 1}), tenant_id="t-9"
        )
    )
    dlq: list[dict[str, Any]] = []
    with anyio.fail_after(10):
        while not dlq:
            await anyio.sleep(0.05)
            dlq = await sdk.inspect_dlq("jobs.created")
    assert calls == [1, 2]
    assert dlq[0]["id"] == task_id and dlq[0]["agent"] == "flaky-agent"
    assert dlq[0]["error_type"] == "RuntimeError" and dlq[0]["attempts"] == 2
    assert dlq[0]["data"]["tenant_id"] == "t-9"
    assert await sdk.get_result(task_id) is None

    # Workers flush their counters to the bus now and then, not per event.
    with anyio.fail_after(5):
        while True:
            counts = (await sdk.metrics(topic="jobs.created")).get("jobs.created", {})
            if counts.get("flaky-agent", {}).get("tasks_dead_lettered") == 1:
                break
            await anyio.sleep(0.05)
    assert counts["flaky-agent"]["tasks_failed"] == 2
    health = await sdk.health()
    assert health["is_running"] is True and health["registered_agents"] == 1
    assert health["status"] in ("healthy", "degraded")
    stats = await sdk.get_bus_stats()
    assert stats["topics"]["jobs.created"]["groups"]["flaky-agent"]["dead_letters"] == 1
    assert (await sdk.get_agent("jobs.created", "flaky-agent"))["tools"] == ["search"]  # type: ignore[index]


async def test_unsubscribe_and_delete(sdk: OmniDaemonSDK) -> None:
    seen: list[Any] = []

    async def worker(message: dict) -> None:  # type: ignore[type-arg]
        seen.append(message["content"])

    config = AgentConfig(topic="jobs.queued", callback=worker)
    await sdk.register_agent(agent_config=config)
    await sdk.start()
    assert await sdk.unsubscribe_agent("jobs.queued", "worker") is True
    assert (await sdk.get_agent("jobs.queued", "worker"))["running"] is False  # type: ignore[index]
    await sdk.publish_task(
        event_envelope=EventEnvelope(topic="jobs.queued", payload=PayloadBase(content=1))
    )
    await anyio.sleep(0.2)
    assert seen == []  # nobody consumes; the event waits in the group
    assert await sdk.delete_agent("jobs.queued", "worker") is True
    assert await sdk.get_agent("jobs.queued", "worker") is None
    assert await sdk.delete_agent("jobs.queued", "worker") is False
    await sdk.register_agent(agent_config=config)  # same group again: it gets the waiting event
    with anyio.fail_after(5):
        while not seen:
            await anyio.sleep(0.02)
    assert seen == [1]
    with pytest.raises(ValueError, match="already registered"):
        await sdk.register_agent(agent_config=config)
    await sdk.stop()
    assert (await sdk.health())["is_running"] is False
