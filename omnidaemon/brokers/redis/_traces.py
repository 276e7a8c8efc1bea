"""The trace store on Redis (`Broker.ack(..., trace=)` and its readers).

- `omni:trace:<run id>`: a hash of the run's records by field, plus `!dropped` (records the
  per-run bound refused), expiring `ttl` after the run's last write.
- `omni:trace-of:<event id>`: the run of an event that is not its run's first.
- `omni:runs`: the index of runs, a stream with one entry per written batch (field `r`, the
  batch's run ids as netstrings, field `t`, the writer's time), trimmed by every write of the
  entries older than the TTL (`MINID`): one command per batch however many runs it wrote.

Every event writes its records, so the write is built for cost, measured by the benchmark
(`--cases traces`): on one server the commands go in the ack's round trip, packed here in one
pass (redis-py's packer, one Python call per argument, cost the worker more than the rest of
the trace). A run's records are a plain `HSET` and `PEXPIRE` while this process has written
at most `_UNCHECKED` records to it, and a script that checks the per-run bound beyond: a Lua
script per run cost the server over 20 µs a record, more than the rest of the event. So a run
holds at most `max_records`, plus up to `_UNCHECKED` from each process that writes to it.
On a cluster the same commands are sent to each node at once, beside the ack (`by_node`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

from redis.asyncio.cluster import ClusterNode

from omnidaemon.brokers.redis._connection import _SOCKET_TIMEOUT
from omnidaemon.brokers.redis._keys import _decode, _field
from omnidaemon.brokers.redis._routing import RedisRouting
from omnidaemon.brokers.traces import StoredTrace, TraceWrite

__all__ = ["RedisTraces"]

_DROPPED = b"!dropped"
_UNCHECKED = 32  # records a process writes to one run before the bound is checked on write
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


_WRITE_BYTES = _WRITE.encode()


def _packed(args: Sequence[bytes]) -> bytes:
    """One command in the protocol."""
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%b\r\n" % (len(a), a) for a in args)


def _netstring(item: bytes) -> bytes:
    """`item` as `<length>:<bytes>`."""
    return b"%d:%b" % (len(item), item)


def _netstrings(items: Sequence[str]) -> bytes:
    """`items` as netstrings, one after another."""
    return b"".join(_netstring(item.encode()) for item in items)


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
        path; one server sends `packed_trace` instead)."""
        ttl = str(max(1, math.ceil(write.ttl * 1000))).encode()
        commands: list[tuple[str, tuple[Any, ...]]] = []
        runs = write.by_run()
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
            commands.append((index, self._index_command(write, _netstrings(list(runs)))))
        return commands

    def packed_trace(self, write: TraceWrite) -> tuple[bytes, int]:
        """The write for one server as plain commands in the protocol, packed here in one
        pass: `(bytes, how many replies they get)`.

        For each record `HSET` (and `PEXPIRE` once per run), each pointer `SET ... PX`, and
        one `XADD` to the index; a run past its unchecked records gets the `_WRITE` script
        instead. Plain commands cost the server under half what one script doing the same
        did (measured: about 4 against 10 µs a record; a script's every `redis.call` has a
        price), and the server's time is what the worker's next fetch waits behind.
        """
        ttl = b"%d" % max(1, math.ceil(write.ttl * 1000))
        ttl_part = b"$%d\r\n%b\r\n" % (len(ttl), ttl)
        trace_prefix = f"{self._prefix}:trace:".encode()
        counts = self._record_counts()
        parts: list[bytes] = []
        listed: list[bytes] = []  # the index entry's runs, as netstrings
        runs: dict[str, bytes] = {}  # run -> its key, in the order first written
        checked: dict[str, list[bytes]] = {}
        replies = 0
        # A record at a time, in order (a later record of a field replaces an earlier one):
        # one format per record, on every event's path. A run's first record carries its
        # PEXPIRE in the same format (after the HSET that makes the key: a later HSET keeps
        # the TTL).
        for run_id, name, record in write.records:
            field = name.encode()
            # `_unchecked`, inline: this loop runs once per event.
            written = counts[run_id] = counts.pop(run_id, 0) + 1
            key = runs.get(run_id)
            if key is None:
                run = run_id.encode()
                key = runs[run_id] = trace_prefix + run
                listed.append(_netstring(run))
                if written <= _UNCHECKED:
                    parts.append(
                        b"*4\r\n$4\r\nHSET\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n"
                        b"*3\r\n$7\r\nPEXPIRE\r\n$%d\r\n%b\r\n%b"
                        % (
                            len(key),
                            key,
                            len(field),
                            field,
                            len(record),
                            record,
                            len(key),
                            key,
                            ttl_part,
                        )
                    )
                    replies += 2
                    continue
            elif written <= _UNCHECKED and run_id not in checked:
                parts.append(
                    b"*4\r\n$4\r\nHSET\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n"
                    % (len(key), key, len(field), field, len(record), record)
                )
                replies += 1
                continue
            checked.setdefault(run_id, []).extend((field, record))
        self._forget_runs()
        for run_id, fields in checked.items():
            args = [b"EVAL", _WRITE_BYTES, b"1", runs[run_id], ttl, b"%d" % write.max_records]
            parts.append(_packed(args + fields))
        replies += len(checked)
        pointer_prefix = f"{self._prefix}:trace-of:".encode()
        for event_id, run_id in write.pointers:
            key, run = pointer_prefix + event_id.encode(), run_id.encode()
            parts.append(
                b"*5\r\n$3\r\nSET\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n$2\r\nPX\r\n%b"
                % (len(key), key, len(run), run, ttl_part)
            )
        replies += len(write.pointers)
        if runs:
            parts.append(_packed(self._index_command(write, b"".join(listed))))
            replies += 1
        return b"".join(parts), replies

    def _index_command(self, write: TraceWrite, listed: bytes) -> tuple[bytes, ...]:
        """The batch's entry in the index of runs: `listed`, its runs as netstrings."""
        oldest_ms = max(0, int((write.now - write.ttl) * 1000))
        return (
            b"XADD",
            self.runs_key().encode(),
            b"MINID",
            b"~",
            b"%d" % oldest_ms,
            b"*",
            b"r",
            listed,
            b"t",
            repr(float(write.now)).encode(),
        )

    def _unchecked(self, run_id: str, records: int) -> bool:
        """Whether `records` more for `run_id` may be written without checking the bound:
        while this process has written at most `_UNCHECKED` to it (counted here)."""
        counts = self._record_counts()
        total = counts.pop(run_id, 0) + records  # put back last: the least recent come first
        counts[run_id] = total
        self._forget_runs()
        return total <= _UNCHECKED

    def _record_counts(self) -> dict[str, int]:
        """Per run, the records this process wrote to it, the least recently written first."""
        counts = self._trace_counts
        if counts is None:
            counts = self._trace_counts = {}
        return counts

    def _forget_runs(self) -> None:
        """Forget the least recently written half of the runs once over `_RUNS_REMEMBERED`."""
        counts = self._record_counts()
        if len(counts) > _RUNS_REMEMBERED:
            for forgotten in list(itertools.islice(counts, len(counts) - _RUNS_REMEMBERED // 2)):
                del counts[forgotten]

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
