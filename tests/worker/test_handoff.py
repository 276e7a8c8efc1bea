"""The hand-off from the consume loop to the handler tasks: every item is taken exactly once."""

from __future__ import annotations

import random

import anyio
import anyio.lowlevel
import pytest

from omnidaemon.worker.handoff import HandOff

pytestmark = pytest.mark.anyio


async def test_every_item_is_taken_once_by_busy_and_idle_tasks_alike() -> None:
    queue: HandOff[int] = HandOff()
    taken: list[int] = []
    rng = random.Random(7)

    async def consumer() -> None:
        while (item := await queue.get()) is not None:
            taken.append(item)
            if rng.random() < 0.3:
                await anyio.lowlevel.checkpoint()  # some handlers yield, some finish at once

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            for _ in range(8):
                tg.start_soon(consumer)
            for item in range(2_000):
                queue.put(item)
                if item % 7 == 0:
                    await anyio.lowlevel.checkpoint()
            queue.close()
    assert sorted(taken) == list(range(2_000))


async def test_close_lets_idle_tasks_finish_after_the_queue_is_empty() -> None:
    queue: HandOff[str] = HandOff()
    queue.put("last")
    queue.close()
    assert await queue.get() == "last"
    assert await queue.get() is None
