"""The trace store on Redis (`Broker.ack(..., trace=)` and its readers).

- `omni:trace:<run id>`: a hash of the run's records by field, plus `!dropped` (records the
  per-run bound refused), expiring `ttl` after the run's last write.
- `omni:trace-of:<event id>`: the run of an event that is not its run's first.
- `omni:runs`: the index of runs, a stream with one entry per written batch (field `r`, the
  batch's run ids as netstrings, field `t`, the writer's time), trimmed by every write of the
  entries older than the TTL (`MINID`): one command per batch however many runs it wrote.

Every event writes its records, so the write is built for the worker's cost, measured by the
benchmark (`--cases traces`). On one server a batch is one command, in the ack's round trip:
the `_BATCH` script, given the batch as one JSON document (`orjson` encodes it in one call),
writes every record, pointer and the index entry, and checks the per-run bound exactly. A
command (and a reply) per record cost the worker more than everything else traces do: the
server's extra work (a script decoding JSON: about 5 µs a record more than plain commands)
runs on the server's CPU, not the worker's. On a cluster a run's keys may be on any node, and
a script may touch only its own node's slots: there `trace_commands` are plain commands (a
run's records are `HSET` and `PEXPIRE` while this process has written at most `_UNCHECKED` to
it, the `_WRITE` script beyond), sent to each node at once beside the ack (`by_node`); a run
holds at most `max_records` plus up to `_UNCHECKED` from each process that writes to it.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Sequence
from typing import Any

import orjson
from redis.asyncio.cluster import ClusterNode

from omnidaemon.brokers.redis._connection import _SOCKET_TIMEOUT
from omnidaemon.brokers.redis._keys import _decode, _field
from omnidaemon.brokers.redis._routing import RedisRouting
from omnidaemon.brokers.traces import StoredTrace, TraceWrite

__all__ = ["RedisTraces"]

_DROPPED = b"!dropped"
_UNCHECKED = 32  # on a cluster: records a process writes to a run before the bound is checked
_RUNS_REMEMBERED = 4096  # runs whose record counts a process keeps (least recent forgotten)
_SCAN_BATCH = 200  # index entries read at a time by `recent_runs`

# KEYS[1] the run's hash. ARGV[1] the TTL in ms, ARGV[2] the most fields a run keeps; then its
# fields and records. A field already stored is always replaced (an attempt's end its start).
_WRITE = """
local ttl, max = ARGV[1], tonumber(ARGV[2])
local key = KEYS[1]
local size = redis.call('HLEN', key)
for i = 3, #ARGV, 2 do
    local field, record = ARGV[i], ARGV[i + 1]
    if size < max or redis.call('HEXISTS', key, field) == 1 then
        size = size + redis.call('HSET', key, field, record)
    else
        redis.call('HINCRBY', key, '!dropped', 1)
    end
end
redis.call('PEXPIRE', key, ttl)
return 0
"""


# KEYS[1] the index of runs. ARGV[1] the TTL in ms, ARGV[2] the most fields a run keeps,
# ARGV[3] the prefix of a run's key, ARGV[4] of an event's pointer, ARGV[5] the oldest index
# entry kept (ms), ARGV[6] the writer's time, ARGV[7] the batch as JSON:
# [[[run, field, record], ...], [[event, run], ...]], a record an array, stored as its JSON
# text. `sizes` counts each run's fields (HLEN once a batch per run).
_BATCH = """
local ttl, max = ARGV[1], tonumber(ARGV[2])
local batch = cjson.decode(ARGV[7])
local sizes, listed = {}, {}
for _, item in ipairs(batch[1]) do
    local run, field = item[1], item[2]
    local key = ARGV[3] .. run
    local size = sizes[run]
    local first = size == nil
    if first then
        size = redis.call('HLEN', key)
        listed[#listed + 1] = #run .. ':' .. run
    end
    if size < max or redis.call('HEXISTS', key, field) == 1 then
        size = size + redis.call('HSET', key, field, cjson.encode(item[3]))
    else
        redis.call('HINCRBY', key, '!dropped', 1)
    end
    if first then
        redis.call('PEXPIRE', key, ttl)
    end
    sizes[run] = size
end
for _, pointer in ipairs(batch[2]) do
    redis.call('SET', ARGV[4] .. pointer[1], pointer[2], 'PX', ttl)
end
if #listed > 0 then
    redis.call('XADD', KEYS[1], 'MINID', '~', ARGV[5], '*', 'r', table.concat(listed), 't', ARGV[6])
end
return #listed
"""
_BATCH_SHA = hashlib.sha1(_BATCH.encode()).hexdigest()


def _netstrings(items: Sequence[str]) -> bytes:
    """`items` as netstrings (`<length>:<bytes>`), one after another."""
    return b"".join(b"%d:%b" % (len(data), data) for data in (item.encode() for item in items))


def _parse_netstrings(data: bytes) -> list[str]:
    items, pos = [], 0
    while pos < len(data):
        colon = data.index(b":", pos)
        size = int(data[pos:colon])
        items.append(data[colon + 1 : colon + 1 + size].decode())
        pos = colon + 1 + size
    return items


class RedisTraces(RedisRouting):
    """The trace commands of `RedisBroker`."""

    _trace_counts: dict[str, int] | None = None  # run -> records this process wrote, by recency

    def trace_commands(self, write: TraceWrite) -> list[tuple[str, tuple[Any, ...]]]:
        """The commands that store `write`, each with a key that routes it (a cluster's
        path; one server sends `batch_command` instead)."""
        ttl = str(max(1, math.ceil(write.ttl * 1000))).encode()
        commands: list[tuple[str, tuple[Any, ...]]] = []
        runs = write.by_run()  # encoded here, one record at a time
        for run_id, fields in runs.items():
            key = self.trace_key(run_id)
            flat = [item for pair in fields.items() for item in pair]
            if self._unchecked(run_id, len(fields)):
                commands.append((key, ("HSET", key, *flat)))
                commands.append((key, ("PEXPIRE", key, ttl)))
            else:
                commands.append((key, ("EVAL", _WRITE, 1, key, ttl, write.max_records, *flat)))
        for event_id, run_id in write.pointers:
            key = self.trace_pointer_key(event_id)
            commands.append((key, ("SET", key, run_id, "PX", ttl)))
        if runs:
            index = self.runs_key()
            oldest_ms = max(0, int((write.now - write.ttl) * 1000))
            listed, now = _netstrings(list(runs)), repr(float(write.now))
            entry = ("XADD", index, "MINID", "~", oldest_ms, "*", "r", listed, "t", now)
            commands.append((index, entry))
        return commands

    def batch_command(self, write: TraceWrite, *, loaded: bool = True) -> tuple[Any, ...]:
        """The write for one server as one command: `EVALSHA` of the `_BATCH` script (`EVAL`
        with its text when not `loaded`, after the server answered NOSCRIPT).

        The batch is one JSON document, encoded in one call (nothing is done a record at a
        time here): the script decodes it and stores each record's array as cjson encodes it
        (numbers to 14 significant digits)."""
        ttl = max(1, math.ceil(write.ttl * 1000))
        batch = orjson.dumps((write.records, write.pointers))
        oldest_ms = max(0, int((write.now - write.ttl) * 1000))
        script = ("EVALSHA", _BATCH_SHA) if loaded else ("EVAL", _BATCH)
        return (
            *script,
            1,
            self.runs_key(),
            ttl,
            write.max_records,
            self.trace_key(""),  # the prefixes of the keys the script writes
            self.trace_pointer_key(""),
            oldest_ms,
            repr(float(write.now)),
            batch,
        )

    def _unchecked(self, run_id: str, records: int) -> bool:
        """Whether `records` more for `run_id` may be written without checking the bound:
        while this process has written at most `_UNCHECKED` to it (counted here, for the
        `_RUNS_REMEMBERED` runs written most recently)."""
        counts = self._trace_counts
        if counts is None:
            counts = self._trace_counts = {}
        total = counts.pop(run_id, 0) + records  # put back last: the least recent come first
        counts[run_id] = total
        if len(counts) > _RUNS_REMEMBERED:
            for forgotten in list(itertools.islice(counts, len(counts) - _RUNS_REMEMBERED // 2)):
                del counts[forgotten]
        return total <= _UNCHECKED

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
        # Entries are in the server's time order; each carries its writer's time, which is
        # what `since` and the result are in. A minute of slack covers clocks that disagree.
        start = f"{max(0, int((since - 60) * 1000))}-0"
        end = "+"
        found: dict[str, float] = {}
        while len(found) < limit:
            args = ("XREVRANGE", key, end, start, "COUNT", _SCAN_BATCH)
            entries = await self._direct(args, key=key, timeout=_SOCKET_TIMEOUT)
            for _, flat in entries:
                written = float(_field(flat, b"t") or 0)
                if written >= since:
                    for run_id in _parse_netstrings(_field(flat, b"r")):
                        found.setdefault(run_id, written)
            if len(entries) < _SCAN_BATCH:
                break
            end = f"({_decode(entries[-1][0])}"
        ranked = sorted(found.items(), key=lambda item: item[1], reverse=True)
        return ranked[:limit]
