"""Writing run traces on Redis: a batch of attempt records as one JSON document and one
script filing it under each of its runs (the layout is in `omnidaemon.brokers.redis._traces`).
"""

from __future__ import annotations

import hashlib
import itertools
import math
import operator
import os
import secrets
import zlib
from collections import Counter
from collections.abc import Sequence
from typing import Any

import orjson
from redis.asyncio.cluster import ClusterNode

from omnidaemon.brokers.redis._routing import RedisRouting
from omnidaemon.brokers.traces import AttemptRow, TraceWrite

__all__ = ["BATCH_FORMAT", "RedisTraceWrites", "parse_netstrings", "pointers_key"]

_UNCHECKED = 32  # records a writer files under one run before the bound is checked
_RUNS_REMEMBERED = 4096  # runs whose record counts a process keeps (then all forgotten)
_CLUSTER_SHARDS = 16  # trace shards on a cluster (one on a single server)
_MAX_SPAN = 3600.0  # seconds of writes one directory holds, at most
_MIN_SPAN = 0.05
BATCH_FORMAT = 1
_RUN = operator.itemgetter(0)  # a row's run, taken by a C loop

# KEYS: the directory, the pointers, the batch, the shard's list of directories, the index
# of runs (on a cluster, where it lives elsewhere, the list of directories again), then the
# count key of each checked run. ARGV: the batch's TTL (ms), when the directory expires (ms),
# now (ms), the batch's ref, the most records a run keeps, the batch, `[pointers, checked,
# runs or null]` as JSON (pointers `[event, run]`; checked `[run, new records]`), the runs
# joined by NUL when none holds one (else they are in the JSON; runs may repeat), and, to add
# the batch's entry to the index of runs, the oldest entry to keep (ms) and the writer's time.
_WRITE = """
-- The list of directories first: a write refused there (a key in the way) writes nothing.
redis.call('ZADD', KEYS[4], 'GT', ARGV[2], KEYS[1])
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', '(' .. ARGV[3])
local index = cjson.decode(ARGV[7])
local pointers, checked = index[1], index[2]
local ttl, ref, max = ARGV[1], ARGV[4], tonumber(ARGV[5])
local over = {}
for i, item in ipairs(checked) do
    local key, new = KEYS[5 + i], tonumber(item[2])
    if new > 0 then
        local kept = tonumber(redis.call('HGET', key, 'n') or '0')
        if kept + new > max then
            redis.call('HINCRBY', key, 'dropped', new)
            over[item[1]] = true
        else
            redis.call('HINCRBY', key, 'n', new)
        end
        redis.call('PEXPIRE', key, ttl)
    end
end
redis.call('SET', KEYS[3], ARGV[6], 'PX', ttl)
local runs, seen = {}, {}
local function add(run)
    if not seen[run] then
        seen[run] = true
        runs[#runs + 1] = run
    end
end
if type(index[3]) == 'table' then
    for _, run in ipairs(index[3]) do add(run) end
else
    for run in string.gmatch(ARGV[8], '[^%z]+') do add(run) end
end
-- Per run, its batches in this directory: `<ref>` or `~<ref>` (over the bound), comma-separated.
for i = 1, #runs, 1000 do
    local last = math.min(i + 999, #runs)
    local old = redis.call('HMGET', KEYS[1], unpack(runs, i, last))
    local args = {}
    for j = i, last do
        local run = runs[j]
        local entry = over[run] and ('~' .. ref) or ref
        local before = old[j - i + 1]
        args[#args + 1] = run
        args[#args + 1] = before and (before .. ',' .. entry) or entry
    end
    redis.call('HSET', KEYS[1], unpack(args))
end
if #runs > 0 then
    redis.call('PEXPIREAT', KEYS[1], ARGV[2])
end
if #pointers > 0 then
    local args = {}
    for _, pair in ipairs(pointers) do
        args[#args + 1] = pair[1]
        args[#args + 1] = pair[2]
    end
    for i = 1, #args, 2000 do
        redis.call('HSET', KEYS[2], unpack(args, i, math.min(i + 1999, #args)))
    end
    redis.call('PEXPIREAT', KEYS[2], ARGV[2])
end
if ARGV[9] and #runs > 0 then
    -- The runs as they came (NUL-joined, repeats and all: readers skip repeats), or as
    -- netstrings when a run's id holds a NUL.
    local entry = {'z', ARGV[8], 't', ARGV[10]}
    if ARGV[8] == '' then
        local listed = {}
        for i, run in ipairs(runs) do listed[i] = #run .. ':' .. run end
        entry = {'r', table.concat(listed), 't', ARGV[10]}
    end
    redis.call('XADD', KEYS[5], 'MINID', '~', ARGV[9], '*', unpack(entry))
end
return 0
"""


_WRITE_TEXT = _WRITE.encode()
# Sent by its digest: the text is 2 KB, which the server would hash again for every batch.
_WRITE_SHA = hashlib.sha1(_WRITE_TEXT, usedforsecurity=False).hexdigest().encode()


def _packed(args: Sequence[bytes]) -> list[bytes]:
    """One command in the protocol, in pieces: the batch's document is not copied into it
    (the socket's write joins the pieces, once)."""
    pieces = [b"*%d\r\n" % len(args)]
    for arg in args:
        pieces += (b"$%d\r\n" % len(arg), arg, b"\r\n")
    return pieces


def _netstring(item: str) -> str:
    """`item` as `<length in bytes>:<item>` (how runs and events are named in a directory)."""
    return f"{len(item.encode())}:{item}"


def _netstrings(items: Sequence[str]) -> bytes:
    """`items` as netstrings, one after another."""
    return b"".join(_netstring(item).encode() for item in items)


def parse_netstrings(data: bytes) -> list[str]:
    items, pos = [], 0
    while pos < len(data):
        colon = data.index(b":", pos)
        size = int(data[pos:colon])
        items.append(data[colon + 1 : colon + 1 + size].decode())
        pos = colon + 1 + size
    return items


def pointers_key(directory: str) -> str:
    """The pointers of a directory's span (a hash: event id -> run id)."""
    head, _, tail = directory.rpartition(":dir:")
    return f"{head}:ptr:{tail}"


def _span(ttl: float) -> float:
    """Seconds of writes one directory holds, for records kept `ttl` seconds."""
    return min(_MAX_SPAN, max(_MIN_SPAN, ttl / 16))


class RedisTraceWrites(RedisRouting):
    """The trace writes of `RedisBroker` (see `RedisTraces` for the reads)."""

    _trace_counts: Counter[str] | None = None  # run -> records this process wrote
    _large_runs: set[str] | None = None  # runs past `_UNCHECKED` from this process: checked
    _trace_writer: str = ""  # this process's part of a batch's ref (random)
    _trace_writer_pid = 0
    _trace_batches = itertools.count(1)

    def _trace_shards(self) -> int:
        return _CLUSTER_SHARDS if self._cluster is not None else 1

    def trace_shard(self, item_id: str) -> int:
        """The shard that files a run (or an event's pointer)."""
        shards = self._trace_shards()
        return zlib.crc32(item_id.encode()) % shards if shards > 1 else 0

    def _filing(
        self, write: TraceWrite, shard: int, part: _Part, *, indexed: bool, by_digest: bool
    ) -> list[bytes]:
        """The `EVAL` of `_WRITE` filing `part` of `write` on `shard`, as its arguments
        (`EVALSHA` with `by_digest`); `indexed`: with the batch's entry in the index of runs
        (one server only)."""
        if self._trace_writer_pid != os.getpid():  # a forked process names its own batches
            cls = type(self)
            cls._trace_writer, cls._trace_writer_pid = secrets.token_hex(5), os.getpid()
        now_ms = int(write.now * 1000)
        ref = f"{now_ms:013d}.{self._trace_writer}.{next(self._trace_batches)}"
        span = _span(write.ttl)
        span_ms = max(1, int(span * 1000))
        bucket = now_ms // span_ms
        ttl_ms = max(1, math.ceil((write.ttl + span) * 1000))
        expires_ms = (bucket + 1) * span_ms + max(1, math.ceil(write.ttl * 1000))
        attempts = write.attempts
        batch = orjson.dumps(
            (
                BATCH_FORMAT,
                attempts.agent if attempts is not None else "",
                attempts.worker if attempts is not None else "",
                part.rows,
                part.records,
            )
        )
        runs = "\0".join(part.runs)
        if "\0" in "".join(part.runs):  # a run's id holds a NUL (found by memchr, not a count)
            index = orjson.dumps((part.pointers, part.checked, part.runs))
            runs = ""
        else:
            index = orjson.dumps((part.pointers, part.checked, None))
        directory = self.trace_dir_key(shard, span_ms, bucket)
        keys = [
            directory,
            pointers_key(directory),
            self.trace_batch_key(shard, ref),
            self.trace_dirs_key(shard),
            self.runs_key() if indexed else self.trace_dirs_key(shard),
            *(self.trace_count_key(shard, run) for run, _ in part.checked),
        ]
        indexing: list[bytes] = []
        if indexed:
            oldest_ms = max(0, int((write.now - write.ttl) * 1000))
            indexing = [b"%d" % oldest_ms, repr(float(write.now)).encode()]
        return [
            b"EVALSHA" if by_digest else b"EVAL",
            _WRITE_SHA if by_digest else _WRITE_TEXT,
            b"%d" % len(keys),
            *(key.encode() for key in keys),
            b"%d" % ttl_ms,
            b"%d" % expires_ms,
            b"%d" % now_ms,
            ref.encode(),
            b"%d" % write.max_records,
            batch,
            index,
            runs.encode(),
            *indexing,
        ]

    def _parts(self, write: TraceWrite) -> dict[int, _Part]:
        """`write` split by shard, each part with the runs its records must be checked for."""
        attempts = write.attempts
        rows: Sequence[AttemptRow] = attempts.rows if attempts is not None else ()
        records = [(run, name, data.decode()) for run, name, data in write.records]
        if self._trace_shards() == 1:  # one server: everything in one part, in one pass
            runs = [*map(_RUN, rows), *(run for run, _, _ in records)]
            parts = {0: _Part(list(rows), records, runs, list(write.pointers))}
        else:
            parts = {}
            shard_of = self.trace_shard

            def part_of(item_id: str) -> _Part:
                shard = shard_of(item_id)
                if shard not in parts:
                    parts[shard] = _Part([], [], [], [])
                return parts[shard]

            for row in rows:
                part = part_of(row[0])
                part.rows.append(row)
                part.runs.append(row[0])
            for record in records:
                part = part_of(record[0])
                part.records.append(record)
                part.runs.append(record[0])
            for pointer in write.pointers:
                part_of(pointer[0]).pointers.append(pointer)
        self._check_bound(parts, attempts.replacing if attempts is not None else {})
        return parts

    def _check_bound(self, parts: dict[int, _Part], replacing: dict[str, int]) -> None:
        """Name in each part the runs whose bound its script checks: those past `_UNCHECKED`
        records from this process (counted here: a `Counter` updated, and its largest count
        among the batch's runs found, by C loops).

        The first attempts at a run's first event (whose id is the run's), one per agent of
        its topic, are not counted: a run grows by the events its handlers publish and by
        retries, which are. Once a run is past `_UNCHECKED`, all of its records are checked.
        A batch of runs of one event each, the usual case, so hashes nothing."""
        counts = self._trace_counts
        if counts is None:
            counts = self._trace_counts = Counter()
        large = self._large_runs
        if large is None:
            large = self._large_runs = set()
        for part in parts.values():
            # The runs of the records that count: every record but a first attempt at a
            # run's first event (a row whose event is its run, attempt 1).
            grown = [row[0] for row in part.rows if row[0] != row[1] or row[6] > 1]
            grown += [run for run, _, _ in part.records]
            if grown:
                counts.update(grown)
                if max(map(counts.__getitem__, grown)) > _UNCHECKED:
                    large.update(run for run in grown if counts[run] > _UNCHECKED)
            if not large or large.isdisjoint(part.runs):
                continue
            for run, written in Counter(part.runs).items():
                if run in large:
                    part.checked.append((run, written - replacing.get(run, 0)))
        if len(counts) > _RUNS_REMEMBERED:
            counts.clear()  # a large run stays checked: it is in `_large_runs`
        if len(large) > _RUNS_REMEMBERED:
            large.clear()

    def trace_commands(self, write: TraceWrite) -> list[tuple[str, tuple[Any, ...]]]:
        """The commands that store `write`, each with a key that routes it (a cluster's
        path; one server sends `packed_trace` instead)."""
        commands: list[tuple[str, tuple[Any, ...]]] = []
        runs: dict[str, None] = {}
        for shard, part in self._parts(write).items():
            args = self._filing(write, shard, part, indexed=False, by_digest=False)
            commands.append((args[3].decode(), tuple(args)))  # the directory routes it
            runs.update(dict.fromkeys(part.runs))
        if runs:
            index = self.runs_key()
            commands.append((index, self._index_command(write, list(runs))))
        return commands

    def packed_trace(self, write: TraceWrite, *, by_digest: bool = True) -> tuple[list[bytes], int]:
        """The write for one server in the protocol: `(pieces, how many replies they get)`:
        the script that files the batch and adds its entry to the index of runs, by its
        digest unless `by_digest` is off (a server that does not have it refuses it whole:
        `NOSCRIPT`, and nothing ran)."""
        part = self._parts(write)[0]
        return _packed(self._filing(write, 0, part, indexed=True, by_digest=by_digest)), 1

    def _index_command(self, write: TraceWrite, runs: Sequence[str]) -> tuple[bytes, ...]:
        """The batch's entry in the index of runs, as the script writes it on one server:
        `z`, the runs joined by NUL, or `r`, as netstrings, when a run's id holds a NUL."""
        oldest_ms = max(0, int((write.now - write.ttl) * 1000))
        named = (b"z", "\0".join(runs).encode())
        if "\0" in "".join(runs):
            named = (b"r", _netstrings(runs))
        return (
            b"XADD",
            self.runs_key().encode(),
            b"MINID",
            b"~",
            b"%d" % oldest_ms,
            b"*",
            *named,
            b"t",
            repr(float(write.now)).encode(),
        )

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


class _Part:
    """What one shard files of a write: rows, records (text), every run they name (with
    repeats), pointers, and the runs whose bound the script checks, with their new records."""

    __slots__ = ("checked", "pointers", "records", "rows", "runs")

    def __init__(
        self,
        rows: list[AttemptRow],
        records: list[tuple[str, str, str]],
        runs: list[str],
        pointers: list[tuple[str, str]],
    ) -> None:
        self.rows = rows
        self.records = records
        self.runs = runs
        self.pointers = pointers
        self.checked: list[tuple[str, int]] = []
