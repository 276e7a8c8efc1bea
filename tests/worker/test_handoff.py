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


async def test_a_batch_that_finishes_at_once_is_served_by_one_task() -> None:
    queue: HandOff[int] = HandOff()
    served_by: dict[int, int] = {}

    async def consumer(me: int) -> None:
        while (item := await queue.get()) is not None:
            served_by[item] = me  # finishes without waiting for anything

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            for me in range(16):
                tg.start_soon(consumer, me)
            await anyio.wait_all_tasks_blocked()
            await queue.put_all(range(16))
            await anyio.wait_all_tasks_blocked()
            queue.close()
    assert sorted(served_by) == list(range(16))
    assert len(set(served_by.values())) == 1


async def test_items_behind_a_waiting_handler_each_get_a_task_at_once() -> None:
    queue: HandOff[int] = HandOff()
    started: list[int] = []
    release = anyio.Event()

    async def consumer() -> None:
        while (item := await queue.get()) is not None:
            started.append(item)
            await release.wait()  # a handler waiting on I/O

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            for _ in range(16):
                tg.start_soon(consumer)
            await anyio.wait_all_tasks_blocked()
            await queue.put_all(range(16))
            await anyio.wait_all_tasks_blocked()
            assert sorted(started) == list(range(16))  # all 16 run concurrently
            release.set()
            queue.close()
