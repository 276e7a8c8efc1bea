"""Publishing from synchronous code (Django and Flask views, scripts): `App.publish_sync`.

The caller has no event loop, so publishing runs on one of omnidaemon's own: a daemon thread
that owns an event loop and its own connection to the bus, started on first use and shared by
every thread of the process.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Protocol

import anyio
from anyio.from_thread import BlockingPortal

from omnidaemon.brokers.base import Broker

__all__ = ["PublishesSync", "SyncPublisher"]


class PublishesSync(Protocol):
    """What `App.publish_sync` publishes through: `SyncPublisher`, or `omnidaemon.testing`'s
    stand-in that puts events on the test bus."""

    def serves_current_task(self) -> bool:
        """True if the async task calling `publish_sync` may publish through this."""
        ...

    def publish(self, topic: str, data: bytes, *, delay: float = 0.0) -> None:
        """Publish one encoded event, blocking the calling thread until the bus has it."""
        ...

    def close(self) -> None:
        """Release what publishing holds (threads, connections)."""
        ...


class SyncPublisher:
    """Publishes encoded events through a broker living on a background event loop.

    Args:
        make_broker: Makes the (unconnected) broker the background loop owns.
    """

    def __init__(self, make_broker: Callable[[], Broker]) -> None:
        self._make_broker = make_broker
        self._lock = threading.Lock()
        self._portal: BlockingPortal | None = None
        self._broker: Broker | None = None

    def _start(self) -> BlockingPortal:
        with self._lock:
            if self._portal is not None:
                return self._portal
            # Made here, so that a bus that cannot be used this way fails in the caller.
            broker = self._broker = self._make_broker()
            ready = threading.Event()
            failure: list[BaseException] = []

            async def main() -> None:
                try:
                    async with BlockingPortal() as portal:
                        self._portal = portal
                        ready.set()
                        await portal.sleep_until_stopped()
                    await broker.close()
                except Exception as exc:  # reported to the caller waiting below
                    failure.append(exc)
                    ready.set()

            # A daemon thread: a process that never calls close() still exits.
            thread = threading.Thread(
                target=anyio.run, args=(main,), name="omnidaemon-publish-sync", daemon=True
            )
            thread.start()
            ready.wait()
            if failure:
                raise failure[0]
            assert self._portal is not None
            return self._portal

    def serves_current_task(self) -> bool:
        """Never: publishing blocks the thread, which would stall the caller's event loop."""
        return False

    def publish(self, topic: str, data: bytes, *, delay: float = 0.0) -> None:
        """Publish one encoded event, blocking the calling thread until the bus has it."""
        portal = self._start()
        portal.call(self._publish, topic, data, delay)

    async def _publish(self, topic: str, data: bytes, delay: float) -> None:
        assert self._broker is not None
        await self._broker.connect()
        await self._broker.publish(topic, data, delay=delay)

    def close(self) -> None:
        """Close the connection and stop the background loop (it starts again on next use)."""
        with self._lock:
            portal, self._portal = self._portal, None
        if portal is not None:
            portal.call(portal.stop)
