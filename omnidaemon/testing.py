"""Test your agents in-process, in milliseconds, with the semantics of the real bus.

```python
from omnidaemon.testing import TestApp

async def test_pipeline():
    async with TestApp(app) as bus:
        await bus.publish("document.uploaded", {"file_path": "a.pdf", "user_id": "u1"})
        await bus.drain()
        assert bus.published("text.extracted")[0].payload["file_path"] == "a.pdf"
        assert bus.dead_letters("extract_text") == []
```

`TestApp` runs the app's agents on a private `memory://` bus for the duration of the block:
fan-out, load sharing, per-agent retries with their attempt counts, dead letters and
ack-after-handler all behave as in production. Retry backoff is skipped by `drain()` (the bus's
clock jumps to the next scheduled retry), so a test of three retries takes no longer than one.
Handler timeouts and the app's schedules move only on request: `await bus.advance(seconds)`
fires each schedule's ticks that fall due in that time, once each, in order.
`app.publish_sync` (sync code, from a thread or the test itself) publishes on the test bus
too. An exception raised in the block comes out as itself; handlers still running when it ends
are cancelled after `shutdown_grace` (0.1 s) with a `RuntimeWarning`.
"""

from __future__ import annotations

import math
import threading
import warnings
from collections.abc import Sequence
from contextlib import AsyncExitStack
from datetime import UTC, datetime
from functools import partial
from types import TracebackType
from typing import Any

import anyio
from anyio.from_thread import BlockingPortal
from pydantic import TypeAdapter

from omnidaemon.app import App
from omnidaemon.brokers.base import Broker, Subscription
from omnidaemon.brokers.memory import MemoryBroker
from omnidaemon.dead_letters import DeadLetter
from omnidaemon.debounce import is_internal_topic
from omnidaemon.debounce.view import internal_subscriptions
from omnidaemon.envelope import Envelope
from omnidaemon.lanes import LANES, lane_topic, split_lane_topic
from omnidaemon.sync import PublishesSync
from omnidaemon.worker.runner import Worker
from omnidaemon.worker.scheduler import ScheduleRunner

__all__ = ["TestApp"]

_ANY_ENVELOPE: TypeAdapter[Envelope[Any]] = TypeAdapter(Envelope[Any])


class _RecordingBroker(MemoryBroker):
    """A private memory bus that also remembers everything published on it, in order."""

    def __init__(self) -> None:
        super().__init__(None)
        self.log: list[tuple[str, bytes]] = []

    def publish_nowait(self, topic: str, data: bytes, *, delay: float = 0.0) -> None:
        # `publish` goes through here too.
        self.log.append((topic, data))
        super().publish_nowait(topic, data, delay=delay)

    async def publish_many(self, entries: Sequence[tuple[str, bytes]]) -> None:
        self.log.extend(entries)
        await super().publish_many(entries)

    async def publish_if_exists(self, topic: str, data: bytes) -> bool:
        # Replies to App.request go through here; those that were dropped were not published.
        appended = await super().publish_if_exists(topic, data)
        if appended:
            self.log.append((topic, data))
        return appended


def _sole_exception(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    """The one exception inside `group` and the groups nested in it, or None if several."""
    found: BaseException = group
    while isinstance(found, BaseExceptionGroup):
        if len(found.exceptions) != 1:
            return None
        found = found.exceptions[0]
    return found


class _TestPublisher:
    """`App.publish_sync` inside the block: events go onto the test bus, on the test's loop.

    The memory bus lives on one event loop, so other threads hand their events to it through
    a portal; the test itself (the task that entered the block, as with a Flask view called
    directly) publishes in place, since the memory bus takes an event without waiting.
    Handlers and other tasks are refused, as `publish_sync` refuses async code in production.
    """

    def __init__(self, broker: _RecordingBroker, portal: BlockingPortal) -> None:
        self._broker = broker
        self._portal = portal
        self._loop_thread = threading.get_ident()
        self._test_task = anyio.get_current_task().id

    def serves_current_task(self) -> bool:
        return anyio.get_current_task().id == self._test_task

    def publish(self, topic: str, data: bytes, *, delay: float = 0.0) -> None:
        if threading.get_ident() == self._loop_thread:
            self._broker.publish_nowait(topic, data, delay=delay)
        else:
            self._portal.call(partial(self._broker.publish_nowait, topic, data, delay=delay))

    def close(self) -> None:
        pass  # the portal is the block's, and closes with it


class TestApp:
    """Runs an app's agents on a private in-memory bus; use it as an async context manager.

    Args:
        app: The app under test. Its broker is swapped for the block and restored after.
        agents: Run only these agents (default: all).
        fast_retries: Let `drain()` skip retry backoff instead of waiting it out.
        shutdown_grace: Seconds handlers still running when the block ends get to finish;
            those that do not are cancelled with a `RuntimeWarning`. A block that ends with
            an exception cancels them at once.
        now: The time the app's schedules start from (timezone-aware, or naive UTC), instead
            of the real time: `TestApp(app, now=datetime(2026, 3, 28, tzinfo=london))`, then
            `advance` to see the ticks of the days that follow. Only the schedules' time is
            set; the bus's clock (delays, expiries, handler timeouts) keeps the real time, and
            `advance` moves both by the same amount.
    """

    __test__ = False  # not a pytest test class, despite its name

    def __init__(
        self,
        app: App,
        *,
        agents: Sequence[str] | None = None,
        fast_retries: bool = True,
        shutdown_grace: float = 0.1,
        now: datetime | None = None,
    ) -> None:
        self.app = app
        self.broker = _RecordingBroker()
        if now is not None and now.tzinfo is None:
            now = now.replace(tzinfo=UTC)
        self._start = now
        # The app's schedules, driven by `advance` on the time below (not the real time
        # that also passes), so that a test sees exactly the ticks it asked for.
        self._schedules: ScheduleRunner | None = None
        self._schedule_time = 0.0
        self._agents = agents
        self._fast_retries = fast_retries
        self._grace = shutdown_grace
        self._stack: AsyncExitStack | None = None
        self._worker: Worker | None = None
        self._saved: tuple[Broker | None, bool, PublishesSync | None] | None = None

    async def __aenter__(self) -> TestApp:
        app = self.app
        self._saved = (app._broker, app._connected, app._sync)
        app._broker, app._connected = self.broker, False
        stack = AsyncExitStack()
        try:
            portal = await stack.enter_async_context(BlockingPortal())
            app._sync = _TestPublisher(self.broker, portal)
            worker = self._worker = Worker(app, agents=self._agents, shutdown_grace=self._grace)
            # The test drives the worker's schedules; the worker does not run them itself.
            self._schedules, worker.schedules = worker.schedules, None
            await stack.enter_async_context(worker.started())
            if self._schedules is not None:
                start = self._start
                self._schedule_time = self.broker.clock() if start is None else start.timestamp()
                await self._schedules.drive(self._schedule_time)  # they start from now
        except BaseException:
            await stack.aclose()
            self._restore()
            raise
        self._stack = stack
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        sole: BaseException | None = None
        try:
            if self._stack is not None:
                await self._stack.__aexit__(exc_type, exc, tb)
        except BaseExceptionGroup as group:
            # The worker runs in a task group, which wraps whatever leaves the block. A test
            # expects its own exception (`pytest.raises(TimeoutError)`), so one exception
            # comes out as itself; several (the block's and a failing hook's) stay grouped.
            sole = _sole_exception(group)
            if sole is None:
                raise
            if sole is exc:
                return  # Python re-raises the block's exception, traceback intact
        finally:
            self._stack = None
            self._restore()
        if sole is not None:
            raise sole
        if exc is None:
            self._warn_if_abandoned()

    def _warn_if_abandoned(self) -> None:
        worker = self._worker
        abandoned = [] if worker is None else [c for c in worker.consumers if c.abandoned_handlers]
        if abandoned:
            names = ", ".join(repr(c.subscription.group) for c in abandoned)
            warnings.warn(
                f"a handler of {names} was still running when the TestApp block ended and "
                f"was cancelled after shutdown_grace={self._grace} s; await drain() in the "
                "block to let handlers finish, or pass a longer shutdown_grace",
                RuntimeWarning,
                stacklevel=3,
            )

    def _restore(self) -> None:
        if self._saved is not None:
            self.app._broker, self.app._connected, self.app._sync = self._saved
            self._saved = None

    async def publish(self, topic: str, payload: Any, **options: Any) -> str:
        """Publish like `App.publish` (same options); returns the event id."""
        return await self.app.publish(topic, payload, **options)

    async def drain(self, timeout: float = 10.0) -> None:
        """Wait until no event is unread, being handled, or waiting for a retry.

        Raises:
            TimeoutError: the bus was still busy after `timeout` seconds (a handler that never
                returns, or agents that keep publishing to each other).
        """
        with anyio.move_on_after(timeout) as scope:
            while True:
                if self.broker.busy() or self._traces_unsent():
                    await self.broker.wait_changed(0.05)
                elif self._fast_retries and self.broker.fast_forward():
                    continue
                elif self.broker.has_scheduled():
                    await self.broker.wait_changed(0.05)
                else:
                    return
        if scope.cancelled_caught:
            raise TimeoutError(f"the bus was still busy after {timeout} s")

    def _traces_unsent(self) -> bool:
        """Whether a consumer is still finishing a delivery the bus counts as settled, or
        holds trace records not written yet (they go with its next acks, or within 50 ms):
        `App.trace` after `drain()` sees the whole run."""
        worker = self._worker
        return worker is not None and any(c.running or c.traces_unsent for c in worker.consumers)

    async def advance(
        self, seconds: float, *, timeout: float = 10.0, offline: bool = False
    ) -> None:
        """Let `seconds` pass on the test's clock, at once; the clock handler timeouts and
        the app's schedules run on.

        First waits until every event is either handled or inside a handler (retry backoff
        skipped, as in `drain()`). Then moves the clock: a handler running under
        `timeout=` that has now outlived it fails with `TimeoutError` and is retried or
        dead-lettered as in production; retries, delayed events and result and idempotency
        expiries falling due in that time are due. Then waits until the bus settles again, so
        each call times out one attempt of a hung handler. Handlers that start later get their
        whole timeout, and a handler's own `anyio.sleep` still takes real time.

        Each tick of a schedule that falls due in that time fires once, in order: the clock
        stops at the tick, the tick fires, and the bus settles before the clock moves on.
        With `offline=True` the time passes as if no worker ran: the ticks that fell due are
        missed, and the schedule's `catch_up` decides, at the end, whether the latest of them
        fires once (as on a worker's start after an outage).

        Raises:
            TimeoutError: the bus did not settle within `timeout` real seconds (a handler
                without a `timeout=` that never returns, or agents that keep publishing).
        """
        if seconds < 0:
            raise ValueError(f"time only goes forward, not {seconds} s")
        await self._settle(timeout)
        runner, end = self._schedules, self._schedule_time + seconds
        while runner is not None and not offline:
            due = await runner.next_due(self._schedule_time)
            if due is None or due > end:
                break
            self._move_clock(due - self._schedule_time)
            await runner.drive(due)
            await self._settle(timeout)
        self._move_clock(end - self._schedule_time)
        if runner is not None:
            await runner.drive(end, gap_after=0.0 if offline else math.inf)
        await self._settle(timeout)

    def _move_clock(self, seconds: float) -> None:
        self.broker.advance(seconds)
        self._schedule_time += seconds
        worker = self._worker
        for consumer in worker.consumers if worker is not None else ():
            for scope in consumer.timeouts:
                # `fail_after` raises TimeoutError once its deadline has passed; moving it
                # earlier is what `seconds` of waiting would have done.
                scope.deadline -= seconds

    async def _settle(self, timeout: float) -> None:
        """Wait until no event is unread or due, and every delivery is inside a handler with
        a timeout (which only the clock moves on)."""
        worker = self._worker
        consumers = worker.consumers if worker is not None else []
        with anyio.move_on_after(timeout) as scope:
            while True:
                now = anyio.current_time()
                # A handler whose deadline has passed is about to fail, not waiting.
                waiting = all(
                    sum(self.broker.pending(sub) for sub in c.subscriptions) == len(c.timeouts)
                    and all(t.deadline > now for t in c.timeouts)
                    for c in consumers
                )
                if self.broker.queued() or not waiting:
                    await self.broker.wait_changed(0.05)
                elif not (self._fast_retries and self.broker.fast_forward()):
                    return
        if scope.cancelled_caught:
            raise TimeoutError(f"the bus was still busy after {timeout} s")

    def published(self, topic: str | None = None) -> list[Envelope[Any]]:
        """Every event published while the block ran, in order, optionally only on `topic`.

        Payloads are plain JSON data (`dict`, `list`, ...), as another process would read them.
        Events of every priority are listed (`topic` names the topic, whatever the lane); a
        debounced agent's own checks and batches are not (see `omnidaemon.debounce`).
        """
        return [
            _ANY_ENVELOPE.validate_json(data)
            for t, data in self.broker.log
            if (topic is None or split_lane_topic(t)[0] == topic) and not is_internal_topic(t)
        ]

    def dead_letters(self, agent: str) -> list[DeadLetter]:
        """The events `agent` dead-lettered, oldest first (of every priority; a debounced
        agent's batches included)."""
        spec = self.app.get_agent(agent)
        queues = [Subscription(lane_topic(spec.topic, lane), spec.name) for lane in LANES]
        lanes = [
            [DeadLetter.decode(record) for _, record in self.broker.dead_letters_now(sub)]
            for sub in queues + internal_subscriptions(spec)
        ]
        merged = [letter for letters in lanes for letter in letters]
        if sum(1 for letters in lanes if letters) <= 1:
            return merged  # one queue: its own order
        return sorted(merged, key=lambda letter: letter.failed_at)  # stable: ties keep lanes
