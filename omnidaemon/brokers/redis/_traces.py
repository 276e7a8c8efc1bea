"""The trace store on Redis (`Broker.ack(..., trace=)` and its readers).

- `omni:trace:<run id>`: a hash of the run's records by field, plus `!dropped` (records the
  per-run bound refused), expiring `ttl` after the run's last write.
- `omni:trace-of:<event id>`: the run of an event that is not its run's first.
- `omni:runs`: a sorted set of run ids by the wall-clock time of their last write, trimmed of
  runs older than `ttl` by every write.

Writes go in the ack's pipeline: on one server one script for every record and pointer of
the batch, passed as two arguments (packing an argument per record cost the worker more than
the rest of the trace); on a cluster, where a script's keys must be declared and share a
slot, one script per run and a command per pointer, sent to each node at once (`by_node`).
The index is trimmed of runs older than the TTL once a second per process.
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


_TRIM_EVERY = 1.0  # seconds between trims of the index of runs by one process

# One server: every record and pointer of an ack batch in two arguments of netstrings
# (`<length>:<bytes>`), read by the script; the keys are made from the prefix, as
# `RedisKeys` makes them (a cluster, where a script must declare its keys, uses `_WRITE`).
# ARGV: prefix, TTL ms, most fields a run keeps, index score, trim below ('' for none),
# records (run, field, record, ...), pointers (event, run, ...).
_WRITE_BATCH = """
local prefix, ttl, max, now = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local function reader(blob)
    local pos = 1
    return function()
        if pos > #blob then return nil end
        local colon = string.find(blob, ':', pos, true)
        local n = tonumber(string.sub(blob, pos, colon - 1))
        local item = string.sub(blob, colon + 1, colon + n)
        pos = colon + n + 1
        return item
    end
end
local index = prefix .. ':runs'
local sizes = {}
local item = reader(ARGV[6])
while true do
    local run = item()
    if run == nil then break end
    local field, record = item(), item()
    local key = prefix .. ':trace:' .. run
    local size = sizes[run]
    if size == nil then
        size = redis.call('HLEN', key)
        redis.call('ZADD', index, now, run)
    end
    if size < max or redis.call('HEXISTS', key, field) == 1 then
        size = size + redis.call('HSET', key, field, record)
    else
        redis.call('HINCRBY', key, '!dropped', 1)
    end
    sizes[run] = size
end
for run in pairs(sizes) do
    redis.call('PEXPIRE', prefix .. ':trace:' .. run, ttl)
end
item = reader(ARGV[7])
while true do
    local event = item()
    if event == nil then break end
    redis.call('SET', prefix .. ':trace-of:' .. event, item(), 'PX', ttl)
end
if ARGV[5] ~= '' then
    redis.call('ZREMRANGEBYSCORE', index, '-inf', '(' .. ARGV[5])
end
return 0
"""


class RedisTraces(RedisRouting):
    """The trace commands of `RedisBroker`."""

    _trace_trimmed_at = 0.0  # when this process last trimmed the index of runs (wall clock)

    def trace_commands(self, write: TraceWrite) -> list[tuple[str, tuple[Any, ...]]]:
        """The commands that store `write`, each with a key that routes it: on one server a
        single script for the whole batch; on a cluster one script per run, a `SET` per
        pointer and the index's update."""
        ttl_ms = max(1, math.ceil(write.ttl * 1000))
        index = self.runs_key()
        now = f"{write.now:.6f}"
        trim = ""
        if write.now - self._trace_trimmed_at >= _TRIM_EVERY:
            # Old runs leave the index once a second, not with every batch.
            self._trace_trimmed_at = write.now
            trim = f"{write.now - write.ttl:.6f}"
        if self._cluster is None:
            args = (self._prefix, ttl_ms, write.max_records, now, trim)
            blob = b"".join(
                b"%d:%b%d:%b%d:%b" % (len(r), r, len(f), f, len(record), record)
                for r, f, record in (
                    (run.encode(), name.encode(), record) for run, name, record in write.records
                )
            )
            pointers = b"".join(
                b"%d:%b%d:%b" % (len(e), e, len(r), r)
                for e, r in ((e.encode(), r.encode()) for e, r in write.pointers)
            )
            return [(index, ("EVAL", _WRITE_BATCH, 0, *args, blob, pointers))]
        commands: list[tuple[str, tuple[Any, ...]]] = []
        runs = write.by_run()
        for run_id, fields in runs.items():
            key = self.trace_key(run_id)
            flat: list[Any] = [len(fields)]
            for name, record in fields.items():
                flat += (name, record)
            commands.append((key, ("EVAL", _WRITE, 1, key, ttl_ms, write.max_records, 1, *flat)))
        for event_id, run_id in write.pointers:
            key = self.trace_pointer_key(event_id)
            commands.append((key, ("SET", key, run_id, "PX", ttl_ms)))
        if runs:
            update: tuple[Any, ...] = ("ZADD", index)
            for run_id in runs:
                update += (now, run_id)
            commands.append((index, update))
        if trim:
            commands.append((index, ("ZREMRANGEBYSCORE", index, "-inf", f"({trim}")))
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
