"""The trace store on Redis (`Broker.ack(..., trace=)` and its readers).

Every event writes a record, so the write is built for cost (measured by the benchmark,
`--cases traces`, and `python -m bench.ab`): each batch of acks stores its records as one
JSON document, encoded by one `orjson` call, and one script files the batch under each run it
holds (`_trace_writes.py`). Per-record commands (an `HSET` a record, a `PEXPIRE` a run) cost
the no-op drain 22-25 %, mostly the Python that encodes and packs each record; this costs it
about 12-20 %. All keys of a shard share one hash tag (`{trace-N}`: one shard on one server,
16 on a cluster, a run's shard by the CRC of its id):

- `…:batch:<ref>`: one written batch, `[1, agent, worker, rows, records]` (the attempts' values,
  see `omnidaemon.brokers.traces.AttemptRow`, and any records written as bytes), kept for the
  TTL plus one span. `<ref>` starts with the writer's time in ms, so refs sort as written.
- `…:dir:<span ms>:<n>`: the directory of the batches written in the `n`-th span of time, a
  hash: run id -> its batches' refs, comma-separated, a ref marked `~` when the run was over
  its bound (below). A span is a sixteenth of the TTL (at most an hour); a directory expires
  the TTL after its span ends, so a record is kept at least the TTL after its write and at
  most one span more.
- `…:ptr:<span ms>:<n>`: the span's pointers, a hash: event id -> run id, for every event that
  is not its run's first.
- `…:dirs`: the shard's live directories (a sorted set: key -> when it expires), for readers.
- `…:n:<run id>`: the counts of a run past `_UNCHECKED` records from one writer (`n` kept,
  `dropped`): past `max_records`, a batch's new records of the run are filed under a `~` ref,
  which tells readers to take from it only the records that replace one already read (an
  attempt's end replacing its start), and counted as dropped.
- `omni:runs`: the index of runs, a stream with one entry per written batch (field `z`, the
  batch's run ids joined by NUL, as the script got them, or `r`, as netstrings, when one
  holds a NUL; field `t`, the writer's time), trimmed by every write of the entries older
  than the TTL (`MINID`).

A reader of a run lists the shard's live directories, `HGET`s the run in each, and `MGET`s the
batches they name, oldest first: a later record of a field replaces an earlier one. A batch
never changes once written, so a reader keeps those it read (`BatchCache`, for a minute
each, 16 MiB at most) and fetches only the new ones when it reads the run again.
"""

from __future__ import annotations

import time
from collections import OrderedDict

import orjson

from omnidaemon.brokers.redis._connection import _SOCKET_TIMEOUT
from omnidaemon.brokers.redis._keys import _decode, _field
from omnidaemon.brokers.redis._trace_writes import (
    BATCH_FORMAT,
    RedisTraceWrites,
    parse_netstrings,
    pointers_key,
)
from omnidaemon.brokers.traces import StoredTrace, encode_attempt

__all__ = ["RedisTraces"]

_SCAN_BATCH = 200  # index entries read at a time by `recent_runs`
# A reader keeps the batch documents it read (they never change once written), so reading a
# run again (`trace --follow`, the dashboard, `runs`) fetches only the batches written since.
_CACHE_BYTES = 16 * 1024 * 1024
_CACHE_FOR = 60.0  # seconds a kept batch is used before it is read again (it may expire)


class BatchCache:
    """Batch documents by key, at most `max_bytes` of them (the least recently used go
    first), each used for `ttl` seconds after it was read from the bus: a batch expires with
    its records, which a reader must stop showing."""

    def __init__(self, max_bytes: int, ttl: float) -> None:
        self._max_bytes = max_bytes
        self._ttl = ttl
        self._bytes = 0
        self._kept: OrderedDict[str, tuple[float, bytes]] = OrderedDict()

    def get(self, key: str, now: float) -> bytes | None:
        """The document kept under `key`, unless it is unknown or was read too long ago."""
        kept = self._kept.get(key)
        if kept is None:
            return None
        if kept[0] <= now:
            self._drop(key)
            return None
        self._kept.move_to_end(key)
        return kept[1]

    def put(self, key: str, data: bytes, now: float) -> None:
        """Keep `data`, read from the bus at `now`, under `key`."""
        if _size(key, data) > self._max_bytes:
            return
        if key in self._kept:
            self._drop(key)
        self._kept[key] = (now + self._ttl, data)
        self._bytes += _size(key, data)
        while self._bytes > self._max_bytes:
            self._drop(next(iter(self._kept)))

    def _drop(self, key: str) -> None:
        _, data = self._kept.pop(key)
        self._bytes -= _size(key, data)


def _size(key: str, data: bytes) -> int:
    """What a kept batch takes: its document and key, and about 200 bytes of entry (the
    objects and the dict's slot), which count when batches are small."""
    return len(data) + len(key) + 200


class RedisTraces(RedisTraceWrites):
    """The trace store of `RedisBroker`: its reads here, its writes inherited."""

    _batch_cache: BatchCache | None = None  # made by the first read (workers never read)

    async def _live_dirs(self, shard: int) -> list[str]:
        """The shard's directories that may still hold records."""
        dirs_key = self.trace_dirs_key(shard)
        now_ms = int(time.time() * 1000)
        # A minute of slack for clocks that disagree: an expired directory reads as empty.
        dirs = await self._direct(
            ("ZRANGEBYSCORE", dirs_key, now_ms - 60_000, "+inf"),
            key=dirs_key,
            timeout=_SOCKET_TIMEOUT,
        )
        return [_decode(d) for d in dirs]

    async def read_trace(self, run_id: str) -> StoredTrace | None:
        shard = self.trace_shard(run_id)
        dirs = await self._live_dirs(shard)
        count_key = self.trace_count_key(shard, run_id)
        dropped_reply, *filed = await self._exchange(
            [("HGET", count_key, "dropped"), *(("HGET", d, run_id) for d in dirs)],
            key=count_key,
            timeout=_SOCKET_TIMEOUT,
        )
        # Refs start with their writer's time: sorted, the batches come as they were written.
        refs = sorted(
            (
                (ref.lstrip("~"), ref.startswith("~"))
                for entries in filed
                if entries
                for ref in _decode(entries).split(",")
            ),
            key=_written_order,
        )
        batches = await self._batches([self.trace_batch_key(shard, ref) for ref, _ in refs])
        records: dict[str, bytes] = {}
        for (_, over), data in zip(refs, batches, strict=True):
            if data is None:  # expired
                continue
            for name, record in _records_of(data, run_id):
                if not over or name in records:
                    records[name] = record
        dropped = int(dropped_reply or 0)
        if not records and not dropped:
            return None
        return StoredTrace(records, dropped)

    async def _batches(self, keys: list[str]) -> list[bytes | None]:
        """The batch documents under `keys` (`None`: expired), those read lately from this
        reader's cache and the others in one `MGET`."""
        if not keys:
            return []
        cache = self._batch_cache
        if cache is None:
            cache = self._batch_cache = BatchCache(_CACHE_BYTES, _CACHE_FOR)
        now = time.monotonic()
        found = [cache.get(key, now) for key in keys]
        missing = [key for key, data in zip(keys, found, strict=True) if data is None]
        if missing:
            fetched = iter(
                await self._direct(("MGET", *missing), key=missing[0], timeout=_SOCKET_TIMEOUT)
            )
            for index, data in enumerate(found):
                if data is None:
                    data = found[index] = next(fetched)
                    if data is not None:
                        cache.put(keys[index], data, now)
        return found

    async def run_of(self, event_id: str) -> str | None:
        shard = self.trace_shard(event_id)
        dirs = await self._live_dirs(shard)
        if not dirs:
            return None
        runs = await self._exchange(
            [("HGET", pointers_key(d), event_id) for d in dirs],
            key=self.trace_dirs_key(shard),
            timeout=_SOCKET_TIMEOUT,
        )
        return next((_decode(run) for run in reversed(runs) if run), None)

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
                    joined = _field(flat, b"z")
                    if joined:
                        runs = _decode(joined).split("\0")
                    else:
                        runs = parse_netstrings(_field(flat, b"r"))
                    for run_id in runs:
                        found.setdefault(run_id, written)
            if len(entries) < _SCAN_BATCH:
                break
            end = f"({_decode(entries[-1][0])}"
        ranked = sorted(found.items(), key=lambda item: item[1], reverse=True)
        return ranked[:limit]


def _records_of(data: bytes, run_id: str) -> list[tuple[str, bytes]]:
    """`(field, record)` of the run's records in a stored batch, in order (none from a batch
    this release cannot read)."""
    try:
        batch = orjson.loads(data)
        version, agent, worker, rows, records = batch
    except (orjson.JSONDecodeError, TypeError, ValueError):
        return []
    if version != BATCH_FORMAT:
        return []
    found = [(name, record.encode()) for run, name, record in records if run == run_id]
    for row in rows:
        if row[0] == run_id:
            _, name, record = encode_attempt(agent, worker, row)
            found.append((name, record))
    return found


def _written_order(filed: tuple[str, bool]) -> tuple[str, str, int]:
    """Where a filed batch comes among a run's: by its ref (`<ms>.<writer>.<count>`), its
    writer's time, then its writer, then that writer's count of batches as a number (a
    writer's tenth batch in one millisecond comes after its ninth)."""
    when, _, rest = filed[0].partition(".")
    writer, _, count = rest.rpartition(".")
    return when, writer, int(count) if count.isascii() and count.isdigit() else 0
