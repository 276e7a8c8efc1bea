"""Telling the outside world an event is finished: the webhooks of `publish(webhook=URL)`."""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import anyio
import httpx
from anyio.abc import TaskGroup

from omnidaemon.envelope import Envelope, dumps
from omnidaemon.observability.logging import get_logger
from omnidaemon.webhooks import WebhookSender, WebhookSettings

__all__ = ["SDK_WEBHOOK_FORMAT", "WEBHOOK_FORMAT_HEADER", "OutcomeNotifier"]

#: An event header naming the webhook body a publisher expects. With `SDK_WEBHOOK_FORMAT` the
#: body also carries the OmniDaemon SDK's fields (`task_id`, `timestamp`) and its status words
#: (`success`, `failed`), so receivers written for the SDK keep working.
WEBHOOK_FORMAT_HEADER = "omnidaemon-webhook-format"
SDK_WEBHOOK_FORMAT = "omnidaemon-sdk"

_log = get_logger("omnidaemon.webhooks")


@dataclass(frozen=True, slots=True)
class _Pending:
    url: str
    data: bytes  # the encoded body: a queued delivery holds nothing else of its event
    event_id: str


def _host(url: str) -> str | None:
    try:
        return httpx.URL(url).host or None
    except (httpx.InvalidURL, TypeError):
        return None


class OutcomeNotifier:
    """POSTs each finished event's outcome to its webhook, in the background, in bounded memory.

    A webhook is sent once per event and agent, when the event is finished: succeeded, or
    dead-lettered after its last attempt (never on a failed attempt that will be retried).
    Delivery runs beside the handlers, so a slow receiver never holds up acknowledgements.

    At most `WebhookSettings.max_in_flight` deliveries run at once; more wait in a queue of at
    most `max_queued_bytes` encoded bodies, and a webhook that fits in neither is dropped
    (logged and counted). Dropping, rather than waiting for room, keeps `finished` from ever
    blocking the acknowledgement of the event; a bound on bytes rather than on deliveries
    bounds memory whatever the results weigh.
    """

    def __init__(self, sender: WebhookSender, tasks: TaskGroup) -> None:
        self._sender = sender
        self._tasks = tasks
        self._max_in_flight = sender.settings.max_in_flight
        self._max_queued_bytes = sender.settings.max_queued_bytes
        self._queue: deque[_Pending] = deque()
        self._queued_bytes = 0
        self._running = 0
        self._dropped = 0
        self._idle = anyio.Event()
        self._idle.set()

    @classmethod
    @asynccontextmanager
    async def running(
        cls, settings: WebhookSettings | None = None
    ) -> AsyncIterator[OutcomeNotifier]:
        """A notifier for the block; on exit, deliveries still under way are cancelled."""
        async with (
            WebhookSender(settings or WebhookSettings.from_env()) as sender,
            anyio.create_task_group() as tasks,
        ):
            notifier = cls(sender, tasks)
            yield notifier
            if notifier.in_flight or notifier.queued:
                _log.warning(
                    "webhooks not sent: the worker is stopping",
                    in_flight=notifier.in_flight,
                    queued=notifier.queued,
                )
            tasks.cancel_scope.cancel()

    def finished(
        self,
        envelope: Envelope[Any],
        *,
        agent: str,
        status: Literal["succeeded", "dead_lettered", "cancelled"],
        result: Any = None,
        error: dict[str, str] | None = None,
    ) -> None:
        """Send the outcome of `envelope` to its webhook, if it has one; never blocks."""
        if envelope.webhook is None:
            return
        body: dict[str, Any] = {
            "event_id": envelope.id,
            "topic": envelope.topic,
            "agent": agent,
            "status": status,
            "correlation_id": envelope.correlation_id,
            "finished_at": datetime.now(UTC),
        }
        if status == "succeeded":
            body["result"] = result
        else:
            body["error"] = error
        if envelope.headers.get(WEBHOOK_FORMAT_HEADER) == SDK_WEBHOOK_FORMAT:
            body["task_id"] = envelope.id
            body["status"] = {"succeeded": "success", "cancelled": "cancelled"}.get(
                status, "failed"
            )
            body["timestamp"] = body["finished_at"]
        try:
            data = dumps(body)
        except TypeError as exc:
            # The handler returned something JSON cannot carry (bytes, a set...): the receiver
            # is told so, instead of the worker failing to send anything.
            body.pop("result", None)
            body["error"] = {"type": "ResultNotJSON", "message": str(exc)}
            data = dumps(body)
        self._submit(_Pending(envelope.webhook, data, envelope.id))

    def _submit(self, pending: _Pending) -> None:
        if self._running < self._max_in_flight:
            if not self._running:
                self._idle = anyio.Event()
            self._running += 1
            self._tasks.start_soon(self._run, pending)
        elif self._queued_bytes + len(pending.data) <= self._max_queued_bytes:
            self._queue.append(pending)
            self._queued_bytes += len(pending.data)
        else:
            self._dropped += 1
            _log.warning(
                "webhook dropped",
                event_id=pending.event_id,
                host=_host(pending.url),
                bytes=len(pending.data),
                in_flight=self._running,
                queued=len(self._queue),
                queued_bytes=self._queued_bytes,
                hint="receivers are slower than events finish: raise "
                "OMNIDAEMON_WEBHOOK_MAX_IN_FLIGHT or OMNIDAEMON_WEBHOOK_MAX_QUEUED_BYTES",
            )

    async def _run(self, pending: _Pending | None) -> None:
        # One of at most `max_in_flight` tasks: it takes queued deliveries until none is left.
        try:
            while pending is not None:
                await self._deliver(pending)
                pending = None
                if self._queue:
                    pending = self._queue.popleft()
                    self._queued_bytes -= len(pending.data)
        finally:
            self._running -= 1
            if not self._running:
                self._idle.set()

    async def _deliver(self, pending: _Pending) -> None:
        # Runs in the worker's task group: an exception escaping here would stop every agent
        # of the process, so nothing a publisher's URL or a receiver does may escape.
        try:
            await self._sender.deliver(pending.url, pending.data, event_id=pending.event_id)
        except Exception as exc:
            self._sender.counts["failed"] += 1
            _log.error(
                "webhook not delivered: unexpected error",
                event_id=pending.event_id,
                error=f"{type(exc).__name__}: {exc}",
            )

    async def wait_idle(self, timeout: float) -> None:
        """Wait up to `timeout` seconds for deliveries under way and queued to finish."""
        with anyio.move_on_after(timeout):
            await self._idle.wait()

    @property
    def in_flight(self) -> int:
        """Deliveries under way now (attempting, or waiting to retry)."""
        return self._running

    @property
    def queued(self) -> int:
        """Deliveries waiting for one of the `max_in_flight` slots."""
        return len(self._queue)

    @property
    def counts(self) -> dict[str, int]:
        """Outcomes so far: delivered, failed, refused, and dropped (no room to wait)."""
        counts = {str(status): count for status, count in self._sender.counts.items()}
        counts["dropped"] = self._dropped
        return counts
