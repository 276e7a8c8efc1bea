"""The storage parts of the broker contract (`Broker` inherits them): results, output logs,
and keys with values, each bus on its own storage."""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TypeVar

import anyio

__all__ = ["OutputStore", "ResultStore", "ValueStore"]

R = TypeVar("R")
_UPDATE_TRIES = 200  # compare-and-set rounds before `update_value` gives up


class ResultStore(ABC):
    """Each agent's result record of an event (`omnidaemon result`, `App.result`)."""

    @abstractmethod
    async def put_result(self, event_id: str, agent: str, record: bytes, ttl: float) -> None:
        """Store `agent`'s result record for an event (replacing its previous one), kept for
        `ttl` seconds after the last write."""

    @abstractmethod
    async def get_results(self, event_id: str) -> dict[str, bytes]:
        """The stored result records of an event, by agent (empty when none is stored)."""


class OutputStore(ABC):
    """Output logs: the streamed partial output of handlers (`Context.emit`, `App.stream`).

    An output log is an append-only sequence of entries under a key, written by one producer
    (a handler streaming partial output) and read by any number of readers, each at its
    own pace, from the start: a reader that comes late misses nothing. The bus does not
    bound a log's length: its writer does.
    """

    @abstractmethod
    async def append_output(self, key: str, data: bytes, *, ttl: float) -> str:
        """Append one entry to the output log `key` (made by its first append); durable when
        this returns, like `publish`. Returns the entry's id: a string, unique within the
        log, that orders its entries (a reader resumes after it with `read_output`).

        Every entry is kept at least `ttl` seconds after its append, and the log is gone at
        most `ttl` seconds after its last append (give or take the bus's rounding: NATS
        counts whole seconds, rounded up). Redis and memory keep the whole log until `ttl`
        after its last append; on NATS each entry expires `ttl` after its own append, so
        choose a `ttl` longer than the log is written for plus how long readers need it.

        A call that fails because the bus did not answer may be repeated, and may then
        append the entry twice (at least once, like `publish`).
        """

    @abstractmethod
    async def read_output(
        self, key: str, *, after: str | None = None, count: int = 100, timeout: float = 0.0
    ) -> list[tuple[str, bytes]]:
        """Up to `count` entries of the output log `key` as `(id, data)`, oldest first: those
        after the entry `after` (from the first when `None`).

        When there are none yet, waits up to `timeout` seconds for one to be appended and
        returns as soon as one is (0: answers at once). A log that does not exist (not yet,
        or no longer: expired or deleted) reads as `[]`. Reading removes nothing: many
        readers may read one log at once, each at its own pace. `after` need not be an
        entry the log still holds (a reader resumes where it left off), but it must be an
        id of this bus.

        Raises:
            ValueError: `after` is not an id this bus makes, or `count` is below 1.
        """

    @abstractmethod
    async def delete_output(self, key: str) -> None:
        """Remove the output log `key` with every entry it holds (nothing if there is no such
        log). A later `append_output` starts a new log."""


class ValueStore(ABC):
    """Keys with values and TTLs: idempotency keys, flow control's counters and leases,
    schedules, debounce state."""

    @abstractmethod
    async def set_value(
        self, key: str, value: bytes, ttl: float, *, only_if_absent: bool = False
    ) -> bool:
        """Store `value` under `key` for `ttl` seconds; with `only_if_absent`, only when no
        value is stored (atomically). Returns whether it was stored."""

    @abstractmethod
    async def get_value(self, key: str) -> bytes | None:
        """The value stored under `key`, or `None`."""

    @abstractmethod
    async def delete_value(self, key: str) -> None:
        """Remove `key`'s value, if any."""

    @abstractmethod
    async def replace_value(
        self, key: str, expected: bytes, value: bytes | None, ttl: float
    ) -> bool:
        """Atomically, only if `key` holds `expected`: store `value` for `ttl` seconds (or
        remove the key when `value` is None). Returns whether it did."""

    async def update_value(
        self,
        key: str,
        update: Callable[[bytes | None], tuple[bytes, float, R]],
        *,
        guess: bytes | None = None,
    ) -> R:
        """Change `key`'s value atomically: `update(current)` returns `(new value, ttl,
        answer)`; the new value is stored for `ttl` seconds, and the answer returned.

        `update` must be a pure function of the value (it may run more than once: the default
        reads, then stores with compare-and-set, and runs it again on a conflict). A bus that
        can run it in one step (the in-memory bus) does. `guess`, the value the caller last
        saw, saves the read when nobody changed it since.

        Raises:
            RuntimeError: the value kept changing under it for `_UPDATE_TRIES` rounds.
        """
        if guess is not None:
            new, ttl, answer = update(guess)
            if await self.replace_value(key, guess, new, ttl):
                return answer
        for round_ in range(_UPDATE_TRIES):
            current = await self.get_value(key)
            new, ttl, answer = update(current)
            if current is None:
                if await self.set_value(key, new, ttl, only_if_absent=True):
                    return answer
            elif await self.replace_value(key, current, new, ttl):
                return answer
            # Others won the race: spread the retries so they do not collide again.
            await anyio.sleep(random.uniform(0, 0.001 * min(round_ + 1, 20)))
        raise RuntimeError(f"value {key!r} kept changing: gave up after {_UPDATE_TRIES} tries")

    @abstractmethod
    async def scan_values(self, prefix: str) -> dict[str, bytes]:
        """Every stored value whose key starts with `prefix`, by key."""
