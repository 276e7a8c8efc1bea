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
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import anyio.to_thread
import orjson

from omnidaemon.app import App
from omnidaemon.brokers import Broker, Subscription
from omnidaemon.compat.models import AgentConfig, EventEnvelope, SubscriptionConfig
from omnidaemon.context import Context
from omnidaemon.dead_letters import DeadLetter, warn_undecodable
from omnidaemon.envelope import dumps
from omnidaemon.errors import ConfigurationError
from omnidaemon.fleet import check_health, describe_topics, fleet_metrics, live_workers
from omnidaemon.lanes_view import (
    dead_letters_with_lanes,
    describe_lanes,
    describe_with_lanes,
    entries_with_lanes,
    lanes_with_group,
    merge_lanes,
    read_lane_dead_letters,
)
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
_STREAM_PREFIX = "omni-stream:"  # OmniDaemon's stream key prefix, accepted in stream names
# EVENT_BUS_TYPE -> the variable naming its URL. "nats" (NATS_URL, the NATS tools' variable):
# OmniDaemon announced NATS without naming its variables.
_BUS_URL_VARIABLES = {"redis_stream": "REDIS_URL", "nats": "NATS_URL"}
_NATS_SCHEMES = ("nats", "tls")

_log = get_logger("omnidaemon.compat")

# The event a callback is handling, so that `publish_task` inside a callback can chain the
# correlation, causation and tenant the way `Context.publish` does.
_CURRENT: contextvars.ContextVar[Context | None] = contextvars.ContextVar(
    "omnidaemon_compat_current", default=None
)


def broker_url_from_env(env: Mapping[str, str] | None = None) -> str | None:
    """The broker URL OmniDaemon's `EVENT_BUS_TYPE` selects, or `None`.

    - `EVENT_BUS_TYPE` unset or `redis_stream`: `REDIS_URL` (Redis Streams); `None` without it.
    - `EVENT_BUS_TYPE=nats`: `NATS_URL` (NATS JetStream), as the NATS tools take it:
      `nats://[user:password@|token@]host:port`, `tls://...`, `host:port` alone, or a
      comma-separated list of servers. Without `NATS_URL`, `OMNIDAEMON_BROKER_URL` must name a
      NATS bus (then `None`).

    `None` leaves the choice to `App` (`OMNIDAEMON_BROKER_URL`, else the embedded bus).

    Raises:
        ConfigurationError: `EVENT_BUS_TYPE` names a bus other than `redis_stream` or `nats`,
            or `nats` without a NATS URL, or `NATS_URL` is not one (errors never echo it).
    """
    env = os.environ if env is None else env
    bus_type = (env.get("EVENT_BUS_TYPE") or "").strip().lower() or "redis_stream"
    if bus_type not in _BUS_URL_VARIABLES:
        raise ConfigurationError(
            f"EVENT_BUS_TYPE={env.get('EVENT_BUS_TYPE', '').strip()!r} is not supported: "
            "omnidaemon runs the OmniDaemon SDK on Redis Streams (EVENT_BUS_TYPE=redis_stream "
            "with REDIS_URL) and NATS JetStream (EVENT_BUS_TYPE=nats with NATS_URL); or unset "
            "it to use OMNIDAEMON_BROKER_URL or the embedded bus"
        )
    url = (env.get(_BUS_URL_VARIABLES[bus_type]) or "").strip()
    if bus_type == "redis_stream":
        return url or None
    if url:
        return _nats_url(url)
    fallback = env.get("OMNIDAEMON_BROKER_URL") or ""
    if fallback.partition("://")[0].lower() in _NATS_SCHEMES:
        return None
    raise ConfigurationError(
        "EVENT_BUS_TYPE=nats needs NATS_URL (nats://host:4222), or OMNIDAEMON_BROKER_URL "
        "naming a nats:// or tls:// bus"
    )


def _nats_url(value: str) -> str:
    """`NATS_URL` as one omnidaemon broker URL: `host:port` gets `nats://`, and a list of
    server URLs (`nats://u:p@a:4222,nats://u:p@b:4222`) becomes one URL listing the hosts
    (`nats://u:p@a:4222,b:4222`). Errors never echo the value: it may hold a password."""
    schemes: set[str] = set()
    credentials: set[str] = set()
    hosts: list[str] = []
    for server in filter(None, (part.strip() for part in value.split(","))):
        scheme, sep, rest = server.partition("://")
        scheme, rest = (scheme.lower(), rest) if sep else ("nats", server)
        if scheme not in _NATS_SCHEMES:
            raise ConfigurationError(
                f"NATS_URL names a {scheme}:// server; EVENT_BUS_TYPE=nats takes nats:// or "
                "tls:// servers (or host:port)"
            )
        userinfo, at, host = rest.rpartition("@")
        if at:
            credentials.add(userinfo)
        schemes.add(scheme)
        hosts.append(host)
    if not hosts:
        raise ConfigurationError("NATS_URL names no server")
    if len(schemes) > 1:
        raise ConfigurationError("NATS_URL mixes nats:// and tls:// servers")
    if len(credentials) > 1:
        raise ConfigurationError("NATS_URL gives its servers different credentials")
    userinfo = f"{credentials.pop()}@" if credentials else ""
    return f"{schemes.pop()}://{userinfo}{','.join(hosts)}"


def _agent_name(callback: Callable[..., Any]) -> str:
    # A stable default keeps every instance of one program in one consumer group.
    raw = getattr(callback, "__name__", None) or type(callback).__name__
    name = re.sub(r"[^A-Za-z0-9_.:-]", "_", raw).lstrip(".:-") or "agent"
    return name[:200]


def _stream_topic(stream: str) -> str:
    return stream[len(_STREAM_PREFIX) :] if stream.startswith(_STREAM_PREFIX) else stream


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


class OmniDaemonSDK:
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

    async def metrics(self, topic: str | None = None) -> dict[str, dict[str, dict[str, Any]]]:
        """Per topic and agent, summed over every worker: `tasks_received`,
        `tasks_processed`, `tasks_failed`, `tasks_retried`, `tasks_dead_lettered`,
        `in_flight` and `avg_processing_time_sec`."""
        await self.app.connect()
        found: dict[str, dict[str, dict[str, Any]]] = {}
        for snap in await fleet_metrics(self.app.broker, topic=topic):
            found.setdefault(snap.topic, {})[snap.agent] = {
                "tasks_received": snap.received,
                "tasks_processed": snap.succeeded,
                "tasks_failed": snap.failed,
                "tasks_retried": snap.retried,
                "tasks_dead_lettered": snap.dead_lettered,
                "in_flight": snap.in_flight,
                "avg_processing_time_sec": snap.duration.mean,
            }
        return found

    async def list_streams(self) -> list[dict[str, Any]]:
        """Every topic on the bus: `stream` (the topic's name) and `length`."""
        await self.app.connect()
        return [
            {"stream": t.topic, "length": t.length} for t in await describe_topics(self.app.broker)
        ]

    async def inspect_stream(self, stream: str, limit: int = 10) -> list[dict[str, Any]]:
        """The `limit` most recent entries of a topic (its priority lanes' included): `id` (the
        entry's) and `data` (the decoded envelope). OmniDaemon's `omni-stream:` prefix is
        accepted."""
        await self.app.connect()
        entries = await entries_with_lanes(self.app.broker, _stream_topic(stream), limit)
        out = []
        for _, entry_id, data in entries:
            try:
                decoded: Any = orjson.loads(data)
            except orjson.JSONDecodeError:
                decoded = {"unreadable": data.decode("utf-8", "replace")}
            out.append({"id": entry_id, "data": decoded})
        return out

    async def list_groups(self, stream: str) -> list[dict[str, Any]]:
        """The consumer groups (agents) of a topic: `name`, `consumers`, `pending`, `lag`,
        `retries`, `dead_letters` and `oldest_pending_age`."""
        await self.app.connect()
        info = await describe_with_lanes(self.app.broker, _stream_topic(stream))
        if info is None:
            return []
        return [
            {
                "name": g.group,
                "consumers": g.consumers,
                "pending": g.pending,
                "lag": g.lag,
                "retries": g.retries,
                "dead_letters": g.dead_letters,
                "oldest_pending_age": g.oldest_pending_age,
            }
            for g in info.groups
        ]

    async def inspect_dlq(self, topic: str, limit: int = 100) -> list[dict[str, Any]]:
        """The dead letters of every agent on `topic` (its priority lanes' included), up to
        `limit` per agent: `id` (the event's), `agent`, `data` (the envelope), `error_type`,
        `error_message`, `traceback`, `attempts` and `failed_at`."""
        await self.app.connect()
        lanes = await describe_lanes(self.app.broker, topic)
        info = merge_lanes(topic, lanes)
        if info is None:
            return []
        letters: list[DeadLetter] = []
        for group in info.groups:
            sub, where = Subscription(topic, group.group), lanes_with_group(lanes, group.group)
            records = await dead_letters_with_lanes(self.app.broker, sub, limit, lanes=where)
            readable, undecodable = read_lane_dead_letters(records, topic, group.group)
            warn_undecodable(undecodable, "skipped")
            letters.extend(readable)
        return [
            {
                "id": letter.event_id,
                "agent": letter.agent,
                "data": letter.envelope.model_dump(mode="json") if letter.envelope else None,
                "error_type": letter.error_type,
                "error_message": letter.error_message,
                "traceback": letter.traceback,
                "attempts": letter.attempts,
                "failed_at": letter.failed_at.isoformat(),
            }
            for letter in letters
        ]

    async def get_bus_stats(self) -> dict[str, Any]:
        """The bus at a glance (as `omnidaemon bus stats --json`): `bus`, `server`, `topics`
        (each with its groups) and live `workers`."""
        await self.app.connect()
        broker = self.app.broker
        topics = await describe_topics(broker)
        workers = await live_workers(broker)
        return {
            "bus": broker.url,
            "server": await broker.server_info(),
            "topics": {
                t.topic: {
                    "length": t.length,
                    "delayed": t.delayed,
                    "groups": {
                        g.group: {k: v for k, v in asdict(g).items() if k != "consumer_details"}
                        for g in t.groups
                    },
                }
                for t in topics
            },
            "workers": [w.to_json() for w in workers],
        }
