"""What a `memory://` bus (`MemoryBroker`) stores besides its topics: results, output logs,
run traces, and keys with values, each with its TTL on the bus's clock."""

from __future__ import annotations

from collections.abc import Callable

import anyio

from omnidaemon.brokers._memory_inspection import MemoryInspection
from omnidaemon.brokers._memory_output import parse_memory_id
from omnidaemon.brokers.stores import R
from omnidaemon.brokers.traces import StoredTrace

__all__ = ["MemoryStores"]


class MemoryStores(MemoryInspection):
    """The storage methods of `MemoryBroker`, on its bus `_bus`."""

    # Results ------------------------------------------------------------------------------

    async def put_result(self, event_id: str, agent: str, record: bytes, ttl: float) -> None:
        bus = self._bus
        _, records = bus.results.get(event_id, (0.0, {}))
        records[agent] = record
        bus.results[event_id] = (bus.now() + ttl, records)
        bus.notify()
        await anyio.lowlevel.checkpoint()

    async def get_results(self, event_id: str) -> dict[str, bytes]:
        await anyio.lowlevel.checkpoint()
        expires, records = self._bus.results.get(event_id, (0.0, {}))
        if expires <= self._bus.now():
            self._bus.results.pop(event_id, None)
            return {}
        return dict(records)

    # Output logs --------------------------------------------------------------------------

    async def append_output(self, key: str, data: bytes, *, ttl: float) -> str:
        bus = self._bus
        entry_id = bus.outputs.append(key, data, ttl, bus.now())
        bus.notify()  # wakes the readers waiting in read_output
        await anyio.lowlevel.checkpoint()
        return entry_id

    async def read_output(
        self, key: str, *, after: str | None = None, count: int = 100, timeout: float = 0.0
    ) -> list[tuple[str, bytes]]:
        if count < 1:
            raise ValueError(f"count must be at least 1, not {count}")
        seq = 0 if after is None else parse_memory_id(after)
        bus = self._bus
        deadline = bus.now() + timeout
        while True:
            found = bus.outputs.read(key, seq, count, bus.now())
            left = deadline - bus.now()
            if found or left <= 0:
                await anyio.lowlevel.checkpoint()
                return found
            await bus.wait_changed(left)

    async def delete_output(self, key: str) -> None:
        self._bus.outputs.delete(key)
        await anyio.lowlevel.checkpoint()

    # Traces -------------------------------------------------------------------------------

    async def read_trace(self, run_id: str) -> StoredTrace | None:
        await anyio.lowlevel.checkpoint()
        return self._bus.traces.read(run_id, self._bus.now())

    async def run_of(self, event_id: str) -> str | None:
        await anyio.lowlevel.checkpoint()
        return self._bus.traces.run_of(event_id, self._bus.now())

    async def recent_runs(self, *, since: float, limit: int) -> list[tuple[str, float]]:
        await anyio.lowlevel.checkpoint()
        return self._bus.traces.recent(since, limit, self._bus.now())

    # Keys and values ----------------------------------------------------------------------

    async def set_value(
        self, key: str, value: bytes, ttl: float, *, only_if_absent: bool = False
    ) -> bool:
        await anyio.lowlevel.checkpoint()
        if only_if_absent and self._value(key) is not None:
            return False
        self._bus.values[key] = (self._bus.now() + ttl, value)
        return True

    async def get_value(self, key: str) -> bytes | None:
        await anyio.lowlevel.checkpoint()
        return self._value(key)

    async def delete_value(self, key: str) -> None:
        await anyio.lowlevel.checkpoint()
        self._bus.values.pop(key, None)

    async def replace_value(
        self, key: str, expected: bytes, value: bytes | None, ttl: float
    ) -> bool:
        await anyio.lowlevel.checkpoint()
        if self._value(key) != expected:
            return False
        if value is None:
            self._bus.values.pop(key, None)
        else:
            self._bus.values[key] = (self._bus.now() + ttl, value)
        return True

    async def update_value(
        self,
        key: str,
        update: Callable[[bytes | None], tuple[bytes, float, R]],
        *,
        guess: bytes | None = None,
    ) -> R:
        # One step, with no await between the read and the write: atomic on this bus.
        await anyio.lowlevel.checkpoint()
        new, ttl, answer = update(self._value(key))
        self._bus.values[key] = (self._bus.now() + ttl, new)
        return answer
