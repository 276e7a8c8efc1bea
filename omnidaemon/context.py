"""Context: what a handler knows about the event it is handling, and how it publishes."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, cast

import anyio.from_thread
import structlog

from omnidaemon.envelope import Envelope
from omnidaemon.errors import Cancelled
from omnidaemon.lanes import Lane, Priority
from omnidaemon.observability.logging import bound_logger
from omnidaemon.requests import is_request_reply

if TYPE_CHECKING:
    from omnidaemon.app import App
    from omnidaemon.cancellation import Cancellation
    from omnidaemon.streaming.writer import StreamWriter

__all__ = ["Context"]


class Context:
    """Handed to a handler that declares a parameter annotated `Context`.

    Attributes:
        event: The envelope being handled (id, topic, correlation id, headers, ...).
        agent: The name of the agent handling it.
        attempt: 1 on the first delivery, then 2, 3, ... on retries and redeliveries.
        max_attempts: The attempt after which a failure goes to the dead-letter queue.
        priority: The lane the event came in (`"high"`, `"normal"` or `"low"`): events the
            handler publishes, and its return value, keep that priority unless told otherwise.

    Example:
        ```python
        @app.agent("text.extracted")
        async def analyze(event: Extracted, ctx: Context) -> None:
            ctx.log.info("analysing", chars=len(event.text))
            await ctx.publish("analysis.completed", {"file_path": event.file_path})
        ```
    """

    __slots__ = (
        "_app",
        "_cancellation",
        "_charge",
        "_log",
        "_published",
        "_stream",
        "agent",
        "attempt",
        "event",
        "max_attempts",
        "priority",
        "replied",
    )

    def __init__(
        self,
        app: App,
        event: Envelope[Any],
        *,
        agent: str,
        attempt: int,
        max_attempts: int,
        priority: Lane = "normal",
    ) -> None:
        self._app = app
        # The lane the event came in: what it publishes keeps it (see the class's docs).
        self.priority: Lane = priority
        self._log: structlog.typing.FilteringBoundLogger | None = None
        self.event = event
        self.agent = agent
        self.attempt = attempt
        self.max_attempts = max_attempts
        self.replied = False
        # Set by the worker when the app declares budgets: pays a charge (see `charge`).
        self._charge: Callable[[str, float], Awaitable[None]] | None = None
        # Set by the worker when the event is cancelled while the handler runs.
        self._cancellation: Cancellation | None = None
        # This attempt's output stream, made by its first `emit`.
        self._stream: StreamWriter | None = None
        # `(topic, event id)` of what the handler published, for the run's trace.
        self._published: list[tuple[str, str]] | None = None

    @property
    def app(self) -> App:
        """The app the agent belongs to."""
        return self._app

    @property
    def event_id(self) -> str:
        """The id of the event being handled."""
        return self.event.id

    @property
    def topic(self) -> str:
        """The topic of the event being handled."""
        return self.event.topic

    @property
    def correlation_id(self) -> str | None:
        """The correlation id shared by every event of this workflow."""
        return self.event.correlation_id

    @property
    def cancelled(self) -> bool:
        """True once the event was cancelled (`App.cancel`) while this handler runs.

        An `async def` handler is also stopped (`CancelledError` at its next `await`); a plain
        `def` handler runs in a thread that cannot be interrupted, so it should look at this
        between steps and return (or call `raise_if_cancelled`). Either way the event's
        outcome is `cancelled`: the return value is not published, and `publish` raises.
        """
        return self._cancellation is not None

    @property
    def cancel_reason(self) -> str | None:
        """The reason given to `App.cancel`, once `cancelled`."""
        return self._cancellation.reason if self._cancellation is not None else None

    def raise_if_cancelled(self) -> None:
        """Raise `Cancelled` if the event was cancelled: a checkpoint for long handlers.

        Raises:
            Cancelled: the event was cancelled while the handler ran.
        """
        if self._cancellation is not None:
            raise Cancelled(
                "Cancelled", self._cancellation.reason, agent=self.agent, event_id=self.event.id
            )

    @property
    def batch_ids(self) -> list[str]:
        """The ids of the messages of a debounced agent's batch, in the batch's order (see
        `omnidaemon.debounce`); empty for any other event."""
        ids = self.event.headers.get("omnidaemon-batch-ids")
        return ids.split(",") if ids else []

    @property
    def is_last_attempt(self) -> bool:
        """True when a failure now sends the event to the dead-letter queue."""
        return self.attempt >= self.max_attempts

    @property
    def log(self) -> structlog.typing.FilteringBoundLogger:
        """A structlog logger bound to this event's id, topic, agent, attempt and correlation id."""
        if self._log is None:
            # Through structlog's configuration if the program has one, else the standard
            # `logging` module (`omnidaemon.agent`), like the library's own lines.
            fields = {
                "event_id": self.event.id,
                "topic": self.event.topic,
                "agent": self.agent,
                "attempt": self.attempt,
                "correlation_id": self.event.correlation_id,
            }
            self._log = cast(
                "structlog.typing.FilteringBoundLogger", bound_logger("omnidaemon.agent", fields)
            )
        return self._log

    @property
    def logger(self) -> structlog.typing.FilteringBoundLogger:
        """The same bound logger as `log`."""
        return self.log

    async def reply(self, payload: Any, *, headers: dict[str, str] | None = None) -> str | None:
        """Send `payload` to the event's `reply_to` topic now, before the handler returns.

        The reply carries this event's correlation id, and its id as causation id. Once a
        handler has replied, its return value is not sent to `reply_to` again. Returns the
        reply's event id, or `None` when the event asked for no reply.

        Raises:
            Cancelled: the event being handled was cancelled.
        """
        self.raise_if_cancelled()
        if self.event.reply_to is None:
            return None
        if is_request_reply(self.event.reply_to):
            # Only while the request waits: a late reply must not recreate its deleted topic.
            self._app.check_payload(self.event.reply_to, payload)
            event_id, data = self._app._encode(
                self.event.reply_to,
                payload,
                self.event.correlation_id,
                self.event.id,
                None,
                None,
                self.event.tenant_id,
                headers,
            )
            if not await self._app.broker.publish_if_exists(self.event.reply_to, data):
                self.log.debug("reply dropped: the request no longer waits")
            self.replied = True
            self._note_published(self.event.reply_to, event_id)
            return event_id
        event_id = await self._app.publish(
            self.event.reply_to,
            payload,
            correlation_id=self.event.correlation_id,
            causation_id=self.event.id,
            tenant_id=self.event.tenant_id,
            headers=headers,
        )
        self.replied = True
        self._note_published(self.event.reply_to, event_id)
        return event_id

    def _note_published(self, topic: str, event_id: str) -> None:
        if self._published is None:
            self._published = []
        self._published.append((topic, event_id))

    async def emit(self, chunk: Any) -> bool:
        """Append `chunk` to this event's output stream, where `App.stream` readers (and
        `GET /v1/events/{id}/stream`) get it; the handler's return value ends the stream.

        `chunk` is a str, any JSON value, or a value of the agent's `stream=` type (checked
        against it). Durable when this returns (one bus round trip). Each attempt streams
        anew: a retry's readers are told, and never get chunks of two attempts mixed. Past
        the bound (`OMNIDAEMON_OUTPUT_MAX_CHUNKS`, `OMNIDAEMON_OUTPUT_MAX_BYTES`) chunks are
        dropped and the stream is marked truncated; the handler runs on.

        Returns:
            `True` once the bus holds the chunk; `False` when it was dropped past the bound.

        Raises:
            Cancelled: the event being handled was cancelled.
            PayloadValidationError: the chunk does not match the agent's `stream=` type.
            TypeError: JSON cannot carry the chunk.

        Example:
            ```python
            @app.agent("chat.asked", stream=str)
            async def answer(question: dict, ctx: Context) -> str:
                words = []
                for word in ["Hello", " world"]:
                    await ctx.emit(word)
                    words.append(word)
                return "".join(words)
            ```
        """
        self.raise_if_cancelled()
        if self._stream is None:
            from omnidaemon.streaming.writer import open_writer

            self._stream = open_writer(self)
        return await self._stream.emit(chunk)

    def emit_sync(self, chunk: Any) -> bool:
        """`emit` for plain `def` handlers, which run in a worker thread."""
        return anyio.from_thread.run(self.emit, chunk)

    async def charge(self, budget: str, units: float) -> None:
        """Pay `units` of `budget` for what this handler used (the tokens a model call
        reported, say). The budget may go into debt; new starts of every agent drawing on it
        then wait until it has been paid back. What was reserved for this event at admission
        (`estimate=`) is settled by its first charge of that budget.

        Raises:
            ValueError: no agent of the app declares `budget`, or `units` is negative.
        """
        if self._charge is None:
            known = ", ".join(sorted(self._app.budgets)) or "none"
            raise ValueError(
                f"no agent of this app declares a budget {budget!r} (budgets: {known})"
            )
        await self._charge(budget, units)

    def charge_sync(self, budget: str, units: float) -> None:
        """`charge` for plain `def` handlers, which run in a worker thread."""
        anyio.from_thread.run(self.charge, budget, units)

    async def publish(
        self,
        topic: str,
        payload: Any,
        *,
        reply_to: str | None = None,
        webhook: str | None = None,
        headers: dict[str, str] | None = None,
        delay: float | timedelta | None = None,
        at: datetime | None = None,
        expires: timedelta | datetime | None = None,
        priority: Priority | None = None,
    ) -> str:
        """Publish an event caused by the one being handled.

        The new event's `causation_id` is this event's id; its `correlation_id` and
        `tenant_id` are carried over, and so is its priority unless `priority` is given.
        Returns the new event's id.

        Raises:
            Cancelled: the event being handled was cancelled: its run publishes nothing more.
        """
        self.raise_if_cancelled()
        event_id = await self._app.publish(
            topic,
            payload,
            correlation_id=self.event.correlation_id,
            causation_id=self.event.id,
            tenant_id=self.event.tenant_id,
            reply_to=reply_to,
            webhook=webhook,
            headers=headers,
            delay=delay,
            at=at,
            expires=expires,
            priority=self.priority if priority is None else priority,
        )
        self._note_published(topic, event_id)
        return event_id

    def publish_sync(
        self,
        topic: str,
        payload: Any,
        *,
        reply_to: str | None = None,
        webhook: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> str:
        """`publish` for plain `def` handlers, which run in a worker thread.

        Blocks the handler's thread until the event is published; returns its id. Call it only
        from a plain `def` handler (an `async def` handler awaits `publish` instead).
        """
        return anyio.from_thread.run(
            lambda: self.publish(
                topic, payload, reply_to=reply_to, webhook=webhook, headers=headers
            )
        )
