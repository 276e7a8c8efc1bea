"""A queue from the consume loop to a fixed set of handler tasks."""

from __future__ import annotations

from collections import deque
from typing import Generic, TypeVar

import anyio

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
        if self._idle:
            self._idle.popleft().set()

    def close(self) -> None:
        """No more items: tasks get `None` once the queue is empty."""
        self._closed = True
        while self._idle:
            self._idle.popleft().set()

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
