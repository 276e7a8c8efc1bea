"""A queue from the consume loop to a fixed set of handler tasks."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from typing import Generic, TypeVar

import anyio
import anyio.lowlevel

__all__ = ["HandOff"]

T = TypeVar("T")


class HandOff(Generic[T]):
    """Unbounded FIFO hand-off between one producer and many long-lived consumer tasks.

    Lighter than a memory object stream for the consume loop's use: `get` returns at once,
    without a scheduling round, when an item is waiting, and `put` wakes exactly one idle task.
    The producer bounds what is queued itself (it fetches only what there is capacity for).
    Make it inside the event loop that uses it.
    """

    def __init__(self) -> None:
        self._items: deque[T] = deque()
        self._idle: deque[anyio.Event] = deque()
        self._closed = False
        # The running backend's event class, made directly: `anyio.Event()` looks the backend
        # up on every call, which costs more than the rest of a hand-off.
        self._new_event = type(anyio.Event())

    def put(self, item: T) -> None:
        """Queue `item` and wake one idle task."""
        self._items.append(item)
        self._wake(1)

    async def put_all(self, items: Iterable[T]) -> None:
        """Queue `items`, waking as few tasks as keep them all moving.

        One idle task is woken and given its turn first. Work that finishes without waiting
        for anything (a cheap handler) lets it take the next item in that same turn, so a
        batch of such items costs one task switch, not one per item. Whatever is still queued
        after its turn waits behind a handler that is waiting on I/O, and gets a task each.
        """
        self._items.extend(items)
        if not self._items:
            return
        self._wake(1)
        if len(self._items) > 1 and self._idle:
            await anyio.lowlevel.checkpoint()
            self._wake(len(self._items))

    def close(self) -> None:
        """No more items: tasks get `None` once the queue is empty."""
        self._closed = True
        self._wake(len(self._idle))

    async def get(self) -> T | None:
        """The next item; `None` once closed and empty."""
        while not self._items:
            if self._closed:
                return None
            # Woken by `put`; another task may have taken the item meanwhile, so look again.
            event = self._new_event()
            self._idle.append(event)
            await event.wait()
        return self._items.popleft()

    def _wake(self, count: int) -> None:
        idle = self._idle
        for _ in range(min(count, len(idle))):
            idle.popleft().set()
