"""Reading streamed output: `stream` and `request_stream`. `App` inherits it; the machinery is
`omnidaemon.streaming`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TypeVar, overload

from omnidaemon.streaming.stream import OutputStream

if TYPE_CHECKING:
    from omnidaemon.brokers import Broker
    from omnidaemon.lanes import Priority

__all__ = ["Streaming"]

ChunkT = TypeVar("ChunkT")


class Streaming:
    """The streaming side of `App`."""

    if TYPE_CHECKING:  # defined by App

        @property
        def broker(self) -> Broker: ...

        async def connect(self) -> None: ...

        async def publish(
            self,
            topic: str,
            payload: Any,
            *,
            correlation_id: str | None = None,
            tenant_id: str | None = None,
            headers: Mapping[str, str] | None = None,
            priority: Priority | None = None,
        ) -> str: ...

    @overload
    def stream(
        self,
        event_id: str,
        *,
        agent: str | None = None,
        after: str | None = None,
        timeout: float | None = 60.0,
        chunk_type: None = None,
    ) -> OutputStream[Any]: ...

    @overload
    def stream(
        self,
        event_id: str,
        *,
        agent: str | None = None,
        after: str | None = None,
        timeout: float | None = 60.0,
        chunk_type: type[ChunkT],
    ) -> OutputStream[ChunkT]: ...

    def stream(
        self,
        event_id: str,
        *,
        agent: str | None = None,
        after: str | None = None,
        timeout: float | None = 60.0,
        chunk_type: Any = None,
    ) -> OutputStream[Any]:
        """The output an event's handler streams with `ctx.emit`, chunk by chunk, from the
        start: a reader that comes late (even after the handler returned) misses nothing.

        Args:
            event_id: The event (what `publish` returned).
            agent: Follow this agent's stream, when several agents of the topic stream;
                default: the first agent that streams.
            after: Resume after this chunk (a `StreamChunk.id`).
            timeout: Seconds to wait for the next chunk (or the end) before `TimeoutError`;
                `None` waits for as long as it takes.
            chunk_type: Validate each chunk into this type (a model, ...); default: JSON data.

        Returns:
            An async iterator of `StreamChunk`s; its `result` holds the handler's return
            value once the iteration ended. See `OutputStream` for what it raises.

        Example:
            ```python
            async for chunk in app.stream(event_id):
                print(chunk.data, end="")
            ```
        """
        return OutputStream(
            self.broker,
            event_id,
            agent=agent,
            after=after,
            timeout=timeout,
            chunk_type=chunk_type,
            connect=self.connect,
        )

    @overload
    async def request_stream(
        self,
        topic: str,
        payload: Any,
        *,
        agent: str | None = None,
        timeout: float | None = 60.0,
        chunk_type: None = None,
        correlation_id: str | None = None,
        tenant_id: str | None = None,
        headers: Mapping[str, str] | None = None,
        priority: Priority | None = None,
    ) -> OutputStream[Any]: ...

    @overload
    async def request_stream(
        self,
        topic: str,
        payload: Any,
        *,
        agent: str | None = None,
        timeout: float | None = 60.0,
        chunk_type: type[ChunkT],
        correlation_id: str | None = None,
        tenant_id: str | None = None,
        headers: Mapping[str, str] | None = None,
        priority: Priority | None = None,
    ) -> OutputStream[ChunkT]: ...

    async def request_stream(
        self,
        topic: str,
        payload: Any,
        *,
        agent: str | None = None,
        timeout: float | None = 60.0,
        chunk_type: Any = None,
        correlation_id: str | None = None,
        tenant_id: str | None = None,
        headers: Mapping[str, str] | None = None,
        priority: Priority | None = None,
    ) -> OutputStream[Any]:
        """Publish an event and stream its handler's output: `publish`, then `stream`.

        The streamed counterpart of `request`: the chunks come as the handler emits them, and
        the return value ends the iteration (`OutputStream.result`). Nothing can be missed
        between the publish and the first read: the stream is read from its start.

        Args:
            topic: Where to publish.
            payload: The event's payload.
            agent: Follow this agent's stream (see `stream`).
            timeout: Seconds to wait for each next chunk (see `stream`).
            chunk_type: Validate each chunk into this type.
            correlation_id: See `publish`.
            tenant_id: See `publish`.
            headers: See `publish`.
            priority: See `publish`.

        Example:
            ```python
            stream = await app.request_stream("chat.asked", {"question": "Hi?"})
            async for chunk in stream:
                print(chunk.data, end="")
            ```
        """
        event_id = await self.publish(
            topic,
            payload,
            correlation_id=correlation_id,
            tenant_id=tenant_id,
            headers=headers,
            priority=priority,
        )
        return self.stream(event_id, agent=agent, timeout=timeout, chunk_type=chunk_type)
