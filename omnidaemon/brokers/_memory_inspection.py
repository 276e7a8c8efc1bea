"""What the CLI, the API and the dashboard read of a `memory://` bus (`MemoryBroker`), and
the dead-letter queues they act on."""

from __future__ import annotations

import time
from collections.abc import Callable

import anyio

from omnidaemon.brokers._memory_bus import Bus
from omnidaemon.brokers.base import Broker, ConsumerInfo, GroupInfo, Subscription, TopicInfo

__all__ = ["MemoryInspection"]


class MemoryInspection(Broker):
    """The inspection methods of `MemoryBroker`, on its bus `_bus`."""

    _bus: Bus

    def _value(self, key: str) -> bytes | None:
        expires, value = self._bus.values.get(key, (0.0, b""))
        if expires <= self._bus.now():
            self._bus.values.pop(key, None)
            return None
        return value

    async def replay_dead_letters(
        self, sub: Subscription, select: Callable[[str, bytes], bytes | None]
    ) -> int:
        await anyio.lowlevel.checkpoint()
        topic = self._bus.topics.get(sub.topic)
        group = topic.groups.get(sub.group) if topic else None
        if group is None:
            return 0
        # From here on no await: the records are read and moved in one step of this
        # single-threaded bus, so replays running at once never move a record twice.
        kept: list[tuple[str, bytes]] = []
        moved = 0
        now = self._bus.now()
        for record_id, record in group.dead:
            entry = select(record_id, record)
            if entry is None:
                kept.append((record_id, record))
            else:
                self._bus.schedule(group, now, entry, 1)
                moved += 1
        group.dead = kept
        self._bus.notify()
        return moved

    async def dead_letters(self, sub: Subscription, limit: int) -> list[tuple[str, bytes]]:
        await anyio.lowlevel.checkpoint()
        return self.dead_letters_now(sub)[-limit:] if limit > 0 else []

    def dead_letters_now(self, sub: Subscription) -> list[tuple[str, bytes]]:
        """Every `(record id, record)` in the group's dead-letter queue, oldest first (no
        await needed)."""
        topic = self._bus.topics.get(sub.topic)
        group = topic.groups.get(sub.group) if topic else None
        return list(group.dead) if group else []

    async def server_info(self) -> dict[str, str]:
        await anyio.lowlevel.checkpoint()
        return {"server": "in-process memory bus"}

    async def topics(self) -> list[str]:
        await anyio.lowlevel.checkpoint()
        return sorted(self._bus.topics)

    async def describe(self, topic: str, *, consumers: bool = False) -> TopicInfo | None:
        await anyio.lowlevel.checkpoint()
        bus = self._bus
        state = bus.topics.get(topic)
        if state is None:
            return None
        now, wall = bus.now(), time.time()
        groups = []
        for name, group in sorted(state.groups.items()):
            ages = [max(0.0, wall - p.queued_at) for p in group.pending.values()]
            details = tuple(
                ConsumerInfo(
                    consumer,
                    sum(1 for p in group.pending.values() if p.consumer == consumer),
                    max(0.0, now - seen),
                )
                for consumer, seen in sorted(group.consumers.items())
            )
            groups.append(
                GroupInfo(
                    topic=topic,
                    group=name,
                    consumers=len(group.consumers),
                    pending=len(group.pending),
                    lag=state.next_seq - group.cursor,
                    retries=len(group.scheduled),
                    dead_letters=len(group.dead),
                    oldest_pending_age=max(ages) if ages else None,
                    consumer_details=details if consumers else (),
                )
            )
        delayed_bytes = sum(len(data) for _, _, data in state.delayed)
        return TopicInfo(
            topic, len(state.entries), len(state.delayed), tuple(groups), delayed_bytes
        )

    async def entries(self, topic: str, limit: int) -> list[tuple[str, bytes]]:
        await anyio.lowlevel.checkpoint()
        state = self._bus.topics.get(topic)
        if state is None or limit <= 0:
            return []
        return [(str(seq), data) for seq, data, _ in list(state.entries)[-limit:]]

    async def purge_dead_letters(self, sub: Subscription) -> int:
        await anyio.lowlevel.checkpoint()
        topic = self._bus.topics.get(sub.topic)
        group = topic.groups.get(sub.group) if topic else None
        if group is None:
            return 0
        count, group.dead = len(group.dead), []
        return count

    async def stats(self) -> dict[tuple[str, str], dict[str, int]]:
        await anyio.lowlevel.checkpoint()
        return {key: dict(fields) for key, fields in self._bus.stats.items()}

    async def scan_values(self, prefix: str) -> dict[str, bytes]:
        await anyio.lowlevel.checkpoint()
        found = {}
        for key in [k for k in self._bus.values if k.startswith(prefix)]:
            value = self._value(key)
            if value is not None:
                found[key] = value
        return found
