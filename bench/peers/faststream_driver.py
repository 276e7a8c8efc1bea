"""FastStream's side of the benchmark (runs in bench/.peers-venv; see _driver.py).

The consumer is a Redis stream subscriber in a consumer group,
`StreamSub(stream, group=..., consumer=...)` with FastStream's defaults otherwise (no COUNT on
its XREADGROUP: it takes whatever is there; `max_records=100` measured no faster), and
`AckPolicy.ACK`: each message is acknowledged after its handler returned. The handler's
`BenchEvent` annotation makes FastStream validate the payload into the model. Message log
lines are logged at DEBUG (`log_level=`), below the logger's level, so they cost what a
production setup pays for them and print nothing. Publishing uses
`broker.publish(event, stream=...)`; the pre-fill passes a redis-py pipeline to it, 1000
events per round trip.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable
from importlib.metadata import version

import redis.asyncio as aioredis
from _driver import main, redis_versions
from _shared import BenchEvent, make_event
from faststream import AckPolicy
from faststream.redis import RedisBroker, StreamSub


class FastStreamPeer:
    name = "faststream"
    stream = "bench:faststream"
    group = "faststream"

    def __init__(self) -> None:
        self.broker: RedisBroker | None = None

    def versions(self) -> dict[str, str]:
        return {"faststream": version("faststream"), **redis_versions()}

    def _broker(self, url: str) -> RedisBroker:
        return RedisBroker(url, log_level=logging.DEBUG)

    async def prefill(self, url: str, n: int) -> None:
        broker = self._broker(url)
        r = aioredis.Redis.from_url(url)
        await broker.connect()
        try:
            for start in range(0, n, 1000):
                async with r.pipeline(transaction=False) as pipe:
                    for seq in range(start, min(n, start + 1000)):
                        await broker.publish(make_event(seq), stream=self.stream, pipeline=pipe)
                    await pipe.execute()
        finally:
            await r.aclose()
            await broker.stop()

    async def start_consumer(self, url: str, on_event: Callable[[BenchEvent], None]) -> None:
        broker = self.broker = self._broker(url)

        @broker.subscriber(
            stream=StreamSub(self.stream, group=self.group, consumer=f"bench-{os.getpid()}"),
            ack_policy=AckPolicy.ACK,
        )
        async def handle(event: BenchEvent) -> None:
            on_event(event)

        await broker.start()

    async def stop_consumer(self) -> None:
        if self.broker is not None:
            await self.broker.stop()
            self.broker = None

    async def open_publisher(self, url: str) -> Callable[[BenchEvent], Awaitable[object]]:
        broker = self.broker = self._broker(url)
        await broker.connect()

        async def send(event: BenchEvent) -> object:
            return await broker.publish(event, stream=self.stream)

        return send

    async def close_publisher(self) -> None:
        await self.stop_consumer()


if __name__ == "__main__":
    main(FastStreamPeer())
