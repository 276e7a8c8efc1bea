"""Inspecting and managing the Redis broker's data: topics, groups and their backlogs, stats,
dead letters, purges, topic expiry and deletion, stored results and values."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from redis.exceptions import ResponseError

from omnidaemon.brokers.base import Subscription
from omnidaemon.brokers.inspection import ConsumerInfo, GroupInfo, NodeInfo, TopicInfo
from omnidaemon.brokers.redis._cluster import cluster_server_info, describe_nodes
from omnidaemon.brokers.redis._connection import _SOCKET_TIMEOUT, release_connection
from omnidaemon.brokers.redis._keys import _decode, _escape_glob
from omnidaemon.brokers.redis._routing import RedisRouting

__all__ = ["RedisInspection"]


class RedisInspection(RedisRouting):
    """The inspection and management commands of `RedisBroker`."""

    async def _topic_keys(self, topic: str) -> list[str]:
        """The names of every key `topic` may hold (existing or not): its stream and delayed
        set, and per group its retry stream, due set, dead letters and metrics.

        The groups are those the stream lists, plus those this broker reads (in case the
        stream is already gone). Named, not searched for: a SCAN would walk the whole keyspace,
        and App.request deletes a topic per request.
        """
        stream = self.stream_key(topic)
        try:
            groups: Any = await self.client.xinfo_groups(stream)
        except ResponseError:  # no stream (never made, deleted or expired): no groups on it
            groups = []
        names = {_decode(group["name"]) for group in groups}
        names.update(sub.group for sub in self._retry_state if sub.topic == topic)
        keys = [stream, self.delayed_key(topic)]
        for name in sorted(names):
            sub = Subscription(topic, name)
            keys += [self.retry_key(sub), self.due_key(sub), self.dlq_key(sub)]
            keys.append(self.metrics_key(sub))
        return keys

    async def purge_backlog(self, topic: str) -> int:
        stream = self.stream_key(topic)
        try:
            groups: Any = await self.client.xinfo_groups(stream)
        except ResponseError:  # no stream: nothing but delayed events, if anything
            groups = []
        names = sorted(_decode(group["name"]) for group in groups)
        keys = [stream, self.delayed_key(topic)]
        for name in names:
            sub = Subscription(topic, name)
            keys += [self.retry_key(sub), self.due_key(sub)]
            # What this broker remembers of the group's next due retry is void now.
            self._retry_state.pop(sub, None)
        removed = await self._script("PURGE_BACKLOG", keys=keys, args=names)
        return int(removed)

    async def expire_topic(self, topic: str, ttl: float) -> None:
        ttl_ms = max(1, math.ceil(ttl * 1000))
        keys = await self._topic_keys(topic)
        async with self.client.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.pexpire(key, ttl_ms)  # a key that does not exist is left alone
            await pipe.execute()

    async def delete_topic(self, topic: str) -> None:
        # What this broker kept for the topic's consumers goes first, and whatever the DELETE
        # does: a process that makes a topic per request (request-reply) would otherwise keep
        # a connection per request, and with the pool exhausted the DELETE itself fails.
        for sub in [sub for sub in self._retry_state if sub.topic == topic]:
            del self._retry_state[sub]
        owners = [
            owner
            for owner in self._readers
            if isinstance(owner, tuple)
            and isinstance(owner[0], Subscription)
            and owner[0].topic == topic
        ]
        for owner in owners:
            self._reader_ids.pop(owner, None)
            self._interrupted.discard(owner)
            conn, node = self._readers.pop(owner)
            await release_connection(self.client, conn, node)
        await self.client.delete(*await self._topic_keys(topic))

    # Results ------------------------------------------------------------------------------

    async def put_result(self, event_id: str, agent: str, record: bytes, ttl: float) -> None:
        key = self.result_key(event_id)
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.hset(key, agent, record)
            pipe.pexpire(key, max(1, int(ttl * 1000)))
            await pipe.execute()

    async def get_results(self, event_id: str) -> dict[str, bytes]:
        records: Any = await self.client.hgetall(self.result_key(event_id))
        return {_decode(agent): record for agent, record in records.items()}

    # Keys and values ----------------------------------------------------------------------

    async def set_value(
        self, key: str, value: bytes, ttl: float, *, only_if_absent: bool = False
    ) -> bool:
        stored = await self.client.set(
            self.value_key(key), value, px=max(1, int(ttl * 1000)), nx=only_if_absent
        )
        return bool(stored)

    async def get_value(self, key: str) -> bytes | None:
        value: Any = await self.client.get(self.value_key(key))
        return bytes(value) if value is not None else None

    async def delete_value(self, key: str) -> None:
        await self.client.delete(self.value_key(key))

    async def replace_value(
        self, key: str, expected: bytes, value: bytes | None, ttl: float
    ) -> bool:
        done = await self._script(
            "REPLACE_VALUE",
            keys=[self.value_key(key)],
            args=[expected, value if value is not None else b"", max(1, int(ttl * 1000))],
        )
        return bool(done)

    # Inspection ---------------------------------------------------------------------------

    async def replay_dead_letters(
        self, sub: Subscription, select: Callable[[str, bytes], bytes | None]
    ) -> int:
        moved = 0
        cursor = "-"
        while True:
            page: Any = await self.client.xrange(self.dlq_key(sub), min=cursor, count=100)
            for entry_id, fields in page:
                entry = select(_decode(entry_id), fields.get(b"r", b""))
                if entry is None:
                    continue
                # Out of the dead-letter stream and into the group's retry stream (read by this
                # group alone) as attempt 1, in one script that moves the record only if it is
                # still there: replays running at once all see it, exactly one moves it.
                if await self._script(
                    "REPLAY", keys=[self.dlq_key(sub), self.retry_key(sub)], args=[entry_id, entry]
                ):
                    moved += 1
            if len(page) < 100:
                return moved
            cursor = "(" + _decode(page[-1][0])

    async def dead_letters(self, sub: Subscription, limit: int) -> list[tuple[str, bytes]]:
        if limit <= 0:
            return []
        entries: Any = await self.client.xrevrange(self.dlq_key(sub), count=limit)
        return [(_decode(i), fields.get(b"r", b"")) for i, fields in reversed(entries)]

    async def ping(self) -> None:
        if not self._mode_known:  # the bus did not answer at connect: ask now what it is
            await self._learn_mode()
        await self.client.ping()

    async def nodes(self) -> list[NodeInfo]:
        if self._cluster is None:
            return []
        streams = [self.stream_key(topic) for topic in await self.topics()]
        return await describe_nodes(self._cluster, streams)

    async def server_info(self) -> dict[str, str]:
        if self._cluster is not None:
            return await cluster_server_info(self._cluster)
        info: Any = await self.client.info()
        kind = "valkey" if "valkey_version" in info else "redis"
        return {
            "server": f"{kind} {info.get(f'{kind}_version', '?')}",
            "used_memory": str(info.get("used_memory_human", "?")),
            "uptime_seconds": str(info.get("uptime_in_seconds", "?")),
            "connected_clients": str(info.get("connected_clients", "?")),
        }

    async def topics(self) -> list[str]:
        head = f"{self._prefix}:{{"
        names = set()
        # A topic's stream, or its delayed set alone (delayed events published before any
        # agent subscribed: no stream exists yet).
        for tail in ("}:stream", "}:delayed"):
            async for key in self.client.scan_iter(match=f"{head}*{tail}", count=1000):
                name = _decode(key)
                if name.startswith(head) and name.endswith(tail):
                    names.add(name[len(head) : -len(tail)])
        return sorted(names)

    async def describe(self, topic: str, *, consumers: bool = False) -> TopicInfo | None:
        client = self.client
        stream = self.stream_key(topic)
        async with client.pipeline(transaction=False) as pipe:
            pipe.exists(stream)
            pipe.xlen(stream)
            pipe.zcard(self.delayed_key(topic))
            pipe.xinfo_groups(stream)
            # Sampled (the server's default), so it costs the same for any number of entries.
            pipe.memory_usage(self.delayed_key(topic))
            replies = await pipe.execute(raise_on_error=False)
        exists, length, delayed, groups, used = replies
        # None: no delayed set; an error: MEMORY disabled (some hosted servers), so unknown.
        delayed_bytes = None if isinstance(used, Exception) else int(used or 0)
        if not exists:
            # Only delayed events (no stream yet), or no such topic at all.
            return TopicInfo(topic, 0, int(delayed), (), delayed_bytes) if int(delayed) else None
        if isinstance(groups, Exception):
            return None
        # The clock of the server that holds the topic (a cluster pipeline takes no TIME).
        now = await self._direct(("TIME",), key=stream, timeout=_SOCKET_TIMEOUT)
        now_ms = int(now[0]) * 1000 + int(now[1]) // 1000
        infos = []
        for group in groups:
            name = _decode(group["name"])
            sub = Subscription(topic, name)
            retry = self.retry_key(sub)
            async with client.pipeline(transaction=False) as pipe:
                pipe.xinfo_groups(retry)
                pipe.zcard(self.due_key(sub))
                pipe.xlen(self.dlq_key(sub))
                pipe.xpending(stream, name)
                pipe.xpending(retry, name)
                # The first entry after the group's last delivered one: none means nothing is
                # left to read, whatever `lag` says (see below).
                last = _decode(group.get("last-delivered-id") or b"0-0")
                pipe.xrange(stream, min=f"({last}", count=1)
                if consumers:
                    pipe.xinfo_consumers(stream, name)
                    pipe.xinfo_consumers(retry, name)
                replies = await pipe.execute(raise_on_error=False)
            retry_groups, due, dead, pending, retry_pending, after_last = replies[:6]
            retry_group = next(
                (
                    g
                    for g in ([] if isinstance(retry_groups, Exception) else retry_groups)
                    if _decode(g["name"]) == name
                ),
                None,
            )
            pending_count = int(group["pending"])
            waiting_retries = 0 if isinstance(due, Exception) else int(due)
            if retry_group is not None:
                pending_count += int(retry_group["pending"])
                waiting_retries += int(retry_group.get("lag") or 0)
            oldest = None
            for summary in (pending, retry_pending):
                if not isinstance(summary, Exception) and summary["pending"]:
                    first_ms = int(_decode(summary["min"]).split("-")[0])
                    age = max(0.0, (now_ms - first_ms) / 1000)
                    oldest = age if oldest is None else max(oldest, age)
            details: tuple[ConsumerInfo, ...] = ()
            if consumers:
                merged: dict[str, tuple[int, float]] = {}
                for listing in replies[6:8]:
                    for c in [] if isinstance(listing, Exception) else listing:
                        cname, held = _decode(c["name"]), int(c["pending"])
                        idle = int(c["idle"]) / 1000
                        before = merged.get(cname)
                        merged[cname] = (
                            (held, idle)
                            if before is None
                            else (before[0] + held, min(idle, before[1]))
                        )
                details = tuple(
                    ConsumerInfo(cname, held, idle)
                    for cname, (held, idle) in sorted(merged.items())
                )
            lag = group.get("lag")
            if after_last == [] and lag:
                # Redis 7.0 derives lag from a group's entries-read counter, which a replica
                # does not keep: after a failover it counts entries read before it as unread,
                # for good (the chaos suite saw `lag` 85 with nothing to read).
                lag = 0
            infos.append(
                GroupInfo(
                    topic=topic,
                    group=name,
                    consumers=int(group["consumers"]),
                    pending=pending_count,
                    lag=None if lag is None else int(lag),
                    retries=waiting_retries,
                    dead_letters=0 if isinstance(dead, Exception) else int(dead),
                    oldest_pending_age=oldest,
                    consumer_details=details,
                )
            )
        infos.sort(key=lambda g: g.group)
        return TopicInfo(topic, int(length), int(delayed), tuple(infos), delayed_bytes)

    async def entries(self, topic: str, limit: int) -> list[tuple[str, bytes]]:
        if limit <= 0:
            return []
        found: Any = await self.client.xrevrange(self.stream_key(topic), count=limit)
        return [(_decode(i), fields.get(b"e", b"")) for i, fields in reversed(found)]

    async def purge_dead_letters(self, sub: Subscription) -> int:
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.xlen(self.dlq_key(sub))
            pipe.delete(self.dlq_key(sub))
            count, _ = await pipe.execute()
        return int(count)

    async def stats(self) -> dict[tuple[str, str], dict[str, int]]:
        head, middle = f"{self._prefix}:{{", "}:metrics:"
        keys = [
            _decode(key)
            async for key in self.client.scan_iter(match=f"{head}*{middle}*", count=1000)
        ]
        found: dict[tuple[str, str], dict[str, int]] = {}
        if not keys:
            return found
        async with self.client.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.hgetall(key)
            hashes = await pipe.execute()
        for key, fields in zip(keys, hashes, strict=True):
            topic, sep, group = key[len(head) :].partition(middle)
            if sep and fields:
                found[(topic, group)] = {_decode(k): int(v) for k, v in fields.items()}
        return found

    async def scan_values(self, prefix: str) -> dict[str, bytes]:
        head = f"{self._prefix}:value:"
        keys = [
            key
            async for key in self.client.scan_iter(
                match=f"{head}{_escape_glob(prefix)}*", count=1000
            )
        ]
        if not keys:
            return {}
        # Keys of many slots: on a cluster, one MGET per node (not atomic, and need not be).
        client = self.client
        values: Any = await (client.mget_nonatomic(keys) if self.is_cluster else client.mget(keys))
        return {
            _decode(key)[len(head) :]: bytes(value)
            for key, value in zip(keys, values, strict=True)
            if value is not None
        }
