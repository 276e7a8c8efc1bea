"""Taskiq's side of the benchmark (runs in bench/.peers-venv; see _driver.py).

The broker is taskiq-redis's `RedisStreamBroker` (XADD to a stream, XREADGROUP in a consumer
group, XACK after the task ran: taskiq's default `AcknowledgeType.WHEN_SAVED`), with
`xread_count=100` (its default) and `consumer_id="0"` so that its group reads the pre-filled
events. The worker is taskiq's own receiver, started programmatically with
`taskiq.api.run_receiver_task` and the `taskiq worker` defaults (100 concurrent async tasks,
parameters validated from the task's annotations, so the handler gets a `BenchEvent`).
Publishing is `await task.kiq(event)`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Callable
from importlib.metadata import version

from _driver import main, redis_versions
from _shared import BenchEvent, make_event
from taskiq.api import run_receiver_task
from taskiq_redis import RedisStreamBroker


class TaskiqPeer:
    name = "taskiq"
    stream = "bench:taskiq"
    group = "taskiq"

    def __init__(self) -> None:
        self.broker: RedisStreamBroker | None = None
        self.receiver: asyncio.Task[None] | None = None
        self.on_event: Callable[[BenchEvent], None] = lambda event: None

    def versions(self) -> dict[str, str]:
        return {
            "taskiq": version("taskiq"),
            "taskiq-redis": version("taskiq-redis"),
            **redis_versions(),
        }

    def _broker(self, url: str) -> RedisStreamBroker:
        broker = RedisStreamBroker(
            url,
            queue_name=self.stream,
            consumer_group_name=self.group,
            consumer_name=f"bench-{os.getpid()}",
            consumer_id="0",
            xread_count=100,
        )

        @broker.task(task_name="bench.handle")
        async def handle(event: BenchEvent) -> None:
            self.on_event(event)

        self.task = handle
        return broker

    async def prefill(self, url: str, n: int) -> None:
        broker = self._broker(url)
        await broker.startup()
        try:
            for start in range(0, n, 100):
                await asyncio.gather(
                    *(self.task.kiq(make_event(seq)) for seq in range(start, min(n, start + 100)))
                )
        finally:
            await broker.shutdown()

    async def start_consumer(self, url: str, on_event: Callable[[BenchEvent], None]) -> None:
        self.on_event = on_event
        broker = self.broker = self._broker(url)
        await broker.startup()
        self.receiver = asyncio.create_task(run_receiver_task(broker, max_async_tasks=100))

    async def stop_consumer(self) -> None:
        if self.receiver is not None:
            self.receiver.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.receiver
            self.receiver = None
        if self.broker is not None:
            await self.broker.shutdown()
            self.broker = None

    async def open_publisher(self, url: str) -> Callable[[BenchEvent], Awaitable[object]]:
        broker = self.broker = self._broker(url)
        await broker.startup()
        return self.task.kiq

    async def close_publisher(self) -> None:
        await self.stop_consumer()


if __name__ == "__main__":
    main(TaskiqPeer())
