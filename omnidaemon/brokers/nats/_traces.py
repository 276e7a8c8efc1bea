"""The trace store on NATS (`Broker.ack(..., trace=)`, `read_trace`, `run_of`, `recent_runs`).

One stream, `p_trace` (`_names`), with one message per subject (`max_msgs_per_subject=1`, so a
subject's message is its value) and a per-message TTL (`Nats-TTL`, whole seconds rounded up),
so the server drops everything on time with no process of ours left to clean up:

- `p.trace.rec.<run>.<field>`: a record (a later one of the field replaces it);
- `p.trace.drop.<run>.<writer>`: how many records one writer refused for the run (below);
- `p.trace.of.<event>`: the run of an event that is not its run's first (the run id);
- `p.trace.run.<run>`: the run in the index (the writer's `now`, a decimal).

A write is every one of its messages published at once, then their acknowledgements awaited
together (beside the ack's metric writes): one round trip however many records, and durable
when `ack` returns. A failure raises (the caller sends the whole write again: each message
replaces its subject's, so a repeat stores the same).

Reading a run is one batched direct get of `p.trace.*.<run>.*` (its records and counts, every
subject's one message); `run_of` a direct get of the pointer; `recent_runs` reads the whole
index (`p.trace.run.*`, one message per run written within the TTL) and sorts it: the writers'
clocks order it, not the server's, so no server time stamp can narrow the read.

Where this differs from Redis, because JetStream cannot extend a stored message's TTL nor
count a run's subjects as it stores them:

- **Expiry.** Each record expires `ttl` after its own write (the run's index entry and each
  pointer `ttl` after theirs), not `ttl` after the run's last write: a run written to for
  longer than `ttl` loses its oldest records first, as an output log does.
- **The per-run bound** (`max_records`) is kept per writing process: each broker remembers,
  for the runs it wrote lately (`_MAX_RUNS` runs and `_MAX_FIELDS` fields in all, least
  recently written forgotten first), which fields it stored; a new field past `max_records`
  of them is refused and counted. So a run written by one process holds at most
  `max_records` fields, exactly as on Redis; written by `k` processes, at most
  `k * max_records` (each process's share is bounded, their sum is not checked: that would
  cost every write a read of the run first). A run a process forgot and writes again is
  counted afresh by it. `StoredTrace.dropped` is the sum of every writer's count (each writer
  publishes its own running total under its own subject, so counts are never lost to a race).
"""

from __future__ import annotations

import asyncio
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field

import anyio
from nats.errors import NoRespondersError

from omnidaemon.brokers.nats._core import unavailable
from omnidaemon.brokers.nats._names import decode, encode
from omnidaemon.brokers.nats._values import NatsValues, _subject, _ttl
from omnidaemon.brokers.traces import StoredTrace, TraceWrite

__all__ = ["NatsTraces"]

_MAX_RUNS = 4096  # runs a process remembers the fields of (for the per-run bound)
_MAX_FIELDS = 65_536  # fields it remembers in all: the memory the bound may take
_RETRY_FIRST, _RETRY_MAX = 0.02, 1.0  # seconds between tries of messages nobody took


@dataclass(slots=True)
class _Written:
    """What this process stored in one run: the fields, and the records it refused."""

    writer: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    fields: set[str] = field(default_factory=set)
    dropped: int = 0


class _Bound:
    """The per-run bound of one process (see the module docs): the runs it wrote lately."""

    def __init__(self) -> None:
        self._runs: OrderedDict[str, _Written] = OrderedDict()
        self._fields = 0  # fields held in all `_runs`

    def admit(self, run_id: str, names: list[str], limit: int) -> tuple[list[str], _Written]:
        """The fields of `names` the run may store (those it stores already, then new ones
        while fewer than `limit` are stored); the others are counted as dropped."""
        written = self._runs.pop(run_id, None) or _Written()
        self._runs[run_id] = written  # the most recently written last
        admitted = []
        for name in names:
            if name in written.fields:
                admitted.append(name)
            elif len(written.fields) < limit:
                written.fields.add(name)
                self._fields += 1
                admitted.append(name)
            else:
                written.dropped += 1
        self._trim()
        return admitted, written

    def refund(self, written: _Written, dropped: int) -> None:
        """Forget `dropped` refusals of a write that failed (its retry counts them again)."""
        written.dropped = max(0, written.dropped - dropped)

    def _trim(self) -> None:
        while len(self._runs) > 1 and (len(self._runs) > _MAX_RUNS or self._fields > _MAX_FIELDS):
            _, oldest = self._runs.popitem(last=False)
            self._fields -= len(oldest.fields)


_Message = tuple[str, bytes, dict[str, str]]


class NatsTraces(NatsValues):
    """The trace store of `NatsBroker`."""

    _trace_bound: _Bound | None = None

    async def _ensure_traces(self) -> str:
        stream = self._names.trace_stream
        await self._ensure_stream(
            stream,
            {
                "subjects": [self._names.traces_all],
                "retention": "limits",
                "max_msgs_per_subject": 1,
                "discard": "old",
                "allow_msg_ttl": True,
                "duplicate_window": 0,  # no message ids: a repeat replaces its subject's
            },
        )
        return stream

    def _trace_messages(
        self, write: TraceWrite
    ) -> tuple[list[_Message], list[tuple[_Written, int]]]:
        """The messages that store `write`, and per run with refusals its writer's record and
        how many this write refused (taken back if the write fails)."""
        if self._trace_bound is None:
            self._trace_bound = _Bound()
        names = self._names
        headers = _ttl(write.ttl)
        messages: list[_Message] = []
        refused: list[tuple[_Written, int]] = []
        stamp = repr(float(write.now)).encode()  # a float's repr reads back exactly
        for run_id, records in write.by_run().items():
            admitted, written = self._trace_bound.admit(run_id, list(records), write.max_records)
            messages += [(names.trace_record(run_id, n), records[n], headers) for n in admitted]
            if len(admitted) < len(records):
                refused.append((written, len(records) - len(admitted)))
            if written.dropped:
                count = str(written.dropped).encode()
                messages.append((names.trace_dropped(run_id, written.writer), count, headers))
            messages.append((names.trace_index(run_id), stamp, headers))
        for event_id, run_id in write.pointers:
            messages.append((names.trace_pointer(event_id), run_id.encode(), headers))
        return messages, refused

    async def _write_trace(self, write: TraceWrite) -> None:
        """Store `write`: every message published at once, then the acknowledgements awaited
        together; raises the first failure once all are answered."""
        if not write:
            return
        await self._ensure_traces()
        # Planned and sent with no wait in between: of two writes of one run by this process,
        # the one that counted more refusals reaches the server last (one connection keeps
        # its order), so a writer's stored count is its latest.
        messages, refused = self._trace_messages(write)
        try:
            await self._publish_all(messages)
        except BaseException:
            assert self._trace_bound is not None
            for written, count in refused:
                self._trace_bound.refund(written, count)
            raise

    async def _publish_all(self, messages: list[_Message]) -> None:
        """Publish `messages` to the trace stream together; those nobody took (the bus lost
        the stream, or it has no leader yet) again after making it, until `publish_timeout`."""
        deadline = anyio.current_time() + self._publish_timeout
        wait = _RETRY_FIRST
        while True:
            sent = [
                asyncio.ensure_future(self._publish(subject, data, headers))
                for subject, data, headers in messages
            ]
            outcomes = await asyncio.gather(*sent, return_exceptions=True)
            failures = [o for o in outcomes if isinstance(o, BaseException)]
            untaken = [
                message
                for message, outcome in zip(messages, outcomes, strict=True)
                if isinstance(outcome, NoRespondersError)
            ]
            for failure in failures:
                if not isinstance(failure, NoRespondersError):
                    raise failure
            if not untaken:
                return
            self._streams.discard(self._names.trace_stream)
            if anyio.current_time() + wait > deadline:
                subject = untaken[0][0]
                raise unavailable(self._url, ConnectionError(f"no stream takes {subject}"))
            await anyio.sleep(wait)
            wait = min(wait * 2, _RETRY_MAX)
            await self._ensure_traces()
            messages = untaken

    # Reading -------------------------------------------------------------------------------

    async def read_trace(self, run_id: str) -> StoredTrace | None:
        names = self._names
        found = await self._scan(names.trace_stream, names.trace_of_run(run_id))
        if not found:
            return None
        records: dict[str, bytes] = {}
        dropped = 0
        record_head = names.trace_record(run_id, "").removesuffix(encode(""))
        for msg in found:
            subject = _subject(msg)
            if subject.startswith(record_head):
                records[decode(subject[len(record_head) :])] = msg.data
            else:
                try:
                    dropped += int(msg.data)
                except ValueError:  # written by something else: no count
                    continue
        return StoredTrace(records, dropped)

    async def run_of(self, event_id: str) -> str | None:
        names = self._names
        msg = await self._direct_get_last(names.trace_stream, names.trace_pointer(event_id))
        return None if msg is None else msg.data.decode(errors="replace")

    async def recent_runs(self, *, since: float, limit: int) -> list[tuple[str, float]]:
        if limit < 1:
            return []
        names = self._names
        head = names.trace_index("").removesuffix(encode(""))
        runs: list[tuple[str, float]] = []
        for msg in await self._scan(names.trace_stream, names.trace_index_all):
            try:
                written = float(msg.data)
            except ValueError:  # written by something else: not a run of ours
                continue
            if written >= since:
                runs.append((decode(_subject(msg)[len(head) :]), written))
        runs.sort(key=lambda run: run[1], reverse=True)
        return runs[:limit]
