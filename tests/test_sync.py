"""`App.publish_sync`: publishing from code without an event loop."""

from __future__ import annotations

import threading
from uuid import uuid4

import anyio
import pytest
from pydantic import BaseModel

from omnidaemon import App, ConfigurationError, PayloadValidationError
from omnidaemon.brokers import MemoryBroker, RedisBroker, Subscription


class Order(BaseModel):
    order_id: str


def test_publish_sync_from_plain_threads_reaches_the_bus(redis_url: str) -> None:
    topic = f"sync{uuid4().hex[:8]}.done"
    app = App("sync", broker=redis_url)
    ids: list[str] = []

    def view(n: int) -> None:  # a Django view, say
        ids.append(app.publish_sync(topic, {"n": n}))

    threads = [threading.Thread(target=view, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    held = app.publish_sync(topic, {"n": 99}, delay=0.2)

    async def read() -> list[bytes]:
        broker = RedisBroker(redis_url)
        sub = Subscription(topic, "probe")
        async with broker:
            await broker.subscribe(sub)
            got: list[bytes] = []
            with anyio.fail_after(5):
                while len(got) < 9:
                    got += [d.data for d in await broker.fetch(sub, "c", 20, 1.0)]
            return got

    data = anyio.run(read)
    assert len(ids) == len(set(ids)) == 8
    assert all(any(i.encode() in d for d in data) for i in [*ids, held])
    anyio.run(app.close)


def test_publish_sync_checks_types_and_refuses_async_callers() -> None:
    app = App("sync", broker=MemoryBroker(None))

    @app.agent("typed.topic")
    async def handle(event: dict[str, int]) -> None: ...

    with pytest.raises(ConfigurationError, match="publish_sync needs a bus"):
        app.publish_sync("typed.topic", {"n": 1})

    async def from_async() -> None:
        with pytest.raises(RuntimeError, match=r"await app\.publish"):
            app.publish_sync("typed.topic", {"n": 1})

    anyio.run(from_async)


def test_publish_sync_type_check_happens_before_sending(redis_url: str) -> None:
    app = App("sync", broker=redis_url)

    @app.agent("orders.placed")
    async def handle(event: Order) -> None: ...

    with pytest.raises(PayloadValidationError):
        app.publish_sync("orders.placed", {"nope": 1})
