"""Worker-wide isolation of last attempts: a delivery taken over from a worker that died while
running it, on its last attempt, runs with nothing else in the process.

One worker process runs several agents, so isolating a suspect within its own agent is not
enough: another agent's handler (possibly the same poison event, delivered to that agent too)
can kill the process while the suspect runs, and the suspect, innocent or not, is charged its
last attempt. Every consumer of a worker therefore shares one `Isolation`:

- a suspect is taken over only while the whole worker is idle, one at a time (`claiming`);
- while it runs, no consumer of the worker fetches or takes anything over;
- a consumer that saw a suspect held back twice asks the others to stop fetching too
  (`draining`), so that the worker becomes idle and the suspect can be taken over.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection

import anyio

__all__ = ["Isolation"]


class Isolation:
    """What the consumers of one worker share to run a last attempt alone."""

    def __init__(self) -> None:
        self._in_flight: list[Collection[object]] = []
        self._wakers: list[Callable[[], None]] = []
        self._flushes: list[Callable[[], Awaitable[None]]] = []
        self.claiming = anyio.Lock()
        """Held while a consumer takes over deliveries with the worker idle."""
        self.running_alone = 0
        """Suspects running now (0 or 1)."""
        self.draining = 0
        """Consumers waiting for the worker to become idle to take a suspect over."""

    def join(
        self,
        in_flight: Collection[object],
        wake: Callable[[], None],
        flush_acks: Callable[[], Awaitable[None]],
    ) -> None:
        """Add a consumer: its in-flight deliveries, how to wake its dispatcher, and how to
        send its finished deliveries' acknowledgements now."""
        self._in_flight.append(in_flight)
        self._wakers.append(wake)
        self._flushes.append(flush_acks)

    def idle(self) -> bool:
        """True when no handler of any agent of the worker is in flight."""
        return not any(self._in_flight)

    async def flush_acks(self) -> None:
        """Acknowledge what every consumer of the worker finished (before a suspect runs)."""
        for flush in self._flushes:
            await flush()

    def wake_all(self) -> None:
        """Let every consumer look at the isolation state again."""
        for wake in self._wakers:
            wake()
