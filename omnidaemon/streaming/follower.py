"""Following an event's output log: reading it from the start (or resuming after an entry)
and turning its entries into what a reader sees: chunks, restarts, truncation and the end.

A follower keeps to one agent (the one asked for, else the first that wrote to the log) and
one attempt at a time: when a higher attempt appears (after a `retrying` end, or because
another worker took the event over), it announces a restart once, and from then on ignores
every entry of lower attempts, so chunks of two attempts are never mixed. `OutputStream` (the
Python API) and the SSE endpoint both read through it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from omnidaemon.observability.logging import get_logger
from omnidaemon.streaming.records import OutputRecord, output_key, parse_entry

if TYPE_CHECKING:
    from omnidaemon.brokers.base import Broker

__all__ = ["StreamEvent", "StreamFollower"]

_log = get_logger("omnidaemon.streaming")

_PAGE = 200  # entries read per call


@dataclass(frozen=True, slots=True)
class StreamEvent:
    """What a reader of the stream is told, in order.

    Attributes:
        kind: `chunk`; `restart` (the attempt `attempt` ended without a result and a new one
            streams anew: drop what was shown of it); `truncated` (the attempt passed its
            bound: nothing more of it is streamed); `end` (the last one: `status`).
        id: The log entry's id (the SSE `id:`, a resume point); `None` for a restart the
            follower inferred from a higher attempt's first entry (that entry follows).
        agent: The agent followed.
        attempt: The attempt the event is about.
        index: A chunk's position in its attempt's stream, from 0.
        data: A chunk's value; the result of an end `succeeded`.
        status: An end's status: `succeeded`, `dead_lettered` or `cancelled`.
        error: A restart's, end's or truncation's `{"type", "message"}` (or `{"message"}`).
    """

    kind: Literal["chunk", "restart", "truncated", "end"]
    id: str | None
    agent: str
    attempt: int
    index: int = 0
    data: Any = None
    status: str | None = None
    error: dict[str, str] | None = None

    def to_json(self) -> dict[str, Any]:
        """The event's fields as the SSE endpoint sends them (its `data:`)."""
        body: dict[str, Any] = {"agent": self.agent, "attempt": self.attempt}
        if self.kind == "chunk":
            body["index"] = self.index
            body["data"] = self.data
        elif self.kind == "end":
            body["status"] = self.status
            if self.status == "succeeded":
                body["result"] = self.data
            else:
                body["error"] = self.error
        else:
            body["error"] = self.error
        return body


class StreamFollower:
    """Reads the output log of `event_id` and keeps the state of what it has read.

    Args:
        broker: The bus.
        event_id: Whose stream.
        agent: Follow this agent's stream; default: the first agent that wrote to the log.
        after: Resume after this entry id (an `id` of an earlier `StreamEvent`): the entries
            up to it are read to know where the stream stands, and not told again. An id the
            log does not hold (expired, or of another log) reads the log from its start.
    """

    def __init__(
        self, broker: Broker, event_id: str, *, agent: str | None = None, after: str | None = None
    ) -> None:
        self._broker = broker
        self.event_id = event_id
        self._key = output_key(event_id)
        self.agent = agent
        self._after = after
        self._resumed = after is None
        self._cursor: str | None = None  # the last entry read
        self.attempt = 0
        """The attempt followed now (0 before the first entry)."""
        self._index = 0
        self._restarted = False  # a restart was told for `attempt` (its `retrying` end)
        self.end: StreamEvent | None = None
        """The end, once read."""
        self.seen = False
        """Whether any entry of the followed agent was read (the stream exists)."""

    async def read(self, wait: float) -> list[StreamEvent]:
        """The events of the entries appended since the last call, waiting up to `wait`
        seconds for one when there is none (empty once the end was read, or if nothing came).
        """
        if self.end is not None:
            return []
        if not self._resumed:
            return await self._resume(wait)
        entries = await self._broker.read_output(
            self._key, after=self._cursor, count=_PAGE, timeout=wait
        )
        return self._take(entries)

    async def _resume(self, wait: float) -> list[StreamEvent]:
        """Read the whole log once; tell only what follows the entry `after` (everything if
        the log does not hold it)."""
        entries: list[tuple[str, bytes]] = []
        deadline = time.monotonic() + wait
        while True:
            cursor = entries[-1][0] if entries else None
            page = await self._broker.read_output(self._key, after=cursor, count=_PAGE)
            entries += page
            if len(page) < _PAGE:
                if entries or time.monotonic() >= deadline:
                    break
                # An empty log: wait for its first entry like any read.
                first = await self._broker.read_output(
                    self._key, count=_PAGE, timeout=max(0.0, deadline - time.monotonic())
                )
                if not first:
                    break
                entries += first
        self._resumed = True
        ids = [entry_id for entry_id, _ in entries]
        if self._after in ids:
            known = ids.index(self._after) + 1
            self._take(entries[:known])  # where the stream stands: told before
            return self._take(entries[known:])
        return self._take(entries)

    def _take(self, entries: list[tuple[str, bytes]]) -> list[StreamEvent]:
        events: list[StreamEvent] = []
        for entry_id, data in entries:
            self._cursor = entry_id
            if self.end is not None:
                break
            try:
                record = parse_entry(data)
            except ValueError as exc:
                _log.warning(
                    "skipped an unreadable entry of an output stream",
                    event_id=self.event_id,
                    entry_id=entry_id,
                    error=str(exc),
                )
                continue
            events += self._events_of(entry_id, record)
        return events

    def _events_of(self, entry_id: str, record: OutputRecord) -> list[StreamEvent]:
        if self.agent is None:
            self.agent = record.agent
        elif record.agent != self.agent:
            return []  # another agent of the topic: pass `agent=` to follow it
        self.seen = True
        events: list[StreamEvent] = []
        if record.attempt < self.attempt:
            return events  # an earlier attempt's late entry: never mixed into a later one
        if record.attempt > self.attempt:
            if self.attempt and not self._restarted:
                # No `retrying` end told it (another worker took the event over, say).
                events.append(StreamEvent("restart", None, record.agent, self.attempt))
            self.attempt, self._index, self._restarted = record.attempt, 0, False
        elif self._restarted:
            return events  # the attempt ended already (a stray entry after its end)
        if record.kind == "chunk":
            events.append(
                StreamEvent(
                    "chunk", entry_id, record.agent, record.attempt, self._index, record.data
                )
            )
            self._index += 1
        elif record.kind == "truncated":
            events.append(
                StreamEvent("truncated", entry_id, record.agent, record.attempt, error=record.error)
            )
        elif record.status == "retrying":
            self._restarted = True
            events.append(
                StreamEvent("restart", entry_id, record.agent, record.attempt, error=record.error)
            )
        else:
            self.end = StreamEvent(
                "end",
                entry_id,
                record.agent,
                record.attempt,
                data=record.data,
                status=record.status,
                error=record.error,
            )
            events.append(self.end)
        return events
