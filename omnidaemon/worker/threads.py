"""Sync handlers with a `timeout`: each runs in a thread that keeps its slot until it returns.

A thread cannot be stopped. When the timeout fires the attempt fails at once (it is retried or
dead-lettered as usual), but the thread runs on and keeps its slot of the agent's `concurrency`
until it returns, so timed-out handlers never make more than `concurrency` threads and the
consume loop fetches nothing for the slots they hold.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import anyio
import anyio.abc

from omnidaemon.context import Context

__all__ = ["TimedThreads"]

# How often, at most, a thread that outlived its handler's timeout is checked for its end
# (its slot is freed then): quickly at first, as it may be about to return.
_THREAD_POLL_INTERVAL = 0.25


class _ThreadCall:
    """One call of a sync handler with a `timeout`; it borrows the agent's thread slot.

    `run` runs in the thread; the handler and `_await_thread` read `finished` from the event
    loop (plain attributes are enough: the GIL orders the writes).
    """

    __slots__ = ("abandoned", "ctx", "finished", "func", "payload")

    def __init__(self, func: Callable[[Any, Context], Any], payload: Any, ctx: Context) -> None:
        self.func = func
        self.payload = payload
        self.ctx = ctx
        self.abandoned = False  # its attempt is over: timed out, failed or cancelled
        self.finished = False  # the thread returned, or will never run it

    def run(self) -> Any:
        try:
            if self.abandoned:  # timed out before a thread took it up: too late to start
                return None
            return self.func(self.payload, self.ctx)
        finally:
            self.finished = True


class TimedThreads:
    """Runs one agent's sync handler in threads with a timeout.

    Args:
        func: The handler, called as `func(payload, ctx)`.
        slots: The agent's thread slots (its `concurrency`).
        slot_freed: Called when a timed-out handler's thread returns and its slot is free.
        timeouts: Where the cancel scopes of calls under way are kept (see
            `AgentConsumer.timeouts`).
    """

    def __init__(
        self,
        func: Callable[[Any, Context], Any],
        slots: anyio.CapacityLimiter,
        slot_freed: Callable[[], None],
        timeouts: set[anyio.CancelScope] | None = None,
    ) -> None:
        self._func = func
        self._timeouts: set[anyio.CancelScope] = set() if timeouts is None else timeouts
        self._slots = slots
        self._slot_freed = slot_freed
        # A call's thread is started under this limiter, which never blocks: the slot it
        # borrowed from `slots` is what bounds the threads.
        self._unbounded = anyio.CapacityLimiter(math.inf)
        self.abandoned = 0
        """Threads still running after their attempt timed out (each holds a slot)."""
        self.service: anyio.abc.TaskGroup | None = None
        """Where the tasks waiting for abandoned threads run (set while the consumer runs)."""

    async def call(self, payload: Any, ctx: Context, timeout: float) -> Any:
        """Run the handler in a thread; raise `TimeoutError` after `timeout` seconds.

        The timeout only stops waiting for the thread: the slot stays taken until the thread
        returns (`_await_thread`).
        """
        slots = self._slots
        call = _ThreadCall(self._func, payload, ctx)
        try:
            slots.acquire_on_behalf_of_nowait(call)
        except anyio.WouldBlock:
            # Not expected: the consume loop fetches only for the slots that neither handlers
            # nor timed-out threads hold. Should it happen, the attempt, and its timeout,
            # start once a slot is free: an event is not failed for time it did not run.
            await slots.acquire_on_behalf_of(call)
        try:
            with anyio.fail_after(timeout) as scope:
                self._timeouts.add(scope)
                try:
                    # Awaited here, not in a task of its own, so that a handler that returns
                    # in time costs what it did before: the slot is only handed on when it
                    # did not.
                    result = await anyio.to_thread.run_sync(
                        call.run, limiter=self._unbounded, abandon_on_cancel=True
                    )
                finally:
                    self._timeouts.discard(scope)
        except BaseException:
            # The timeout, an exception from the handler, or a hard stop.
            call.abandoned = True  # a thread not started yet will not run it
            if call.finished:
                slots.release_on_behalf_of(call)
            else:
                assert self.service is not None
                self.abandoned += 1
                self.service.start_soon(self._await_thread, call)
            raise
        slots.release_on_behalf_of(call)
        return result

    async def _await_thread(self, call: _ThreadCall) -> None:
        """Keep a timed-out handler's slot until its thread returns, then give it back.

        Runs in the consumer's service task group, which is cancelled when the consumer stops:
        stopping the worker never waits for such a thread. Polled, because the thread cannot
        wake the event loop itself: `anyio.from_thread.run_sync` blocks it until the loop runs
        the call, which never happens once the loop has stopped, and a stuck thread keeps the
        process alive.
        """
        delay = 0.01
        while not call.finished:
            await anyio.sleep(delay)
            delay = min(2 * delay, _THREAD_POLL_INTERVAL)
        self._slots.release_on_behalf_of(call)
        self.abandoned -= 1
        self._slot_freed()
