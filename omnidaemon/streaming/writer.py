"""Writing an event's output stream: `Context.emit` appends chunks, and the worker appends an
end marker when an attempt ends (`end_attempt`, called where the outcome is settled).

Each attempt writes a stream of its own (its entries carry its attempt number), bounded by
`Settings.output_max_chunks` and `output_max_bytes`: past the bound the writer appends one
`truncated` marker, logs one warning and drops the rest of the attempt's chunks (`emit`
returns `False`), while the handler runs on; its return value still ends the stream.

An end marker is written for an attempt that emitted at least one chunk, of an agent that
declared `stream=` (whose readers wait for it even when nothing was emitted), or a later
attempt (a retry, a redelivery) of an event whose stream an earlier attempt began, so agents
that do not stream pay nothing (a redelivery of theirs, one read of the bus). The worker
writes it only for deliveries it settled itself: one taken over by another worker
(`Outcomes._report_lost`) gets its end from that worker.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

from pydantic import TypeAdapter, ValidationError

from omnidaemon._json_limits import unfit_for_json
from omnidaemon.envelope import dumps
from omnidaemon.errors import PayloadValidationError
from omnidaemon.observability.logging import get_logger
from omnidaemon.streaming.records import (
    EndStatus,
    chunk_entry,
    end_entry,
    output_key,
    truncated_entry,
)
from omnidaemon.topology import type_name

if TYPE_CHECKING:
    from omnidaemon.brokers.base import Broker, Delivery
    from omnidaemon.context import Context
    from omnidaemon.worker.outcomes import Outcomes

__all__ = ["StreamWriter", "end_attempt", "open_writer"]

_log = get_logger("omnidaemon.worker")

_DEFAULT_TTL = 86_400.0  # an emit from a context no agent of the app made (a unit test's)

# The writers of attempts running in this process, by (app, agent, event id, attempt), so
# that the worker settling an attempt knows whether it emitted. Held by the attempt's
# `Context` only: an attempt that ends without a settle (a shutdown, a lost delivery) leaves
# nothing behind.
_open: weakref.WeakValueDictionary[tuple[int, str, str, int], StreamWriter] = (
    weakref.WeakValueDictionary()
)


class StreamWriter:
    """Appends the chunks of one attempt to its event's output log, within the bound.

    Made by the attempt's first `Context.emit`.
    """

    __slots__ = (
        "__weakref__",
        "_adapter",
        "_agent",
        "_attempt",
        "_broker",
        "_event_id",
        "_key",
        "_max_bytes",
        "_max_chunks",
        "_stream_type",
        "_ttl",
        "bytes",
        "chunks",
        "truncated",
    )

    def __init__(
        self,
        broker: Broker,
        event_id: str,
        *,
        agent: str,
        attempt: int,
        ttl: float,
        adapter: TypeAdapter[Any] | None,
        stream_type: Any,
        max_chunks: int,
        max_bytes: int,
    ) -> None:
        self._broker = broker
        self._event_id = event_id
        self._key = output_key(event_id)
        self._agent = agent
        self._attempt = attempt
        self._ttl = ttl
        self._adapter = adapter
        self._stream_type = stream_type
        self._max_chunks = max_chunks
        self._max_bytes = max_bytes
        self.chunks = 0
        """Chunks appended so far."""
        self.bytes = 0
        """Bytes of JSON appended so far (the chunks' values)."""
        self.truncated = False
        """Whether the bound was reached (the marker is written, later chunks dropped)."""

    def encode(self, chunk: Any) -> bytes:
        """The chunk as JSON, validated against the agent's `stream=` type if it has one.

        Raises:
            PayloadValidationError: the chunk does not match the declared `stream=` type.
            TypeError: JSON cannot carry the chunk (a value of a type JSON has no place for,
                an integer outside 64 bits, a string that is not Unicode text, ...).
        """
        if self._adapter is not None:
            try:
                chunk = self._adapter.dump_python(self._adapter.validate_python(chunk), mode="json")
            except ValidationError as exc:
                raise PayloadValidationError(
                    f"ctx.emit: the chunk does not match the agent's stream="
                    f"{type_name(self._stream_type)}: {exc}"
                ) from None
        try:
            return dumps(chunk)
        except TypeError as exc:
            problem = unfit_for_json({"chunk": chunk}) or str(exc)
            raise TypeError(f"ctx.emit: JSON cannot carry this chunk: {problem}") from None

    async def emit(self, chunk: Any) -> bool:
        """Append `chunk`; `True` once the bus holds it, `False` when it was dropped because
        the attempt's output passed its bound (the stream is then marked truncated)."""
        data = self.encode(chunk)
        if self.truncated:
            return False
        if self.chunks + 1 > self._max_chunks or self.bytes + len(data) > self._max_bytes:
            self.truncated = True  # set before the await: concurrent emits write one marker
            reason = (
                f"the attempt's output passed its bound of {self._max_chunks} chunks"
                if self.chunks + 1 > self._max_chunks
                else f"the attempt's output passed its bound of {self._max_bytes} bytes"
            )
            _log.warning(
                "streamed output truncated: later chunks of this attempt are dropped "
                "(OMNIDAEMON_OUTPUT_MAX_CHUNKS / OMNIDAEMON_OUTPUT_MAX_BYTES)",
                event_id=self._event_id,
                agent=self._agent,
                attempt=self._attempt,
                chunks=self.chunks,
                bytes=self.bytes,
            )
            entry = truncated_entry(self._agent, self._attempt, reason)
            await self._broker.append_output(self._key, entry, ttl=self._ttl)
            return False
        self.chunks += 1
        self.bytes += len(data)
        entry = chunk_entry(self._agent, self._attempt, data)
        await self._broker.append_output(self._key, entry, ttl=self._ttl)
        return True


def open_writer(ctx: Context) -> StreamWriter:
    """The writer of `ctx`'s attempt (made on its first emit), known to the worker that will
    settle the attempt."""
    app = ctx.app
    spec = app.agents.get(ctx.agent)
    settings = app.settings
    writer = StreamWriter(
        app.broker,
        ctx.event.id,
        agent=ctx.agent,
        attempt=ctx.attempt,
        ttl=spec.result_ttl if spec is not None else _DEFAULT_TTL,
        adapter=spec.stream_adapter if spec is not None else None,
        stream_type=spec.stream_type if spec is not None else None,
        max_chunks=settings.output_max_chunks,
        max_bytes=settings.output_max_bytes,
    )
    _open[(id(app), ctx.agent, ctx.event.id, ctx.attempt)] = writer
    return writer


async def end_attempt(
    outcomes: Outcomes,
    delivery: Delivery,
    event_id: str | None,
    status: EndStatus,
    *,
    result: Any = None,
    error: dict[str, str] | None = None,
) -> None:
    """Append the end marker of the attempt `delivery` ran for `event_id`, if it streamed
    (emitted a chunk) or its agent declared `stream=`; nothing otherwise.

    Called by the worker once it settled the attempt itself (never for a delivery another
    worker took over), before acknowledging a success. A bus that fails here is logged, not
    raised: the outcome stands, and readers of the stream wait until their timeout.
    """
    spec = outcomes._spec
    if event_id is None or (not _open and spec.stream_type is None and delivery.attempt == 1):
        return  # the common case, on every event's path: nothing streams
    writer = _open.pop((id(outcomes._app), spec.name, event_id, delivery.attempt), None)
    key = output_key(event_id)
    try:
        # A later attempt that emitted nothing still ends what an earlier one began (readers
        # wait for an end); one look at the bus, paid by redeliveries only.
        if (
            writer is None
            and spec.stream_type is None
            and (delivery.attempt == 1 or not await outcomes._broker.read_output(key, count=1))
        ):
            return
        entry = end_entry(spec.name, delivery.attempt, status, result=result, error=error)
        await outcomes._broker.append_output(key, entry, ttl=spec.result_ttl)
    except Exception as exc:
        _log.warning(
            "could not end the event's output stream: its readers wait until their timeout",
            event_id=event_id,
            agent=spec.name,
            attempt=delivery.attempt,
            status=status,
            error=f"{type(exc).__name__}: {exc}",
        )
