"""Publishing from an app: `publish`, `publish_many`, `publish_sync` and `request`, with the
checks every event passes before it is sent. `App` inherits it."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar, overload

import anyio
from pydantic import TypeAdapter

from omnidaemon._json_limits import MAX_NESTING, nesting_exceeds, too_deep, unfit_for_json
from omnidaemon.brokers import Broker, Subscription
from omnidaemon.envelope import encode_new
from omnidaemon.errors import DelayTooLong, PayloadTooLarge, PayloadValidationError
from omnidaemon.lanes import Lane, LaneMarks, Priority, lane_of
from omnidaemon.observability import tracing
from omnidaemon.requests import new_reply_topic, wait_reply
from omnidaemon.settings import Settings
from omnidaemon.sync import PublishesSync, SyncPublisher

__all__ = ["Publishing", "expiry_time"]

ReplyT = TypeVar("ReplyT")

_REPLY_TTL_MARGIN = 60.0  # seconds a reply topic outlives its request's timeout on the bus


def _seconds_until(delay: float | timedelta | None, at: datetime | None) -> float:
    """Seconds to hold an event back, from `publish(delay=...)` or `publish(at=...)`."""
    if delay is not None and at is not None:
        raise ValueError("give delay= or at=, not both")
    if at is not None:
        when = at if at.tzinfo is not None else at.replace(tzinfo=UTC)
        return max(0.0, (when - datetime.now(UTC)).total_seconds())
    if delay is None:
        return 0.0
    seconds = delay.total_seconds() if isinstance(delay, timedelta) else float(delay)
    if not seconds >= 0:  # NaN too
        raise ValueError(f"delay must be a number of seconds, not negative, not {seconds}")
    return seconds


def expiry_time(expires: timedelta | datetime, now: float) -> datetime:
    """When an event published with `expires=` expires: a lifetime from `now` (seconds since
    the epoch on the broker's clock, which a test's bus moves), or a time (timezone-aware, or
    naive UTC)."""
    if isinstance(expires, timedelta):
        if not expires.total_seconds() > 0:
            raise ValueError(f"expires must be a positive lifetime, not {expires}")
        return datetime.fromtimestamp(now, UTC) + expires
    if isinstance(expires, datetime):
        return expires if expires.tzinfo is not None else expires.replace(tzinfo=UTC)
    raise TypeError(f"expires takes a timedelta or a datetime, not {type(expires).__name__}")


class Publishing:
    """The publishing side of `App`."""

    # Set by App.__init__, or defined by App.
    name: str
    settings: Settings
    _connected: bool
    _sync: PublishesSync | None
    _lane_marks: LaneMarks

    if TYPE_CHECKING:  # defined by App

        @property
        def broker(self) -> Broker: ...

        async def connect(self) -> None: ...

        def check_payload(self, topic: str, payload: Any, *, validated_as: Any = None) -> None: ...

    def _encode(
        self,
        topic: str,
        payload: Any,
        correlation_id: str | None,
        causation_id: str | None,
        reply_to: str | None,
        webhook: str | None,
        tenant_id: str | None,
        headers: Mapping[str, str] | None,
        expires_at: datetime | None = None,
    ) -> tuple[str, bytes]:
        """Validate and encode a new event from this app; return `(event_id, data)`.

        Raises `PayloadTooLarge` if the encoded event exceeds `settings.max_payload_bytes`,
        `PayloadValidationError` if JSON cannot carry it (see `omnidaemon._json_limits`).

        Called once per event published; the publishing methods pass its arguments by
        position, and it passes them on the same way (keyword calls cost measurably more).
        """
        if headers is not None and not all(
            isinstance(k, str) and isinstance(v, str) for k, v in headers.items()
        ):
            raise TypeError("headers must map str to str")
        if tracing.TRACING_AVAILABLE:
            headers = tracing.publish_headers(topic, headers)
        try:
            encoded = encode_new(
                topic,
                payload,
                correlation_id,
                causation_id,
                reply_to,
                webhook,
                self.name,
                tenant_id,
                dict(headers) if headers else None,
                expires_at,
            )
        except TypeError as exc:
            # orjson's reason names no field: find which one, and where in it. A value of a
            # type JSON has no place for stays the `TypeError` it is.
            problem = unfit_for_json(
                {
                    "payload": payload,
                    "headers": headers,
                    "correlation_id": correlation_id,
                    "causation_id": causation_id,
                    "webhook": webhook,
                    "tenant_id": tenant_id,
                }
            )
            if problem is None:
                raise
            raise PayloadValidationError(f"cannot publish to {topic!r}: {problem}") from exc
        # The envelope is one level around the payload. Deeper than this is written by orjson
        # (up to 254 levels) and refused by the worker's parser (over 200).
        if nesting_exceeds(encoded[1], MAX_NESTING + 1):
            raise PayloadValidationError(f"cannot publish to {topic!r}: {too_deep('payload')}")
        # Checked here, before any caller sends: one `len` per event is all the publish path
        # can spare, and publish_many then refuses its whole batch before sending any of it.
        if len(encoded[1]) > self.settings.max_payload_bytes:
            raise PayloadTooLarge(topic, len(encoded[1]), self.settings.max_payload_bytes)
        return encoded

    def _hold(self, topic: str, delay: float | timedelta | None, at: datetime | None) -> float:
        """Seconds to hold an event to `topic` back; `DelayTooLong` over `max_delay`."""
        seconds = _seconds_until(delay, at)
        if seconds > self.settings.max_delay:
            raise DelayTooLong(topic, seconds, self.settings.max_delay)
        return seconds

    async def publish(
        self,
        topic: str,
        payload: Any,
        *,
        correlation_id: str | None = None,
        causation_id: str | None = None,
        reply_to: str | None = None,
        webhook: str | None = None,
        tenant_id: str | None = None,
        headers: Mapping[str, str] | None = None,
        delay: float | timedelta | None = None,
        at: datetime | None = None,
        expires: timedelta | datetime | None = None,
        priority: Priority | None = None,
    ) -> str:
        """Publish one event and return its id.

        Args:
            topic: Where to publish, e.g. `"document.uploaded"`.
            payload: A pydantic model, dataclass, TypedDict or any JSON-compatible value.
            correlation_id: Ties events of one workflow together; default: the new event's id.
            causation_id: The id of the event that caused this one (`Context.publish` sets it).
            reply_to: A topic the handler's return value is sent to.
            webhook: A URL the outcome is POSTed to.
            tenant_id: Carried unchanged to handlers.
            headers: String metadata carried unchanged.
            delay: Seconds (or a `timedelta`) before agents see the event; held durably on
                the bus meanwhile, so it survives restarts. At most `settings.max_delay`
                (`OMNIDAEMON_MAX_DELAY`, 30 days).
            at: A time (timezone-aware, or naive UTC) at which agents see the event.
            expires: A lifetime (`timedelta`, from now) or a time (`datetime`): an agent that
                has not started the event by then dead-letters it as `Expired` without
                running it (for answers nobody waits for any more).
            priority: `"high"`, `"normal"` (the default) or `"low"`, or an int from 0 (low)
                to 9 (high): every agent of the topic starts higher ones first, with a guard
                that keeps lower ones moving (see docs/flow-control.md).

        Raises:
            ValueError: The topic name or the priority is invalid.
            TypeError: The payload holds a value of a type JSON has no place for.
            PayloadValidationError: The payload contradicts the type an agent of this app
                declares for the topic, or JSON cannot carry it: it nests arrays and objects
                more than `MAX_NESTING` (128) levels deep, holds an integer outside the 64-bit
                range, or a string (in it, a header or an id) that is not Unicode text (a
                lone surrogate).
            PayloadTooLarge: The encoded event is larger than `settings.max_payload_bytes`
                (`OMNIDAEMON_MAX_PAYLOAD_BYTES`, 1 MiB); nothing was sent.
            DelayTooLong: `delay` (or `at`) is further away than `settings.max_delay`
                (`OMNIDAEMON_MAX_DELAY`, 30 days); nothing was sent.
        """
        self.check_payload(topic, payload)
        lane = lane_of(priority)
        hold = 0.0 if delay is None and at is None else self._hold(topic, delay, at)
        event_id, data = self._encode(
            topic,
            payload,
            correlation_id,
            causation_id,
            reply_to,
            webhook,
            tenant_id,
            headers,
            None if expires is None else expiry_time(expires, self.broker.clock()),
        )
        if not self._connected:
            await self.connect()
        if lane != "normal":
            topic = await self._bus_topic(topic, lane)
        await self.broker.publish(topic, data, delay=hold)
        return event_id

    def publish_sync(
        self,
        topic: str,
        payload: Any,
        *,
        correlation_id: str | None = None,
        reply_to: str | None = None,
        webhook: str | None = None,
        tenant_id: str | None = None,
        headers: Mapping[str, str] | None = None,
        delay: float | timedelta | None = None,
        at: datetime | None = None,
    ) -> str:
        """`publish` for code without an event loop: Django or Flask views, scripts, threads.

        Blocks until the bus has the event and returns its id. Runs on an event loop of
        omnidaemon's own in a background thread, with its own connection, shared by every
        thread of the process. Same arguments and errors as `publish`.

        Raises:
            RuntimeError: called from a running event loop (use `await app.publish`).
        """
        try:
            anyio.get_current_task()
        except RuntimeError:
            pass
        else:
            # omnidaemon.testing lets a test call sync code that publishes; nothing else may.
            if self._sync is None or not self._sync.serves_current_task():
                raise RuntimeError(
                    "publish_sync blocks: in async code, use `await app.publish(...)`"
                )
        self.check_payload(topic, payload)
        hold = self._hold(topic, delay, at)
        event_id, data = self._encode(
            topic,
            payload,
            correlation_id=correlation_id,
            causation_id=None,
            reply_to=reply_to,
            webhook=webhook,
            tenant_id=tenant_id,
            headers=headers,
        )
        if self._sync is None:
            self._sync = SyncPublisher(self.broker.clone)
        self._sync.publish(topic, data, delay=hold)
        return event_id

    async def publish_many(
        self,
        events: Iterable[tuple[str, Any]],
        *,
        correlation_id: str | None = None,
        priority: Priority | None = None,
    ) -> list[str]:
        """Publish several `(topic, payload)` events in one round trip; return their ids.

        `priority` applies to every event of the batch (see `publish`).

        Every event is checked and encoded before any is sent: a bad one (`ValueError`,
        `TypeError`, `PayloadValidationError`, `PayloadTooLarge`) sends none of the batch.
        """
        events = list(events)
        lane = lane_of(priority)
        for topic, payload in events:
            self.check_payload(topic, payload)
        encoded = [
            (
                topic,
                *self._encode(topic, payload, correlation_id, None, None, None, None, None),
            )
            for topic, payload in events
        ]
        await self.connect()
        await self.broker.publish_many(
            [
                (topic if lane == "normal" else await self._bus_topic(topic, lane), data)
                for topic, _, data in encoded
            ]
        )
        return [event_id for _, event_id, _ in encoded]

    async def _bus_topic(self, topic: str, lane: Lane) -> str:
        """The bus topic of `topic`'s `lane` (see `omnidaemon.lanes`)."""
        return await self._lane_marks.bus_topic(self.broker, topic, lane)

    @overload
    async def request(
        self,
        topic: str,
        payload: Any,
        *,
        timeout: float = 30.0,
        response_type: None = None,
        correlation_id: str | None = None,
        tenant_id: str | None = None,
        headers: Mapping[str, str] | None = None,
        priority: Priority | None = None,
    ) -> Any: ...

    @overload
    async def request(
        self,
        topic: str,
        payload: Any,
        *,
        timeout: float = 30.0,
        response_type: type[ReplyT],
        correlation_id: str | None = None,
        tenant_id: str | None = None,
        headers: Mapping[str, str] | None = None,
        priority: Priority | None = None,
    ) -> ReplyT: ...

    async def request(
        self,
        topic: str,
        payload: Any,
        *,
        timeout: float = 30.0,
        response_type: type[Any] | None = None,
        correlation_id: str | None = None,
        tenant_id: str | None = None,
        headers: Mapping[str, str] | None = None,
        priority: Priority | None = None,
    ) -> Any:
        """Publish an event and wait for the handling agent's return value (request-reply).

        Args:
            topic: Where to publish the request.
            payload: The request's payload.
            timeout: Seconds to wait for the reply.
            response_type: Validate the reply into this type (a model, dataclass, ...);
                default: the reply as JSON data.
            priority: The request's priority (see `publish`).

        Returns:
            The handler's return value (the first reply, if several agents answer).

        Raises:
            AgentFailed: the agent gave up on the request (it was dead-lettered), with the
                remote error's type and message; raised as soon as that happens.
            Cancelled: the request's event was cancelled (`cancel`), with the reason.
            TimeoutError: no reply within `timeout` (no worker running the agent, or it is
                still retrying).

        Example:
            ```python
            quote = await app.request("quote.requested", {"sku": "A1"}, response_type=Quote)
            ```
        """
        lane_of(priority)  # an invalid priority fails before anything is made on the bus
        await self.connect()
        reply_topic = new_reply_topic()
        sub = Subscription(reply_topic, "requester")
        try:
            # Subscribed before publishing, so the reply cannot be missed; inside the `try`, so
            # that a request cancelled even here deletes the topic and frees its connection.
            await self.broker.subscribe(sub)
            if math.isfinite(timeout):
                # The topic is deleted below; should this process die first, the bus removes
                # it anyway once the request is surely over (the margin covers the publish,
                # which retries an unreachable bus, and a slow event loop).
                await self.broker.expire_topic(reply_topic, timeout + _REPLY_TTL_MARGIN)
            event_id = await self.publish(
                topic,
                payload,
                reply_to=reply_topic,
                correlation_id=correlation_id,
                tenant_id=tenant_id,
                headers=headers,
                priority=priority,
            )
            with anyio.move_on_after(timeout) as waiting:
                reply = await wait_reply(self.broker, sub, event_id)
        finally:
            with anyio.CancelScope(shield=True):
                await self.broker.delete_topic(reply_topic)
        if waiting.cancelled_caught:
            raise TimeoutError(f"no reply to {event_id} on {topic!r} within {timeout:g} s")
        if response_type is None:
            return reply
        return TypeAdapter(response_type).validate_python(reply)
