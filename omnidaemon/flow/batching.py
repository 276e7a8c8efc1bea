"""Changes to one limit's state on the bus, batched: one compare-and-set for every change
that arrived while the previous one was on its way.

Under load, a worker's handlers ask for the same limit (a busy key's slots, the agent's rate
limit) many at a time. Applied one by one, each would wait for the one before it and pay its
own round trips; here the first to arrive takes the key's turn, everything that arrives while
it waits joins it, and the lot is applied in arrival order in one atomic update
(`Broker.update_value`), which reads the time once per try. A worker's changes of one key
thus never collide with each other, only with other workers'.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import anyio

from omnidaemon.brokers.base import Broker
from omnidaemon.brokers.stores import R

__all__ = ["Step", "StateUpdates"]

_KNOWN = 10_000  # states whose last value a worker remembers (the oldest are forgotten)

Step = Callable[[bytes | None, float], tuple[bytes, float, Any]]
"""A change of a state: `(stored bytes, now) -> (new bytes, seconds to keep them, answer)`."""


class _Batch:
    __slots__ = ("answers", "done", "error", "steps")

    def __init__(self) -> None:
        self.steps: list[Step] = []
        self.answers: list[Any] = []
        self.error: BaseException | None = None
        self.done = anyio.Event()


class StateUpdates:
    """Applies `Step`s to states on the bus, batching those of one key (see the module)."""

    def __init__(self, broker: Broker) -> None:
        self._broker = broker
        self._clock = broker.clock
        self._open: dict[str, _Batch] = {}  # key -> the batch still taking steps
        self._turns: dict[str, anyio.Lock] = {}  # key -> held while its batch is applied
        self._known: dict[str, bytes] = {}  # key -> the value this worker stored last

    async def apply(
        self, key: str, step: Callable[[bytes | None, float], tuple[bytes, float, R]]
    ) -> R:
        """Apply `step` to `key`'s state, with the others waiting for the key; its answer.

        Raises:
            Exception: the update's failure (the bus went away), for every step of its batch.
        """
        batch = self._open.get(key)
        if batch is not None:
            index = len(batch.steps)
            batch.steps.append(step)
            await batch.done.wait()
            if batch.error is not None:
                raise batch.error
            return cast("R", batch.answers[index])
        batch = self._open[key] = _Batch()
        batch.steps.append(step)
        turn = self._turns.get(key)
        if turn is None:
            turn = self._turns[key] = anyio.Lock()
        try:
            # Shielded: the batch is other handlers' too, and a cancelled leader (its handler's
            # timeout) must not fail them or leave a change half known. The bus calls under it
            # have timeouts of their own.
            with anyio.CancelScope(shield=True):
                await self._apply_batch(key, batch, turn)
        except BaseException as exc:
            batch.error = (
                exc
                if isinstance(exc, Exception)
                else RuntimeError("the change of a flow-control state was cancelled")
            )
            raise
        finally:
            if self._open.get(key) is batch:
                del self._open[key]
            batch.done.set()
            if not turn.locked() and not turn.statistics().tasks_waiting:
                self._turns.pop(key, None)
        return cast("R", batch.answers[0])

    async def _apply_batch(self, key: str, batch: _Batch, turn: anyio.Lock) -> None:
        """Wait for the key's turn, close the batch, and apply its steps in one update."""
        async with turn:
            # Closed once its turn has come: whoever arrives from now on starts the next.
            del self._open[key]
            steps = batch.steps

            produced: list[bytes] = []

            def run_all(data: bytes | None) -> tuple[bytes, float, list[Any]]:
                now = self._clock()
                answers = []
                new, ttl = b"", 0.0
                for one in steps:
                    new, ttl, answer = one(data, now)
                    answers.append(answer)
                    data = new
                produced.append(new)
                return new, ttl, answers

            known = self._known.pop(key, None)
            batch.answers = await self._broker.update_value(key, run_all, guess=known)
            # What this worker stored last: usually still there at its next change, which
            # then costs one compare-and-set instead of a read and a compare-and-set.
            self._known[key] = produced[-1]
            if len(self._known) > _KNOWN:
                del self._known[next(iter(self._known))]
