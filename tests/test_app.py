"""App: publishing, broker selection and the errors a user sees."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import anyio
import pytest

from omnidaemon import App, ConfigurationError, DelayTooLong
from omnidaemon.brokers import MemoryBroker, Subscription, open_broker
from omnidaemon.settings import Settings
from omnidaemon.worker import Worker

pytestmark = pytest.mark.anyio


async def test_publish_returns_the_event_id_and_puts_one_entry_on_the_topic() -> None:
    broker = MemoryBroker(None)
    app = App("pub", broker=broker)
    sub = Subscription("order.placed", "probe")
    await broker.subscribe(sub)
    event_id = await app.publish("order.placed", {"n": 1}, headers={"traceparent": "00-abc"})
    [delivery] = await broker.fetch(sub, "c", 10, 1.0)
    assert event_id.encode() in delivery.data
    assert b'"traceparent":"00-abc"' in delivery.data


async def test_publish_many_keeps_order() -> None:
    broker = MemoryBroker(None)
    app = App("pub", broker=broker)
    sub = Subscription("order.placed", "probe")
    await broker.subscribe(sub)
    ids = await app.publish_many([("order.placed", {"n": i}) for i in range(5)])
    deliveries = await broker.fetch(sub, "c", 10, 1.0)
    assert [d.data.split(b'"id":"')[1][:36].decode() for d in deliveries] == ids


async def test_publish_refuses_bad_input_before_anything_is_sent() -> None:
    app = App("pub", broker=MemoryBroker(None))
    with pytest.raises(ValueError, match="invalid topic name"):
        await app.publish("Order Placed", {})
    with pytest.raises(ValueError, match="invalid topic name"):
        await app.publish("order.placed", {}, reply_to="not a topic")
    with pytest.raises(TypeError, match="not JSON serializable"):
        await app.publish("order.placed", {"when": object()})
    with pytest.raises(TypeError, match="headers"):
        await app.publish("order.placed", {}, headers={"n": 1})  # type: ignore[dict-item]


def test_unknown_broker_scheme_is_a_clear_error_without_the_password() -> None:
    with pytest.raises(ConfigurationError) as info:
        open_broker("kafka://user:hunter2@host:9092")
    assert "kafka" in str(info.value)
    assert "hunter2" not in str(info.value)


def test_memory_urls_with_one_name_share_a_bus() -> None:
    a, b = open_broker("memory://shared-test"), open_broker("memory://shared-test")
    assert isinstance(a, MemoryBroker) and isinstance(b, MemoryBroker)
    assert a._bus is b._bus
    assert open_broker("memory://other-test")._bus is not a._bus  # type: ignore[attr-defined]


def test_broker_comes_from_the_environment() -> None:
    app = App("env", settings=Settings.from_env({"OMNIDAEMON_BROKER_URL": "memory://env-test"}))
    assert app.broker.url == "memory://env-test"


def test_settings_reject_bad_values_with_the_variable_name() -> None:
    with pytest.raises(ConfigurationError, match="OMNIDAEMON_LOG_FORMAT"):
        Settings.from_env({"OMNIDAEMON_LOG_FORMAT": "xml"})
    with pytest.raises(ConfigurationError, match="OMNIDAEMON_SHUTDOWN_GRACE"):
        Settings.from_env({"OMNIDAEMON_SHUTDOWN_GRACE": "soon"})
    with pytest.raises(ConfigurationError, match="OMNIDAEMON_LOG_LEVEL"):
        Settings.from_env({"OMNIDAEMON_LOG_LEVEL": "loud"})
    assert Settings.from_env({}).shutdown_grace == 30.0


async def test_unknown_agent_names_list_the_known_ones() -> None:
    app = App("names", broker=MemoryBroker(None))

    @app.agent("a.b")
    async def known(event: dict[str, int]) -> None: ...

    with pytest.raises(ConfigurationError, match=r"no agent 'nope' \(agents: known\)"):
        await app.dead_letters("nope")
    with pytest.raises(ConfigurationError, match="no agent 'nope'"):
        Worker(app, agents=["nope"])


def test_a_worker_needs_agents() -> None:
    with pytest.raises(ConfigurationError, match="has no agents"):
        Worker(App("empty", broker=MemoryBroker(None)))


class CountingBroker(MemoryBroker):
    def __init__(self) -> None:
        super().__init__(None)
        self.open = False

    async def connect(self) -> None:
        self.open = True

    async def close(self) -> None:
        self.open = False


async def test_workers_share_the_connection_and_the_last_one_closes_it() -> None:
    broker = CountingBroker()
    app = App("conn", broker=broker)

    @app.agent("a.b")
    async def handle(event: dict[str, int]) -> None: ...

    async with Worker(app).started():
        async with Worker(app).started():
            assert broker.open
        assert broker.open  # the first worker still runs on it
    assert not broker.open


async def test_a_worker_leaves_a_connection_it_did_not_open() -> None:
    broker = CountingBroker()
    app = App("conn", broker=broker)

    @app.agent("a.b")
    async def handle(event: dict[str, int]) -> None: ...

    async with app:
        async with app.running():
            pass
        assert broker.open
        await app.publish("a.b", {"n": 1})
    assert not broker.open


def test_without_a_url_the_app_uses_the_embedded_bus(tmp_path: object) -> None:
    from omnidaemon.brokers.embedded import EmbeddedBroker

    app = App("local", settings=Settings.from_env({}))
    assert isinstance(app.broker, EmbeddedBroker)
    assert app.broker.url.startswith("embedded://")


async def test_a_removed_agent_frees_its_name_and_its_group_resumes_where_it_stopped() -> None:
    app = App("removal", broker=MemoryBroker())
    seen: list[tuple[str, int]] = []

    @app.agent("jobs.in", name="worker")
    async def first(event: dict[str, int]) -> None:
        seen.append(("first", event["n"]))

    async with app:
        async with app.running():
            with pytest.raises(RuntimeError, match="running in a worker"):
                app.remove_agent("worker")
            await app.publish("jobs.in", {"n": 1})
            await _until(lambda: seen == [("first", 1)])
        await app.publish("jobs.in", {"n": 2})  # nobody consumes: it waits in the group
        assert app.remove_agent("worker").handler is first
        assert "worker" not in app.agents and not app.topology().topics
        with pytest.raises(ConfigurationError, match="no agent 'worker'"):
            app.remove_agent("worker")

        @app.agent("jobs.in", name="worker")
        async def second(event: dict[str, int]) -> None:
            seen.append(("second", event["n"]))

        async with app.running():
            await _until(lambda: seen[-1:] == [("second", 2)])
    assert seen == [("first", 1), ("second", 2)]


async def _until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    with anyio.fail_after(timeout):
        while not condition():
            await anyio.sleep(0.01)


async def test_publish_refuses_a_delay_over_max_delay_before_anything_is_sent() -> None:
    broker = MemoryBroker(None)
    app = App("pub", broker=broker, settings=Settings(max_delay=3600))
    message = (
        r"cannot publish to 'order\.placed': a delay of 3,601 s is over max_delay "
        r"\(3,600 s = 0\.0416667 days; OMNIDAEMON_MAX_DELAY\)"
    )
    with pytest.raises(DelayTooLong, match=message):
        await app.publish("order.placed", {}, delay=3601)
    with pytest.raises(DelayTooLong, match="a delay of inf s"):
        await app.publish("order.placed", {}, delay=float("inf"))
    with pytest.raises(DelayTooLong):
        await app.publish("order.placed", {}, delay=timedelta(days=1))
    with pytest.raises(DelayTooLong):
        await app.publish("order.placed", {}, at=datetime.now(UTC) + timedelta(hours=2))
    with pytest.raises(ValueError, match="not nan"):
        await app.publish("order.placed", {}, delay=float("nan"))

    def publish_sync() -> None:
        with pytest.raises(DelayTooLong):
            app.publish_sync("order.placed", {}, delay=1e12)

    await anyio.to_thread.run_sync(publish_sync)
    assert await broker.describe("order.placed") is None
    await app.publish("order.placed", {}, delay=3600)  # the limit itself is allowed
    assert (await broker.describe("order.placed")).delayed == 1  # type: ignore[union-attr]


async def test_max_delay_defaults_to_30_days() -> None:
    assert Settings.from_env({}).max_delay == 30 * 86_400
    assert Settings.from_env({"OMNIDAEMON_MAX_DELAY": "60"}).max_delay == 60
    for bad in ("inf", "nan", "-1", "soon"):
        with pytest.raises(ConfigurationError, match="OMNIDAEMON_MAX_DELAY"):
            Settings.from_env({"OMNIDAEMON_MAX_DELAY": bad})
    app = App("pub", broker=MemoryBroker(None), settings=Settings())
    with pytest.raises(DelayTooLong, match="1,000,000,000,000 s is over max_delay"):
        await app.publish("order.placed", {}, delay=1e12)  # 31,700 years
