"""The trace store on Redis (`Broker.ack(..., trace=)` and its readers).

- `omni:trace:<run id>`: a hash of the run's records by field, plus `!dropped` (records the
  per-run bound refused), expiring `ttl` after the run's last write.
- `omni:trace-of:<event id>`: the run of an event that is not its run's first.
- `omni:runs`: a sorted set of run ids by the wall-clock time of their last write, trimmed of
  runs older than `ttl` by every write.

Writes go in the ack's pipeline (one script for every run and pointer of the batch, on one
server); on a cluster, where a script's keys must share a slot, one script per key, sent to
each node at once (`trace_commands_by_node`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from redis.asyncio.cluster import ClusterNode

from omnidaemon.brokers.redis._connection import _SOCKET_TIMEOUT
from omnidaemon.brokers.redis._keys import _decode
from omnidaemon.brokers.redis._routing import RedisRouting
from omnidaemon.brokers.traces import StoredTrace, TraceWrite

__all__ = ["RedisTraces"]

_DROPPED = b"!dropped"

# KEYS: the runs' hashes, then the pointers' keys. ARGV[1] the TTL in ms, ARGV[2] the most
# fields a run keeps, ARGV[3] how many KEYS are runs; then per run its field count and its
# fields and records, then per pointer its run id.
_WRITE = """
local ttl, max, runs = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local i = 4
for r = 1, runs do
    local key, count = KEYS[r], tonumber(ARGV[i])
    local size = redis.call('HLEN', key)
    i = i + 1
    for _ = 1, count do
        local field, record = ARGV[i], ARGV[i + 1]
        i = i + 2
        if size < max or redis.call('HEXISTS', key, field) == 1 then
            size = size + redis.call('HSET', key, field, record)
        else
            redis.call('HINCRBY', key, '!dropped', 1)
        end
    end
    redis.call('PEXPIRE', key, ttl)
end
for p = runs + 1, #KEYS do
    redis.call('SET', KEYS[p], ARGV[i], 'PX', ttl)
    i = i + 1
end
return 0
"""


class RedisTraces(RedisRouting):
    """The trace commands of `RedisBroker`."""

    def trace_commands(self, write: TraceWrite) -> list[tuple[str, tuple[Any, ...]]]:
        """The commands that store `write`, each with a key that routes it: on one server a
        single script and the index's update; on a cluster a script per key."""
        ttl_ms = max(1, math.ceil(write.ttl * 1000))
        runs = list(write.records.items())
        pointers = list(write.pointers.items())
        index = self.runs_key()
        now = f"{write.now:.6f}"
        update_index: tuple[Any, ...] = ("ZADD", index)
        for run_id, _ in runs:
            update_index += (now, run_id)
        trim = ("ZREMRANGEBYSCORE", index, "-inf", f"({write.now - write.ttl:.6f}")
        commands: list[tuple[str, tuple[Any, ...]]] = []
        if self._cluster is None:
            keys = [self.trace_key(r) for r, _ in runs] + [
                self.trace_pointer_key(e) for e, _ in pointers
            ]
            args: list[Any] = [ttl_ms, write.max_records, len(runs)]
            for _, fields in runs:
                args.append(len(fields))
                for name, record in fields.items():
                    args += (name, record)
            args += [run_id for _, run_id in pointers]
            if keys:
                commands.append((keys[0], ("EVAL", _WRITE, len(keys), *keys, *args)))
        else:
            for run_id, fields in runs:
                key = self.trace_key(run_id)
                flat: list[Any] = [len(fields)]
                for name, record in fields.items():
                    flat += (name, record)
                commands.append(
                    (key, ("EVAL", _WRITE, 1, key, ttl_ms, write.max_records, 1, *flat))
                )
            for event_id, run_id in pointers:
                key = self.trace_pointer_key(event_id)
                commands.append((key, ("SET", key, run_id, "PX", ttl_ms)))
        if runs:
            commands += [(index, update_index), (index, trim)]
        return commands

    def by_node(
        self, commands: Sequence[tuple[str, tuple[Any, ...]]]
    ) -> list[tuple[str, list[tuple[Any, ...]]]]:
        """`commands` grouped by the cluster node that holds their keys, each group with a
        key that routes it there."""
        groups: dict[ClusterNode | None, tuple[str, list[tuple[Any, ...]]]] = {}
        for key, command in commands:
            node = self._node_of(key)
            groups.setdefault(node, (key, []))[1].append(command)
        return list(groups.values())

    async def read_trace(self, run_id: str) -> StoredTrace | None:
        key = self.trace_key(run_id)
        reply = await self._direct(("HGETALL", key), key=key, timeout=_SOCKET_TIMEOUT)
        if isinstance(reply, dict):
            fields = dict(reply)
        else:
            fields = dict(zip(reply[::2], reply[1::2], strict=True))
        if not fields:
            return None
        dropped = int(fields.pop(_DROPPED, b"0"))
        return StoredTrace({_decode(name): value for name, value in fields.items()}, dropped)

    async def run_of(self, event_id: str) -> str | None:
        key = self.trace_pointer_key(event_id)
        reply = await self._direct(("GET", key), key=key, timeout=_SOCKET_TIMEOUT)
        return None if reply is None else _decode(reply)

    async def recent_runs(self, *, since: float, limit: int) -> list[tuple[str, float]]:
        if limit < 1:
            return []
        key = self.runs_key()
        args = ("ZREVRANGEBYSCORE", key, "+inf", f"{since:.6f}", "WITHSCORES", "LIMIT", 0, limit)
        reply = await self._direct(args, key=key, timeout=_SOCKET_TIMEOUT)
        if reply and isinstance(reply[0], list):  # RESP3: [[member, score], ...]
            return [(_decode(member), float(score)) for member, score in reply]
        return [
            (_decode(member), float(score))
            for member, score in zip(reply[::2], reply[1::2], strict=True)
        ]
