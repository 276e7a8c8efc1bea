"""Worker: runs an app's agents concurrently under one anyio task group, and stops gracefully."""

from __future__ import annotations

import itertools
import os
import secrets
import socket
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import anyio
from anyio.abc import TaskStatus

from omnidaemon.debounce import consumer_specs
from omnidaemon.errors import ConfigurationError
from omnidaemon.flow.levels import BudgetLevels
from omnidaemon.observability.logging import get_logger
from omnidaemon.worker.cancels import CancelWatch
from omnidaemon.worker.consumer import AgentConsumer
from omnidaemon.worker.heartbeat import Heartbeat
from omnidaemon.worker.isolation import Isolation
from omnidaemon.worker.notify import OutcomeNotifier
from omnidaemon.worker.scheduler import ScheduleRunner
from omnidaemon.worker.startup import wait_for_bus
from omnidaemon.worker.watchdog import LoopWatchdog

if TYPE_CHECKING:
    from omnidaemon.app import App

__all__ = ["Worker", "consumer_name"]

_log = get_logger("omnidaemon.worker")
_worker_numbers = itertools.count(1)


def consumer_name() -> str:
    """A consumer name unique to this worker: `<host>:<pid>:<6 hex digits>`, then `:<n>` for
    the second and later worker of one process.

    Host and pid are there for people; they do not tell workers apart: replicas of one
    container image often share a hostname and all run as pid 1. The random part, new for
    every worker, does; the counter rules out a collision between workers of one process.
    """
    n = next(_worker_numbers)
    name = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
    return name if n == 1 else f"{name}:{n}"


class Worker:
    """Runs some or all of an app's agents until asked to stop.

    `App.serve`, `App.running` and `omnidaemon worker` are thin shells around it.

    Args:
        app: The app whose agents to run.
        agents: Names of the agents to run; default: all of them.
        concurrency: Override every agent's `concurrency`.
        shutdown_grace: Seconds in-flight handlers get to finish after `stop()`; default: the
            app's settings (`OMNIDAEMON_SHUTDOWN_GRACE`, 30 s).
        connect_timeout: Seconds `run()` keeps trying to reach the bus at start before it
            raises `BusUnavailable`; default: the app's settings (`OMNIDAEMON_CONNECT_TIMEOUT`,
            unset: for as long as it takes).
        schedules: Run the app's schedules too (every worker does by default, whatever
            `agents` it runs; the bus decides which one fires each tick).

    Raises:
        ConfigurationError: an unknown agent name, an app with neither agents nor
            schedules to run, or a schedule declared without `payload=` and never decorated.
        PayloadValidationError: a schedule's `payload=` contradicts an agent's type.
    """

    def __init__(
        self,
        app: App,
        *,
        agents: Sequence[str] | None = None,
        concurrency: int | None = None,
        shutdown_grace: float | None = None,
        connect_timeout: float | None = None,
        schedules: bool = True,
    ) -> None:
        app.check_schedules()  # a schedule declared without payload= and never decorated
        timed = schedules and bool(app.schedules)
        if not app.agents and not timed:
            raise ConfigurationError(f"app {app.name!r} has no agents to run")
        names = list(app.agents) if agents is None else list(dict.fromkeys(agents))
        if not names and not timed:
            raise ConfigurationError("no agents selected to run")
        specs = [app.get_agent(name) for name in names]
        if concurrency is not None and concurrency < 1:
            raise ConfigurationError(f"concurrency must be >= 1, not {concurrency}")
        self.app = app
        self.name = consumer_name()
        self.shutdown_grace = (
            app.settings.shutdown_grace if shutdown_grace is None else shutdown_grace
        )
        self.connect_timeout = (
            app.settings.connect_timeout if connect_timeout is None else connect_timeout
        )
        isolation = Isolation()  # one per worker: its agents share one process
        self.cancels = CancelWatch(app.broker)
        """The cancellations this worker follows (`App.cancel`), shared by its agents."""
        self.consumers = [
            AgentConsumer(
                app,
                spec,
                self.name,
                concurrency=concurrency or spec.concurrency,
                isolation=isolation,
                cancels=self.cancels,
            )
            # A debounced agent runs as three consumers (see omnidaemon.debounce.spec).
            for spec in consumer_specs(specs)
        ]
        self._stop = anyio.Event()
        threshold = app.settings.blocked_loop_warning
        # Warns when something blocks the event loop (OMNIDAEMON_BLOCKED_LOOP_WARNING).
        self.watchdog = LoopWatchdog(threshold) if threshold > 0 else None
        for consumer in self.consumers:
            consumer.watchdog = self.watchdog
        # Cancelled by stop(): a stop while waiting for the bus ends the wait at once.
        self._waiting: anyio.CancelScope | None = None
        # The webhook deliveries of this worker (in flight, queued, outcomes), while it runs.
        self.notifier: OutcomeNotifier | None = None
        self.heartbeat = Heartbeat(
            app.broker,
            worker=self.name,
            app=app.name,
            consumers=self.consumers,
            interval=app.settings.heartbeat_interval,
        )
        self.schedules = ScheduleRunner(app, self.name) if timed else None
        """The app's schedules, fired by this worker when the bus gives it a tick."""
        self.budget_levels = BudgetLevels(
            app.broker, app.budgets, interval=app.settings.heartbeat_interval
        )
        """The app's budgets' levels, for the Prometheus endpoint (read once a heartbeat)."""

    @property
    def abandoned_handlers(self) -> bool:
        """True if the last stop cancelled handlers that outlived the grace period.

        Plain `def` handlers among them may still be running in threads, which cannot be
        cancelled; a process should exit without waiting for them.
        """
        return any(c.abandoned_handlers for c in self.consumers)

    def stop(self) -> None:
        """Ask for a graceful stop: no new events; in-flight handlers get the grace period."""
        self._stop.set()
        if self._waiting is not None:
            self._waiting.cancel()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run until `stop()` (graceful) or cancellation (immediate).

        It waits for the bus first (retrying with backoff up to `connect_timeout`; a `stop()`
        meanwhile reports the start and returns at once). Startup
        hooks run next, and every consumer group exists before `task_status.started()` is
        reported, so an event published after that is seen even by `start="latest"` agents.

        Raises:
            ConfigurationError: the bus refused the broker URL's credentials.
            BusUnavailable: the bus could not be reached within `connect_timeout`.
        """
        app = self.app
        with app._agents_running(c.subscription.group for c in self.consumers):
            app._cancel_watches.add(self.cancels)  # an App.cancel here reaches it at once
            try:
                await self._run(task_status)
            finally:
                app._cancel_watches.discard(self.cancels)
        _log.info("worker stopped", app=app.name, consumer=self.name)

    async def _run(self, task_status: TaskStatus[None]) -> None:
        app = self.app
        async with app._worker_connection():
            # Before the hooks and subscriptions, and outside any task group, so that a bus
            # that is down or refuses us ends the start with one plain error.
            self._waiting = anyio.CancelScope()
            if self._stop.is_set():
                self._waiting.cancel()
            with self._waiting:
                await wait_for_bus(app.broker, timeout=self.connect_timeout)
            if self._stop.is_set():
                # Stopped before the bus answered: nothing ran, nothing to finish.
                _log.info("stopped before reaching the bus", bus=app.broker.url)
                task_status.started()
                return
            await self._serve(task_status)

    async def _serve(self, task_status: TaskStatus[None]) -> None:
        app = self.app
        async with app.lifespan(), OutcomeNotifier.running() as notifier:
            self.notifier = notifier
            for consumer in self.consumers:
                consumer.notifier = notifier
                await consumer.subscribe()
            await self.heartbeat.beat()
            await self.cancels.load()
            _log.info(
                "worker started",
                app=app.name,
                agents=[c.subscription.group for c in self.consumers],
                schedules=list(app.schedules) if self.schedules is not None else [],
                broker=app.broker.url,
                consumer=self.name,
            )
            task_status.started()
            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self.heartbeat.run)
                    tg.start_soon(self.cancels.run)
                    if self.schedules is not None:
                        tg.start_soon(self.schedules.run)
                    if app.budgets:
                        tg.start_soon(self.budget_levels.run)
                    if self.watchdog is not None:
                        tg.start_soon(self.watchdog.run)
                    async with anyio.create_task_group() as consumers:
                        for consumer in self.consumers:
                            consumers.start_soon(consumer.run, self.shutdown_grace)
                        await self._stop.wait()
                        for consumer in self.consumers:
                            consumer.stop()
                    tg.cancel_scope.cancel()
            finally:
                await self.heartbeat.clear()
            # Outcomes of the last events may still be on their way to their webhooks.
            await notifier.wait_idle(self.shutdown_grace)

    @asynccontextmanager
    async def started(self) -> AsyncIterator[Worker]:
        """Run the worker in the background for the block; stop it gracefully on exit."""
        async with anyio.create_task_group() as tg:
            await tg.start(self.run)
            try:
                yield self
            finally:
                self.stop()
