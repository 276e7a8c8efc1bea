"""A worker's side of cancellation: following the bus's cancellations, refusing to start a
cancelled event, and stopping a running handler whose event is cancelled.

One `CancelWatch` per worker, shared by its agents. Each running handler is a `Handling`;
when the watch learns a cancellation (from its poll of the bus, or at once from an
`App.cancel` in the same process) it cancels the matching handlings: an `async def` handler's
task (`CancelledError` at the `await` it is in), and `ctx.cancelled` for every handler (the
only way to tell a plain `def` handler, which runs in a thread no one can interrupt).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import anyio

from omnidaemon.cancellation import POLL_INTERVAL, Cancellation, CancelRegistry
from omnidaemon.observability.logging import get_logger

if TYPE_CHECKING:
    from omnidaemon.brokers.base import Broker
    from omnidaemon.context import Context
    from omnidaemon.envelope import Envelope

__all__ = ["CancelWatch", "Handling"]

_log = get_logger("omnidaemon.worker")


class Handling:
    """One handler running one event in this worker, as the watch sees it."""

    __slots__ = ("agent", "cancellation", "ctx", "envelope", "interrupted", "task")

    def __init__(self, envelope: Envelope[Any], agent: str, ctx: Context) -> None:
        self.envelope = envelope
        self.agent = agent
        self.ctx = ctx
        self.task: asyncio.Task[Any] | None = None
        """The task an `async def` handler runs in, while it runs; else `None`."""
        self.cancellation: Cancellation | None = None
        """Set once the event is cancelled: the handler's outcome is then `cancelled`."""
        self.interrupted = False
        """Whether `task` was cancelled for it (undone by `CancelWatch.ended`)."""

    def cancel(self, cancellation: Cancellation) -> None:
        """Stop the handler (async) or tell it to stop (`ctx.cancelled`, for every handler).

        An `async def` handler runs in one of the consumer's long-lived handler tasks: the
        task is cancelled (the handler gets `CancelledError` at the `await` it is suspended
        in), and `ended` takes the cancellation back once the handler is over, so the task
        serves the next event. Workers run on asyncio (redis-py's client is asyncio's).
        """
        if self.cancellation is not None:
            return
        self.cancellation = cancellation
        self.ctx._cancellation = cancellation
        if self.task is not None:
            self.interrupted = True
            self.task.cancel()


class CancelWatch:
    """The cancellations one worker knows, and the handlers it runs that they may stop."""

    def __init__(self, broker: Broker) -> None:
        self.registry = CancelRegistry(broker)
        self._running: set[Handling] = set()

    def check(self, envelope: Envelope[Any], agent: str) -> Cancellation | None:
        """The cancellation that covers `agent`'s handling of `envelope`, if any (in memory)."""
        registry = self.registry
        if registry.empty:
            return None
        return registry.match(envelope.id, envelope.correlation_id, envelope.created_at, agent)

    def started(self, handling: Handling) -> None:
        """Watch a handler from its start; a cancellation learnt since the event was checked
        (while it was being admitted) applies now, so the handler never starts."""
        self._running.add(handling)
        found = self.check(handling.envelope, handling.agent)
        if found is not None:
            handling.cancel(found)

    def ended(self, handling: Handling) -> None:
        """Stop watching it: from here on its outcome is what it did. Called in the handler's
        task, right after the handler returned or raised."""
        self._running.discard(handling)
        if handling.interrupted and handling.task is not None:
            handling.task.uncancel()  # the task serves the next event
            handling.interrupted = False

    def learn(self, news: list[Cancellation]) -> None:
        """Apply cancellations learnt from the bus or from this process's `App.cancel`."""
        fresh = self.registry.apply(news)
        self._stop_running(fresh)

    def _stop_running(self, fresh: list[Cancellation]) -> None:
        if not fresh or not self._running:
            return
        for handling in list(self._running):
            found = self.check(handling.envelope, handling.agent)
            if found is not None:
                _log.info(
                    "cancelling a running handler",
                    agent=handling.agent,
                    event_id=handling.envelope.id,
                    reason=found.reason,
                )
                handling.cancel(found)

    async def load(self) -> None:
        """Read every cancellation on the bus (at the worker's start)."""
        self._stop_running(await self.registry.load())

    async def run(self) -> None:
        """Follow the bus's cancellations until cancelled: a small read every `POLL_INTERVAL`
        (the records are read in full only at start, and when the log shows a gap)."""
        while True:
            await anyio.sleep(POLL_INTERVAL)
            try:
                news = await self.registry.refresh()
            except Exception as exc:
                # The bus is away: the consumers notice and reconnect; look again later.
                _log.debug("could not read cancellations", error=f"{type(exc).__name__}: {exc}")
                continue
            self._stop_running(news)
