"""Graceful shutdown, crashed workers and lease renewal (DESIGN.md 4.1, 4.4, 4.5, 4.7)."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from pydantic import BaseModel

from omnidaemon import App, Context
from omnidaemon.brokers import MemoryBroker, Subscription
from omnidaemon.worker import Worker

pytestmark = pytest.mark.anyio


class Job(BaseModel):
    job_id: str


async def wait_for(predicate: Any, timeout: float = 5.0) -> None:
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(0.01)


async def test_graceful_stop_lets_in_flight_handlers_finish_and_acks_them() -> None:
    broker = MemoryBroker(None)
    app = App("jobs", broker=broker)
    started: list[str] = []
    finished: list[str] = []

    @app.agent("job.queued", reclaim_idle=0.2)
    async def work(event: Job) -> None:
        started.append(event.job_id)
        await anyio.sleep(0.3)
        finished.append(event.job_id)

    worker = Worker(app, shutdown_grace=5)
    async with anyio.create_task_group() as tg:
        await tg.start(worker.run)
        await app.publish("job.queued", {"job_id": "j1"})
        await wait_for(lambda: started == ["j1"])
        worker.stop()
    assert finished == ["j1"]
    sub = Subscription("job.queued", "work")
    assert broker.pending(sub) == 0  # acknowledged before the worker returned

    # Nothing is delivered again to the next worker.
    async with Worker(app).started():
        await anyio.sleep(0.5)
    assert started == ["j1"]


async def test_stop_fetches_nothing_new() -> None:
    broker = MemoryBroker(None)
    app = App("jobs", broker=broker)
    started: list[str] = []
    release = anyio.Event()

    @app.agent("job.queued", concurrency=1)
    async def work(event: Job) -> None:
        started.append(event.job_id)
        await release.wait()

    worker = Worker(app, shutdown_grace=5)
    async with anyio.create_task_group() as tg:
        await tg.start(worker.run)
        await app.publish("job.queued", {"job_id": "j1"})
        await wait_for(lambda: started == ["j1"])
        worker.stop()
        await app.publish("job.queued", {"job_id": "j2"})
        await anyio.wait_all_tasks_blocked()
        release.set()
    assert started == ["j1"]  # j2 waits, unread, for the next worker


async def test_handlers_still_running_after_the_grace_period_are_redelivered() -> None:
    broker = MemoryBroker(None)
    app = App("jobs", broker=broker)
    attempts: list[int] = []

    @app.agent("job.queued", reclaim_idle=0.2)
    async def work(event: Job, ctx: Context) -> None:
        attempts.append(ctx.attempt)
        if ctx.attempt == 1:
            await anyio.sleep(60)

    worker = Worker(app, shutdown_grace=0.1)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            await tg.start(worker.run)
            await app.publish("job.queued", {"job_id": "j1"})
            await wait_for(lambda: attempts == [1])
            worker.stop()
    # The cancelled delivery was not acknowledged: the next worker takes it over.
    async with Worker(app).started():
        await wait_for(lambda: attempts == [1, 2])
        await wait_for(lambda: broker.pending(Subscription("job.queued", "work")) == 0)


async def test_a_crashed_workers_delivery_is_reclaimed_as_a_new_attempt() -> None:
    broker = MemoryBroker(None)
    app = App("jobs", broker=broker)
    attempts: list[int] = []

    @app.agent("job.queued", reclaim_idle=0.2)
    async def work(event: Job, ctx: Context) -> None:
        attempts.append(ctx.attempt)

    sub = Subscription("job.queued", "work")
    await broker.subscribe(sub)
    await app.publish("job.queued", {"job_id": "j1"})
    # A worker takes the event and dies without settling it.
    assert len(await broker.fetch(sub, "crashed-host:1:1", 10, 1.0)) == 1

    async with Worker(app).started():
        await wait_for(lambda: attempts == [2])


async def test_a_message_that_keeps_killing_workers_ends_in_the_dead_letter_queue() -> None:
    broker = MemoryBroker(None)
    app = App("jobs", broker=broker)
    attempts: list[int] = []

    @app.agent("job.queued", reclaim_idle=0.1, max_retries=2)
    async def work(event: Job, ctx: Context) -> None:
        attempts.append(ctx.attempt)

    sub = Subscription("job.queued", "work")
    await broker.subscribe(sub)
    await app.publish("job.queued", {"job_id": "poison"})
    # Three workers in a row die holding it: that uses up all max_retries + 1 attempts.
    [_delivery] = await broker.fetch(sub, "dead:1:1", 10, 1.0)
    for n in (2, 3):
        with anyio.fail_after(5):
            while not (claimed := await broker.reclaim(sub, f"dead:{n}:1", 0.1, 10)):
                await anyio.sleep(0.02)
        assert claimed[0].attempt == n

    async with Worker(app).started():
        await wait_for(lambda: len(broker.dead_letters_now(sub)) == 1)
    assert attempts == []  # never handed to the handler a fourth time
    [letter] = await app.dead_letters("work")
    assert letter.error_type == "AttemptsExhausted"
    assert letter.attempts == 4
    assert letter.payload == {"job_id": "poison"}


async def test_a_live_worker_keeps_the_lease_of_a_long_handler() -> None:
    broker = MemoryBroker(None)
    app = App("jobs", broker=broker)
    runs: list[int] = []
    done = anyio.Event()

    @app.agent("job.queued", reclaim_idle=0.15)
    async def work(event: Job, ctx: Context) -> None:
        runs.append(ctx.attempt)
        await anyio.sleep(1.0)  # several reclaim_idle periods
        done.set()

    async with Worker(app).started(), Worker(app).started():
        await app.publish("job.queued", {"job_id": "long"})
        with anyio.fail_after(5):
            await done.wait()
        await wait_for(lambda: broker.pending(Subscription("job.queued", "work")) == 0)
    assert runs == [1]  # ran once: the other worker never reclaimed it
