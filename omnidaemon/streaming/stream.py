"""`OutputStream`: reading an event's streamed output in Python (`App.stream`)."""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from pydantic import TypeAdapter

from omnidaemon.errors import AgentFailed, Cancelled
from omnidaemon.streaming.follower import StreamEvent, StreamFollower

if TYPE_CHECKING:
    from omnidaemon.brokers.base import Broker

__all__ = ["OutputStream", "StreamChunk"]

ChunkT = TypeVar("ChunkT")

_SLICE = 5.0  # seconds of one waiting read: a reader's cancellation is never held up longer


@dataclass(frozen=True, slots=True)
class StreamChunk(Generic[ChunkT]):
    """One chunk of an event's streamed output, as `ctx.emit` wrote it.

    Attributes:
        data: The chunk: JSON data, or validated into `App.stream`'s `chunk_type`.
        agent: The agent that emitted it.
        attempt: The attempt that emitted it (1, then 2, ... after a retry).
        index: Its position in its attempt's stream, from 0.
        id: Its entry id on the bus: `App.stream(..., after=id)` resumes after it.
        restarted: True on the first chunk of an attempt that follows an earlier one (which
            failed and is retried, or was taken over by another worker): what was shown of
            the earlier attempt is void; this attempt streams from its start.
    """

    data: ChunkT
    agent: str
    attempt: int
    index: int
    id: str
    restarted: bool = False


class OutputStream(Generic[ChunkT]):
    """The streamed output of one event: an async iterator of `StreamChunk`s, made by
    `App.stream` (or `App.request_stream`).

    It reads the event's output log from its start, so a reader that comes late misses
    nothing, and follows one agent (`agent=`, else the first one that streams). When an
    attempt fails and the event is retried, the next attempt streams anew: its first chunk has
    `restarted=True` and a higher `attempt`, and no chunk of the earlier attempt comes after
    it. The iteration ends when the agent's handler returned (`result` holds its return
    value, as JSON data).

    Raises (from the iteration):
        AgentFailed: the agent gave up on the event (dead-lettered), with its error.
        Cancelled: the event was cancelled (`App.cancel`).
        TimeoutError: nothing was streamed for `timeout` seconds (no worker runs the agent,
            the event is not handled yet, or its agent declares no `stream=` and does not
            emit).

    Example:
        ```python
        stream = app.stream(event_id, timeout=30)
        async for chunk in stream:
            print(chunk.data, end="", flush=True)
        print(stream.result)
        ```
    """

    def __init__(
        self,
        broker: Broker,
        event_id: str,
        *,
        agent: str | None = None,
        after: str | None = None,
        timeout: float | None = 60.0,
        chunk_type: Any = None,
        connect: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds, not {timeout}")
        self.event_id = event_id
        """The event whose output this is."""
        self._follower = StreamFollower(broker, event_id, agent=agent, after=after)
        self._timeout = math.inf if timeout is None else float(timeout)
        self._adapter: TypeAdapter[Any] | None = (
            None if chunk_type is None else TypeAdapter(chunk_type)
        )
        self._connect = connect
        self._pending: deque[StreamEvent] = deque()
        self._restarted = False
        self.status: str | None = None
        """How the stream ended (`succeeded`, `dead_lettered`, `cancelled`), once it did."""
        self.result: Any = None
        """The handler's return value (JSON data), once the stream ended `succeeded`."""
        self.error: dict[str, str] | None = None
        """The error (`{"type", "message"}`) once the stream ended otherwise."""
        self.truncated = False
        """Whether an attempt's output passed its bound, so chunks of it are missing
        (`OMNIDAEMON_OUTPUT_MAX_CHUNKS`, `OMNIDAEMON_OUTPUT_MAX_BYTES`)."""
        self.restarts = 0
        """How many times the stream restarted with a new attempt."""

    @property
    def agent(self) -> str | None:
        """The agent followed (`None` until its first entry is read)."""
        return self._follower.agent

    @property
    def attempt(self) -> int:
        """The attempt streaming now, or whose result ended the stream (0 before any)."""
        return self._follower.attempt

    def __aiter__(self) -> OutputStream[ChunkT]:
        return self

    async def __anext__(self) -> StreamChunk[ChunkT]:
        while True:
            if self.status is not None:
                raise StopAsyncIteration
            if not self._pending:
                await self._fill()
                continue
            event = self._pending.popleft()
            if event.kind == "chunk":
                assert event.id is not None
                data = (
                    event.data
                    if self._adapter is None
                    else self._adapter.validate_python(event.data)
                )
                restarted, self._restarted = self._restarted, False
                return StreamChunk(
                    data, event.agent, event.attempt, event.index, event.id, restarted
                )
            if event.kind == "restart":
                self.restarts += 1
                self._restarted = True
                self.truncated = False
            elif event.kind == "truncated":
                self.truncated = True
            else:
                self._finish(event)

    async def _fill(self) -> None:
        if self._connect is not None:
            await self._connect()
            self._connect = None
        deadline = time.monotonic() + self._timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(
                    f"no streamed output of event {self.event_id} within {self._timeout:g} s"
                )
            events = await self._follower.read(min(left, _SLICE))
            if events:
                self._pending.extend(events)
                return
            if self._follower.end is not None:  # resumed after the end: it was read before
                self._pending.append(self._follower.end)
                return

    def _finish(self, end: StreamEvent) -> None:
        self.status = end.status
        if end.status == "succeeded":
            self.result = end.data
            return
        self.error = end.error
        error = end.error or {}
        failure = Cancelled if end.status == "cancelled" else AgentFailed
        raise failure(
            error.get("type", "Error"),
            error.get("message", ""),
            agent=end.agent,
            event_id=self.event_id,
        )
