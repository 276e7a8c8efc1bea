"""`OmniDaemonSDK`: the OmniDaemon SDK's methods, running on omnidaemon's `App` and worker.

Every agent registered here becomes an `App` agent; delivery, retries, dead letters, results,
`reply_to` and webhooks are the engine's, not re-implemented. What this module adds is the
translation: envelopes to `App.publish` arguments, `SubscriptionConfig` to agent options, the
engine's `Context` to the message dict OmniDaemon callbacks expect, and the bus views to the
dict shapes OmniDaemon returned.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio.to_thread
import orjson

from omnidaemon.app import App
from omnidaemon.brokers import Broker
from omnidaemon.compat.bus_env import broker_url_from_env
from omnidaemon.compat.bus_views import BusViews
from omnidaemon.compat.models import AgentConfig, EventEnvelope, SubscriptionConfig
from omnidaemon.context import Context
from omnidaemon.envelope import dumps
from omnidaemon.errors import ConfigurationError
from omnidaemon.fleet import check_health
from omnidaemon.observability.logging import get_logger
from omnidaemon.requests import is_request_reply
from omnidaemon.worker.notify import SDK_WEBHOOK_FORMAT, WEBHOOK_FORMAT_HEADER

__all__ = ["ID_HEADER", "SOURCE_HEADER", "OmniDaemonSDK", "broker_url_from_env"]

ID_HEADER = "omnidaemon-compat-id"
"""Header carrying an `EventEnvelope.id` given by the publisher (the bus assigns its own)."""
SOURCE_HEADER = "omnidaemon-compat-source"
"""Header carrying an `EventEnvelope.source` given by the publisher."""

_RESULT_PREFIX = "compat:result:"
_RESULT_TTL = 86_400.0

_log = get_logger("omnidaemon.compat")

# The event a callback is handling, so that `publish_task` inside a callback can chain the
# correlation, causation and tenant the way `Context.publish` does.
_CURRENT: contextvars.ContextVar[Context | None] = contextvars.ContextVar(
    "omnidaemon_compat_current", default=None
)


def _agent_name(callback: Callable[..., Any]) -> str:
    # A stable default keeps every instance of one program in one consumer group.
    raw = getattr(callback, "__name__", None) or type(callback).__name__
    name = re.sub(r"[^A-Za-z0-9_.:-]", "_", raw).lstrip(".:-") or "agent"
    return name[:200]


@dataclass(slots=True)
class _Registered:
    """One registered agent: its config and, while it consumes, its worker task."""

    config: AgentConfig
    name: str
    task: asyncio.Task[None] | None = None
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    def describe(self) -> dict[str, Any]:
        cfg = self.config
        return {
            "name": self.name,
            "topic": cfg.topic,
            "callback_name": getattr(cfg.callback, "__name__", repr(cfg.callback)),
            "tools": list(cfg.tools),
            "description": cfg.description,
            "config": cfg.config.model_dump(),
            "running": self.task is not None and not self.task.done(),
        }


class OmniDaemonSDK(BusViews):
    """The OmniDaemon SDK on omnidaemon's engine.

    Args:
        event_bus: A broker URL (`redis://...`, `nats://...`) or a `Broker`; default:
            `REDIS_URL` when `EVENT_BUS_TYPE` is unset or `redis_stream`, `NATS_URL` when it is
            `nats`, else `OMNIDAEMON_BROKER_URL`, else the embedded bus
            (`broker_url_from_env`).
        store: Must be `None`: results are kept on the bus, next to the events.
        app_name: The name of the internal `App`, recorded as `source` of published events.
        shutdown_grace: Seconds running callbacks get to finish on `stop()`.

    Raises:
        ConfigurationError: `EVENT_BUS_TYPE` is neither `redis_stream` nor `nats` (or `nats`
            without a NATS URL), or a store was given.

    Example:
        ```python
        sdk = OmniDaemonSDK()
        await sdk.register_agent(agent_config=AgentConfig(topic="file.uploaded", callback=f))
        await sdk.start()
        task_id = await sdk.publish_task(
            event_envelope=EventEnvelope(topic="file.uploaded", payload=PayloadBase(content={}))
        )
        ```
    """

    def __init__(
        self,
        event_bus: str | Broker | None = None,
        store: object | None = None,
        *,
        app_name: str = "omnidaemon-sdk",
        shutdown_grace: float | None = None,
    ) -> None:
        if store is not None:
            raise ConfigurationError(
                "OmniDaemonSDK(store=...) is not supported: omnidaemon keeps results on the bus; "
                "read them with get_result(task_id)"
            )
        broker = event_bus if event_bus is not None else broker_url_from_env()
        self.app = App(app_name, broker=broker)
        self._shutdown_grace = shutdown_grace
        self._agents: dict[str, _Registered] = {}
        self._running = False
        self._start_time: float | None = None

    # Publishing ---------------------------------------------------------------------------

    async def publish_task(self, event_envelope: EventEnvelope) -> str:
        """Publish `event_envelope` and return its task id (the bus's event id).

        Called inside a callback, the new event carries the handled event's correlation id,
        tenant and, as causation id, its id, unless the envelope sets them. Publishing to the
        handled event's `reply_to` counts as the reply: the callback's return value is then
        not sent there a second time.
        """
        env = event_envelope
        ctx = _CURRENT.get()
        correlation_id = env.correlation_id or env.payload.correlation_id
        causation_id = env.causation_id
        tenant_id = env.tenant_id
        if ctx is not None:
            correlation_id = correlation_id or ctx.event.correlation_id
            causation_id = causation_id or ctx.event.id
            tenant_id = tenant_id or ctx.event.tenant_id
        headers: dict[str, str] = {}
        if env.id is not None:
            headers[ID_HEADER] = env.id
        if env.source is not None:
            headers[SOURCE_HEADER] = env.source
        if env.payload.webhook is not None:
            headers[WEBHOOK_FORMAT_HEADER] = SDK_WEBHOOK_FORMAT
        if is_request_reply(env.topic):
            # A reply to an `App.request`: sent only while the request waits, so that a late
            # one does not recreate its deleted reply topic (as `Context.reply` does).
            event_id, data = self.app._encode(
                env.topic,
                env.payload.content,
                correlation_id,
                causation_id,
                env.payload.reply_to,
                env.payload.webhook,
                tenant_id,
                headers or None,
            )
            await self.app.connect()
            await self.app.broker.publish_if_exists(env.topic, data)
        else:
            event_id = await self.app.publish(
                env.topic,
                env.payload.content,
                correlation_id=correlation_id,
                causation_id=causation_id,
                reply_to=env.payload.reply_to,
                webhook=env.payload.webhook,
                tenant_id=tenant_id,
                headers=headers or None,
            )
        if ctx is not None and ctx.event.reply_to is not None and env.topic == ctx.event.reply_to:
            ctx.replied = True
        return event_id

    # Agents -------------------------------------------------------------------------------

    async def register_agent(self, agent_config: AgentConfig) -> None:
        """Register an agent; it consumes once `start()` ran (at once if already running).

        Raises:
            ValueError: An agent of that name is already registered, or a bad topic or name.
        """
        name = agent_config.name or _agent_name(agent_config.callback)
        if name in self._agents:
            raise ValueError(
                f"an agent named {name!r} is already registered (on "
                f"{self._agents[name].config.topic!r}); give AgentConfig(name=...) to tell them "
                "apart"
            )
        sub = agent_config.config
        self._declare(name, agent_config, sub)
        if not sub.dlq_enabled:
            _log.warning(
                "dlq_enabled=False is not supported: events this agent gives up on are kept "
                "in its dead-letter queue",
                agent=name,
                topic=agent_config.topic,
            )
        registered = _Registered(agent_config, name)
        self._agents[name] = registered
        if self._running:
            await self._launch(registered)

    def _declare(self, name: str, agent_config: AgentConfig, sub: SubscriptionConfig) -> None:
        sdk = self

        async def handler(content: Any, ctx: Context) -> Any:
            # Looked up per event, so a re-registered agent runs its new callback.
            return await sdk._call(sdk._agents[name].config, content, ctx)

        handler.__name__ = name
        self.app.agent(
            agent_config.topic,
            name=name,
            max_retries=sub.max_retries,
            reclaim_idle=30.0 if sub.reclaim_idle_ms is None else sub.reclaim_idle_ms / 1000,
            concurrency=sub.consumer_count,
            description=agent_config.description or inspect.getdoc(agent_config.callback) or None,
            store_results=True,
            result_ttl=_RESULT_TTL,
        )(handler)

    async def _call(self, config: AgentConfig, content: Any, ctx: Context) -> Any:
        event = ctx.event
        message = {
            "content": content,
            "topic": event.topic,
            "task_id": event.id,
            "correlation_id": event.correlation_id,
            "causation_id": event.causation_id,
            "source": event.headers.get(SOURCE_HEADER, event.source),
            "reply_to": event.reply_to,
            "webhook": event.webhook,
            "tenant_id": event.tenant_id,
            "delivery_attempts": ctx.attempt,
            "created_at": event.created_at.timestamp(),
            "agent": ctx.agent,
        }
        token = _CURRENT.set(ctx)
        try:
            if inspect.iscoroutinefunction(config.callback):
                result = await config.callback(message)
            else:
                # In a thread, with this context, so the event loop keeps serving others.
                run = contextvars.copy_context().run
                result = await anyio.to_thread.run_sync(run, config.callback, message)
            if inspect.isawaitable(result):
                result = await result
        finally:
            _CURRENT.reset(token)
        # An index of results by id, so list_results can find them (the result store is
        # keyed by event only). Written before the engine acknowledges, like the result.
        record = {
            "task_id": event.id,
            "topic": event.topic,
            "agent": ctx.agent,
            "result": result,
            "saved_at": time.time(),
        }
        await self.app.broker.set_value(
            f"{_RESULT_PREFIX}{event.id}:{ctx.agent}", dumps(record), _RESULT_TTL
        )
        return result

    async def list_agents(self) -> dict[str, list[dict[str, Any]]]:
        """The registered agents by topic: `name`, `callback_name`, `tools`, `description`,
        `config` and whether it is `running`."""
        by_topic: dict[str, list[dict[str, Any]]] = {}
        for registered in self._agents.values():
            by_topic.setdefault(registered.config.topic, []).append(registered.describe())
        return by_topic

    async def get_agent(self, topic: str, name: str) -> dict[str, Any] | None:
        """The agent `name` on `topic` as `list_agents` shows it, or `None`."""
        registered = self._agents.get(name)
        if registered is None or registered.config.topic != topic:
            return None
        return registered.describe()

    async def unsubscribe_agent(self, topic: str, name: str) -> bool:
        """Stop consuming for the agent (gracefully) and keep it registered; its consumer
        group keeps its place on the bus. Returns whether the agent was found."""
        registered = self._agents.get(name)
        if registered is None or registered.config.topic != topic:
            return False
        await self._halt(registered)
        return True

    async def delete_agent(self, topic: str, name: str) -> bool:
        """Stop the agent and forget it. Its consumer group and dead letters stay on the bus
        (`omnidaemon bus purge` removes them). Returns whether the agent was found."""
        if not await self.unsubscribe_agent(topic, name):
            return False
        del self._agents[name]
        self.app.remove_agent(name)
        return True

    # Running ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start consuming for every registered agent, in the background, and return."""
        self._running = True
        if self._start_time is None:
            self._start_time = time.monotonic()
        for registered in list(self._agents.values()):
            if registered.task is None or registered.task.done():
                await self._launch(registered)

    async def stop(self) -> None:
        """Stop every agent gracefully: running callbacks finish, then the workers exit."""
        self._running = False
        self._start_time = None
        for registered in list(self._agents.values()):
            registered.stop.set()
        for registered in list(self._agents.values()):
            await self._halt(registered)

    async def shutdown(self) -> None:
        """`stop()`, then close the bus connection."""
        await self.stop()
        await self.app.close()

    async def _launch(self, registered: _Registered) -> None:
        # One worker per agent, so unsubscribing one agent does not disturb the others.
        registered.stop = asyncio.Event()
        ready = asyncio.Event()

        async def run() -> None:
            async with self.app.running(
                agents=[registered.name], shutdown_grace=self._shutdown_grace
            ):
                ready.set()
                await registered.stop.wait()

        task = asyncio.create_task(run(), name=f"omnidaemon-compat:{registered.name}")
        registered.task = task
        waiter = asyncio.create_task(ready.wait())
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if task.done():
            registered.task = None
            task.result()  # the worker failed to start: raise its error here

    async def _halt(self, registered: _Registered) -> None:
        task, registered.task = registered.task, None
        if task is None:
            return
        registered.stop.set()
        await task

    # Results ------------------------------------------------------------------------------

    async def get_result(self, task_id: str, *, agent: str | None = None) -> Any:
        """The callback's return value for `task_id`, or `None` while it is not finished (or
        failed, or the id is unknown or expired).

        Raises:
            ValueError: Several agents stored results for the task and `agent` was not given.
        """
        result = await self.app.result(task_id, agent=agent)
        return result.result if result.status == "succeeded" else None

    async def list_results(self, limit: int = 100) -> list[dict[str, Any]]:
        """The most recent results, newest first: `task_id`, `topic`, `agent`, `result` and
        `saved_at` (Unix time)."""
        await self.app.connect()
        values = await self.app.broker.scan_values(_RESULT_PREFIX)
        records = [orjson.loads(value) for value in values.values()]
        records.sort(key=lambda r: (r.get("saved_at", 0.0), r.get("task_id", "")), reverse=True)
        return records[:limit]

    # Observing ----------------------------------------------------------------------------

    async def health(self) -> dict[str, Any]:
        """The bus and fleet health (as `omnidaemon health --json`), plus this SDK's state:
        `is_running`, `uptime_seconds` and `registered_agents`."""
        report = await check_health(self.app.broker)
        uptime = None if self._start_time is None else time.monotonic() - self._start_time
        return {
            **report.to_json(),
            "is_running": self._running,
            "uptime_seconds": uptime,
            "registered_agents": len(self._agents),
        }
