"""The SDK's configuration, models, failure path and bus views."""

from __future__ import annotations

from typing import Any
from uuid import uuid4

import anyio
import orjson
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
from tests.http_receiver import Receiver

pytestmark = pytest.mark.anyio


def test_an_unknown_event_bus_type_raises_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EVENT_BUS_TYPE", "kafka")
    monkeypatch.setenv("KAFKA_SERVERS", "localhost:9092")
    with pytest.raises(ConfigurationError, match="'kafka'"):
        OmniDaemonSDK()


def test_an_unknown_event_bus_type_names_the_supported_ones() -> None:
    with pytest.raises(ConfigurationError) as info:
        broker_url_from_env({"EVENT_BUS_TYPE": "rabbitmq"})
    assert "EVENT_BUS_TYPE=redis_stream" in str(info.value)
    assert "EVENT_BUS_TYPE=nats with NATS_URL" in str(info.value)


def test_bus_selection_from_the_environment() -> None:
    assert broker_url_from_env({}) is None  # App's default: OMNIDAEMON_BROKER_URL or embedded
    assert broker_url_from_env({"EVENT_BUS_TYPE": "redis_stream"}) is None
    url = "redis://127.0.0.1:6390/0"
    assert broker_url_from_env({"EVENT_BUS_TYPE": "redis_stream", "REDIS_URL": url}) == url
    assert broker_url_from_env({"REDIS_URL": url}) == url


def test_nats_selection_from_the_environment() -> None:
    url = "nats://127.0.0.1:4333"
    for bus_type in ("nats", "NATS", " nats "):
        env = {"EVENT_BUS_TYPE": bus_type, "NATS_URL": url, "REDIS_URL": "redis://h:6379/0"}
        assert broker_url_from_env(env) == url  # REDIS_URL is not this bus's variable
    nats = {"EVENT_BUS_TYPE": "nats"}
    assert broker_url_from_env({**nats, "NATS_URL": "tls://tok@h:4222"}) == "tls://tok@h:4222"
    # As the NATS tools take it: host:port alone, or a list of server URLs.
    assert broker_url_from_env({**nats, "NATS_URL": "127.0.0.1:4333"}) == url
    servers = "nats://u:pw@h1:4222, nats://u:pw@h2:4223,h3"
    assert broker_url_from_env({**nats, "NATS_URL": servers}) == "nats://u:pw@h1:4222,h2:4223,h3"
    # No NATS_URL: OMNIDAEMON_BROKER_URL may name the NATS bus (App reads it).
    assert broker_url_from_env({**nats, "OMNIDAEMON_BROKER_URL": url}) is None


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({}, "needs NATS_URL"),
        ({"OMNIDAEMON_BROKER_URL": "redis://:hunter2@h:6379/0"}, "needs NATS_URL"),
        ({"NATS_URL": "redis://:hunter2@h:6379/0"}, "names a redis:// server"),
        ({"NATS_URL": "nats://a:1,tls://b:2"}, "mixes nats:// and tls://"),
        ({"NATS_URL": "nats://u:hunter2@a:1,nats://v:hunter2@b:2"}, "different credentials"),
        ({"NATS_URL": " , "}, "names no server"),
    ],
)
def test_a_nats_bus_type_without_a_nats_url_is_refused_without_echoing_it(
    env: dict[str, str], fragment: str
) -> None:
    with pytest.raises(ConfigurationError, match=fragment) as info:
        broker_url_from_env({"EVENT_BUS_TYPE": "nats", **env})
    assert "hunter2" not in str(info.value)


async def test_event_bus_type_nats_runs_the_sdk_on_nats_url(
    nats_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A token the server does not ask for is accepted, and never shown.
    monkeypatch.setenv("EVENT_BUS_TYPE", "nats")
    monkeypatch.setenv("NATS_URL", nats_url.replace("nats://", "nats://s3cret-token@"))
    monkeypatch.delenv("OMNIDAEMON_BROKER_URL", raising=False)
    topic = f"compat{uuid4().hex[:8]}.selected"
    sdk = OmniDaemonSDK()
    try:
        assert sdk.app.broker.url == nats_url.replace("nats://", "nats://***@")
        task_id = await sdk.publish_task(
            event_envelope=EventEnvelope(topic=topic, payload=PayloadBase(content={"n": 1}))
        )
        [entry] = await sdk.inspect_stream(topic)
        assert entry["data"]["id"] == task_id
        stats = await sdk.get_bus_stats()
        assert stats["bus"] == sdk.app.broker.url and "s3cret-token" not in repr(stats)
    finally:
        await sdk.shutdown()


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


async def test_a_deleted_agent_can_come_back_on_another_topic_with_other_options(
    sdk: OmniDaemonSDK,
) -> None:
    seen: list[tuple[str, Any]] = []

    async def triage(message: dict) -> None:  # type: ignore[type-arg]
        seen.append((message["topic"], message["content"]))

    await sdk.register_agent(agent_config=AgentConfig(topic="tickets.new", callback=triage))
    await sdk.start()
    assert await sdk.delete_agent("tickets.new", "triage") is True
    await sdk.register_agent(
        agent_config=AgentConfig(
            topic="tickets.urgent", callback=triage, config=SubscriptionConfig(max_retries=5)
        )
    )
    assert sdk.app.get_agent("triage").policy.max_retries == 5
    await sdk.publish_task(
        event_envelope=EventEnvelope(topic="tickets.urgent", payload=PayloadBase(content="x"))
    )
    with anyio.fail_after(5):
        while not seen:
            await anyio.sleep(0.02)
    assert seen == [("tickets.urgent", "x")]


async def test_a_sync_callback_runs_in_a_thread_and_its_return_value_is_the_result(
    sdk: OmniDaemonSDK,
) -> None:
    def summarise(message: dict) -> dict:  # type: ignore[type-arg]
        return {"words": len(message["content"]["text"].split())}

    await sdk.register_agent(agent_config=AgentConfig(topic="texts.in", callback=summarise))
    await sdk.start()
    task_id = await sdk.publish_task(
        event_envelope=EventEnvelope(
            topic="texts.in", payload=PayloadBase(content={"text": "three small words"})
        )
    )
    with anyio.fail_after(5):
        while (result := await sdk.get_result(task_id)) is None:
            await anyio.sleep(0.02)
    assert result == {"words": 3}
    [listed] = [r for r in await sdk.list_results() if r["task_id"] == task_id]
    assert listed["result"] == {"words": 3} and listed["agent"] == "summarise"


async def test_the_publishers_id_and_source_travel_with_the_event(sdk: OmniDaemonSDK) -> None:
    messages: list[dict[str, Any]] = []

    async def record(message: dict) -> None:  # type: ignore[type-arg]
        messages.append(message)

    await sdk.register_agent(agent_config=AgentConfig(topic="orders.placed", callback=record))
    await sdk.start()
    task_id = await sdk.publish_task(
        event_envelope=EventEnvelope(
            id="order-42", source="checkout", topic="orders.placed", payload=PayloadBase(content=1)
        )
    )
    with anyio.fail_after(5):
        while not messages:
            await anyio.sleep(0.02)
    # The bus assigns the task id; the publisher's own id and source ride in the headers.
    assert messages[0]["task_id"] == task_id != "order-42"
    assert messages[0]["source"] == "checkout"
    # OmniDaemon's stream names (with its `omni-stream:` prefix) are accepted.
    [entry] = await sdk.inspect_stream("omni-stream:orders.placed")
    assert entry["data"]["id"] == task_id
    assert entry["data"]["headers"]["omnidaemon-compat-id"] == "order-42"
    assert entry["data"]["headers"]["omnidaemon-compat-source"] == "checkout"
    assert "orders.placed" in [s["stream"] for s in await sdk.list_streams()]


async def test_the_webhook_of_a_dead_lettered_task_says_failed(
    sdk: OmniDaemonSDK, receiver: Receiver
) -> None:
    async def broken(message: dict) -> None:  # type: ignore[type-arg]
        raise ValueError("cannot parse the invoice")

    await sdk.register_agent(
        agent_config=AgentConfig(
            topic="invoices.in", callback=broken, config=SubscriptionConfig(max_retries=0)
        )
    )
    await sdk.start()
    task_id = await sdk.publish_task(
        event_envelope=EventEnvelope(
            topic="invoices.in", payload=PayloadBase(content={}, webhook=receiver.url("/hook"))
        )
    )
    with anyio.fail_after(5):
        while not receiver.requests:
            await anyio.sleep(0.02)
    body = orjson.loads(receiver.requests[0].body)
    assert (body["task_id"], body["status"]) == (task_id, "failed")
    assert body["error"]["type"] == "ValueError" and body["timestamp"]


async def test_a_sync_callback_publishes_through_anyio_from_thread(sdk: OmniDaemonSDK) -> None:
    followups: list[dict[str, Any]] = []

    def route(message: dict) -> None:  # type: ignore[type-arg]
        envelope = EventEnvelope(topic="tickets.routed", payload=PayloadBase(content="billing"))
        anyio.from_thread.run(sdk.publish_task, envelope)

    async def record(message: dict) -> None:  # type: ignore[type-arg]
        followups.append(message)

    await sdk.register_agent(agent_config=AgentConfig(topic="tickets.opened", callback=route))
    await sdk.register_agent(agent_config=AgentConfig(topic="tickets.routed", callback=record))
    await sdk.start()
    task_id = await sdk.publish_task(
        event_envelope=EventEnvelope(
            topic="tickets.opened", payload=PayloadBase(content={}), correlation_id="c-7"
        )
    )
    with anyio.fail_after(5):
        while not followups:
            await anyio.sleep(0.02)
    # The follow-up is chained to the event the sync callback handled.
    assert followups[0]["content"] == "billing"
    assert (followups[0]["causation_id"], followups[0]["correlation_id"]) == (task_id, "c-7")
