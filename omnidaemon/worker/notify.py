"""Telling the outside world an event is finished: the webhooks of `publish(webhook=URL)`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any, Literal

import anyio
import structlog
from anyio.abc import TaskGroup

from omnidaemon.envelope import Envelope, dumps
from omnidaemon.webhooks import WebhookSender, WebhookSettings

__all__ = ["SDK_WEBHOOK_FORMAT", "WEBHOOK_FORMAT_HEADER", "OutcomeNotifier"]

#: An event header naming the webhook body a publisher expects. With `SDK_WEBHOOK_FORMAT` the
#: body also carries the OmniDaemon SDK's fields (`task_id`, `timestamp`) and its status words
#: (`success`, `failed`), so receivers written for the SDK keep working.
WEBHOOK_FORMAT_HEADER = "omnidaemon-webhook-format"
SDK_WEBHOOK_FORMAT = "omnidaemon-sdk"

_log = structlog.get_logger("omnidaemon.webhooks")


class OutcomeNotifier:
    """POSTs each finished event's outcome to its webhook, in the background.

    A webhook is sent once per event and agent, when the event is finished: succeeded, or
    dead-lettered after its last attempt (never on a failed attempt that will be retried).
    Delivery runs beside the handlers, so a slow receiver never holds up acknowledgements.
    """

    def __init__(self, sender: WebhookSender, tasks: TaskGroup) -> None:
        self._sender = sender
        self._tasks = tasks
        self._running = 0
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
            yield cls(sender, tasks)
            tasks.cancel_scope.cancel()

    def finished(
        self,
        envelope: Envelope[Any],
        *,
        agent: str,
        status: Literal["succeeded", "dead_lettered"],
        result: Any = None,
        error: dict[str, str] | None = None,
    ) -> None:
        """Send the outcome of `envelope` to its webhook, if it has one."""
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
            body["status"] = "success" if status == "succeeded" else "failed"
            body["timestamp"] = body["finished_at"]
        try:
            dumps(body)
        except TypeError as exc:
            # The handler returned something JSON cannot carry (bytes, a set...): the receiver
            # is told so, instead of the worker failing to send anything.
            body.pop("result", None)
            body["error"] = {"type": "ResultNotJSON", "message": str(exc)}
        self._running += 1
        self._idle = anyio.Event()
        self._tasks.start_soon(self._deliver, envelope.webhook, body, envelope.id)

    async def _deliver(self, url: str, body: dict[str, Any], event_id: str) -> None:
        # Runs in the worker's task group: an exception escaping here would stop every agent
        # of the process, so nothing a publisher's URL or a receiver does may escape.
        try:
            await self._sender.deliver(url, body, event_id=event_id)
        except Exception as exc:
            self._sender.counts["failed"] += 1
            _log.error(
                "webhook not delivered: unexpected error",
                event_id=event_id,
                error=f"{type(exc).__name__}: {exc}",
            )
        finally:
            self._running -= 1
            if not self._running:
                self._idle.set()

    async def wait_idle(self, timeout: float) -> None:
        """Wait up to `timeout` seconds for deliveries under way to finish."""
        with anyio.move_on_after(timeout):
            await self._idle.wait()

    @property
    def counts(self) -> dict[str, int]:
        """Outcomes so far: delivered, failed, refused."""
        return {str(status): count for status, count in self._sender.counts.items()}
