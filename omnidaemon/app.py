"""App: the agent registry, the broker connection, and the lifespan hooks a worker runs.

Publishing is `omnidaemon.app_publishing`, schedules `omnidaemon.app_schedules`, what
became of events (results, cancellation, dead letters) `omnidaemon.app_outcomes`, and reading
streamed output `omnidaemon.app_streaming`: `App` inherits them."""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from contextlib import (
    AbstractAsyncContextManager,
    AsyncExitStack,
    asynccontextmanager,
    contextmanager,
)
from datetime import timedelta
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import anyio

from omnidaemon.agents import AgentSpec, build_agent_spec, validate_agent_name
from omnidaemon.app_outcomes import EventOutcomes
from omnidaemon.app_publishing import Publishing
from omnidaemon.app_schedules import Scheduling
from omnidaemon.app_streaming import Streaming
from omnidaemon.brokers import Broker, open_broker
from omnidaemon.brokers.embedded import EmbeddedBroker
from omnidaemon.debounce import debounced_spec
from omnidaemon.errors import ConfigurationError
from omnidaemon.flow.limits import Budget, RateLimit, check_budgets
from omnidaemon.lanes import LaneMarks
from omnidaemon.retry import Backoff
from omnidaemon.schedules import ScheduleSpec
from omnidaemon.settings import Settings
from omnidaemon.sync import PublishesSync
from omnidaemon.topology import TopicTypes, Topology

if TYPE_CHECKING:
    from omnidaemon.worker.cancels import CancelWatch

__all__ = ["App", "Hook", "Lifespan"]

HandlerT = TypeVar("HandlerT", bound=Callable[..., Any])
Hook = Callable[[], Awaitable[None]]
"""An `on_startup` / `on_shutdown` hook: an async function without arguments."""
Lifespan = Callable[["App"], AbstractAsyncContextManager[None]]
"""A lifespan: called with the app, returns an async context manager the worker runs inside."""


class App(Publishing, Scheduling, EventOutcomes, Streaming):
    """An omnidaemon application: a name, a broker, and the agents that run on it.

    Args:
        name: The app's name, recorded as `source` on every event it publishes.
        broker: A broker URL (`redis://...`, `unix://...`, `memory://`) or a `Broker`; by
            default `OMNIDAEMON_BROKER_URL`, else the embedded bus (a local Valkey server that
            omnidaemon starts on first use, data in `OMNIDAEMON_HOME`, else the nearest
            `.omnidaemon/` in this folder or a parent, else `~/.omnidaemon`).
        lifespan: An async context manager factory run around the worker (open clients before
            the first event, close them after the last).
        settings: Settings to use instead of reading the environment.

    Example:
        ```python
        app = App("docs")

        @app.agent("document.uploaded", publishes="text.extracted", max_retries=3)
        async def extract_text(event: Uploaded, ctx: Context) -> Extracted:
            ...
        ```
    """

    def __init__(
        self,
        name: str,
        *,
        broker: str | Broker | None = None,
        lifespan: Lifespan | None = None,
        settings: Settings | None = None,
    ) -> None:
        self.name = validate_agent_name(name)
        self.settings = settings if settings is not None else Settings.from_env()
        self._broker_source = broker
        # An explicit URL is checked now, so a typo fails where the app is made.
        self._broker: Broker | None = (
            open_broker(broker, maxlen=self.settings.stream_maxlen)
            if isinstance(broker, str)
            else broker
        )
        self._connected = False
        self._workers = 0  # workers running on this app's connection
        self._opened_by_worker = False
        self._lifespan = lifespan
        self._agents: dict[str, AgentSpec] = {}
        self._schedules: dict[str, ScheduleSpec] = {}
        self._undecorated_schedules: dict[object, str] = {}  # see Scheduling.check_schedules
        self._running_agents: Counter[str] = Counter()  # agents workers of this app run now
        self._topic_types: TopicTypes | None = None  # built on first publish
        self._sync: PublishesSync | None = None  # publish_sync's loop, started on first use
        self._lane_marks = LaneMarks()
        self._cancel_watches: set[CancelWatch] = set()  # of workers running in this process
        self._startup: list[Hook] = []
        self._shutdown: list[Hook] = []

    def __repr__(self) -> str:
        return f"App({self.name!r}, agents={list(self._agents)})"

    # Declaring agents ---------------------------------------------------------------------

    @property
    def agents(self) -> Mapping[str, AgentSpec]:
        """The registered agents by name (read-only)."""
        return MappingProxyType(self._agents)

    def agent(
        self,
        topic: str,
        *,
        name: str | None = None,
        publishes: str | None = None,
        max_retries: int = 3,
        retry_backoff: float | timedelta | Backoff = 1.0,
        concurrency: int = 16,
        timeout: float | timedelta | None = None,
        reclaim_idle: float | timedelta = 30.0,
        start: Literal["earliest", "latest"] = "earliest",
        description: str | None = None,
        store_results: bool | None = None,
        result_ttl: float | timedelta = 86_400.0,
        idempotency_key: Callable[[Any], Any] | None = None,
        idempotency_ttl: float | timedelta = 86_400.0,
        rate_limit: str | RateLimit | None = None,
        rate_limit_key: Callable[[Any], Any] | None = None,
        key_concurrency: int | None = None,
        concurrency_key: Callable[[Any], Any] | None = None,
        budgets: Sequence[Budget] | None = None,
        estimate: Callable[[Any], float | Mapping[str, float]] | None = None,
        debounce: float | timedelta | None = None,
        debounce_key: Callable[[Any], Any] | None = None,
        debounce_max_wait: float | timedelta | None = None,
        stream: Any = None,
    ) -> Callable[[HandlerT], HandlerT]:
        """Register the decorated function as an agent consuming `topic`.

        The handler's first parameter's annotation is the payload type; a parameter annotated
        `Context` receives the context. The function is returned unchanged, so it can still be
        called directly in unit tests.

        Args:
            topic: The topic to consume, e.g. `"document.uploaded"`.
            name: The agent's name and consumer group; default: the function's name. Two agents
                on one topic each get every event; workers running the same agent share them.
            publishes: A topic the return value is published to (typed pipelines).
            max_retries: Retries after the first attempt before the event is dead-lettered.
            retry_backoff: Seconds before the first retry (doubling after each failure, with
                jitter), or a `Backoff`.
            concurrency: Most handlers of this agent running at once in one worker.
            timeout: Seconds one attempt may run before it fails with `TimeoutError`. A plain
                `def` handler's thread cannot be stopped: it runs on, and keeps its
                `concurrency` slot until it returns.
            reclaim_idle: Seconds after which another worker takes over a delivery whose
                worker stopped renewing its lease (crashed).
            start: Where a new agent starts reading: `"earliest"` retained event or `"latest"`.
            description: Shown by the CLI; default: the handler's docstring.
            store_results: Keep each event's status and result for `App.result`; default:
                `OMNIDAEMON_STORE_RESULTS`.
            result_ttl: Seconds a stored result is kept (24 h).
            idempotency_key: A function of the payload (`lambda e: e.payment_id`): the handler
                runs at most once per key among successful runs; a duplicate gets the stored
                result. See `omnidaemon.idempotency` for the exact guarantee.
            idempotency_ttl: Seconds a key's result is remembered (24 h).
            rate_limit: Handler starts allowed per period across the whole fleet: `"60/m"`,
                `"10/s"`, or `RateLimit(60, per=60, burst=10)`. An event over the limit
                waits on the bus (no lease, no attempt counted) and starts as soon as the
                limit allows. See docs/flow-control.md.
            rate_limit_key: A function of the payload (`lambda e: e.tenant_id`): one
                `rate_limit` per key instead of one for the agent.
            key_concurrency: Most handlers running at once per key of `concurrency_key`,
                across the fleet; keys take turns, so one key's backlog does not hold up
                another's events.
            concurrency_key: A function of the payload giving its `key_concurrency` key.
            budgets: `Budget(...)`s a start needs out of debt (shared by every agent naming
                them); the handler pays what it used with `ctx.charge(name, units)`.
            estimate: A function of the payload giving the units it will likely use (a
                number for every budget, or `{name: units}`), reserved at admission and
                settled by `ctx.charge`.
            debounce: Seconds (or a `timedelta`) of quiet before a burst is handled: the
                handler (payload annotated `list[X]`) runs once per burst of messages of the
                same `debounce_key`, with all of them, in publish order. The topic carries
                `X`. See docs/debounce.md.
            debounce_key: A function of the message (`lambda m: m.conversation_id`): one
                burst per key; default: one for the agent.
            debounce_max_wait: Seconds after a burst's first message by which it is handled
                even if messages keep coming; default: `debounce`.
            stream: The type of the chunks the handler streams with `ctx.emit` (a model,
                `str`, ...): each chunk is validated against it. Without it, any JSON value
                may be emitted, and only attempts that emit write an end to the stream. See
                "Streaming output" in docs/patterns.md.

        Raises:
            TypeError: The handler's signature cannot be used (see the message).
            ValueError: A bad topic, name or option.
        """

        def decorate(handler: HandlerT) -> HandlerT:
            # The decorating scope's names resolve string annotations of a handler defined in
            # a function (`from __future__ import annotations` with local types or imports).
            localns = sys._getframe(1).f_locals
            spec = build_agent_spec(
                handler,
                topic=topic,
                name=name,
                publishes=publishes,
                max_retries=max_retries,
                retry_backoff=retry_backoff,
                concurrency=concurrency,
                timeout=timeout,
                reclaim_idle=reclaim_idle,
                start=start,
                description=description,
                localns=localns,
                store_results=(
                    self.settings.store_results if store_results is None else store_results
                ),
                result_ttl=result_ttl,
                idempotency_key=idempotency_key,
                idempotency_ttl=idempotency_ttl,
                rate_limit=rate_limit,
                rate_limit_key=rate_limit_key,
                key_concurrency=key_concurrency,
                concurrency_key=concurrency_key,
                budgets=budgets,
                estimate=estimate,
                stream=stream,
            )
            spec = debounced_spec(
                spec,
                debounce=debounce,
                key=debounce_key,
                max_wait=debounce_max_wait,
                max_payload_bytes=self.settings.max_payload_bytes,
            )
            if spec.name in self._agents:
                raise ValueError(
                    f"an agent named {spec.name!r} is already registered on app {self.name!r}; "
                    "pass name=... to tell them apart"
                )
            if spec.flow is not None:
                check_budgets(self.budgets, spec.flow.budgets.values(), spec.name)
            self._agents[spec.name] = spec
            self._topic_types = None
            return handler

        return decorate

    @property
    def budgets(self) -> dict[str, Budget]:
        """Every budget an agent of the app declares, by name (what `ctx.charge` may name)."""
        return {
            name: budget
            for spec in self._agents.values()
            if spec.flow is not None
            for name, budget in spec.flow.budgets.items()
        }

    def remove_agent(self, name: str) -> AgentSpec:
        """Forget the agent `name`, so that another can be registered under its name.

        Only the declaration goes: the agent's consumer group, its pending events, stored
        results and dead letters stay on the bus (`omnidaemon bus purge` removes them), and an
        agent registered again under the name resumes the group where it stopped.

        Returns:
            The removed agent's spec.

        Raises:
            ConfigurationError: The app has no agent called `name`.
            RuntimeError: A worker of this app is running the agent: stop it first.
        """
        spec = self.get_agent(name)
        if self._running_agents[name]:
            raise RuntimeError(
                f"agent {name!r} is running in a worker of app {self.name!r}: stop the worker "
                "before removing it"
            )
        del self._agents[name]
        self._topic_types = None
        return spec

    @contextmanager
    def _agents_running(self, names: Iterable[str]) -> Iterator[None]:
        """Mark `names` as run by a worker for the block, so they are not removed under it."""
        names = list(names)
        self._running_agents.update(names)
        try:
            yield
        finally:
            self._running_agents.subtract(names)

    def topology(self) -> Topology:
        """The app's topics, agents and edges, as their type annotations declare them.

        Example:
            ```python
            for topic in app.topology().topics.values():
                print(topic.name, topic.producers, "->", topic.consumers)
            ```
        """
        return Topology.of(self._agents.values(), self._schedules.values())

    def check_payload(self, topic: str, payload: Any, *, validated_as: Any = None) -> None:
        """Raise `PayloadValidationError` if `payload` contradicts a type an agent of this app
        declares for `topic` (as a payload parameter, or as the return type of `publishes=`),
        other than `validated_as`. Every publish calls this, a worker's outputs included."""
        if self._topic_types is None:
            self._topic_types = TopicTypes(self._agents.values())
        self._topic_types.check(topic, payload, validated_as=validated_as)

    def on_startup(self, hook: Hook) -> Hook:
        """Register an async function the worker runs before it consumes any event."""
        self._startup.append(hook)
        return hook

    def on_shutdown(self, hook: Hook) -> Hook:
        """Register an async function the worker runs after the last handler finished."""
        self._shutdown.append(hook)
        return hook

    @asynccontextmanager
    async def lifespan(self) -> AsyncIterator[None]:
        """Run the lifespan context and the startup hooks; on exit, the shutdown hooks.

        The worker runs its consumers inside this; call it yourself only to run the hooks
        without a worker.
        """
        async with AsyncExitStack() as stack:
            if self._lifespan is not None:
                await stack.enter_async_context(self._lifespan(self))
            for hook in self._startup:
                await hook()
            try:
                yield
            finally:
                for hook in self._shutdown:
                    await hook()

    # The broker ---------------------------------------------------------------------------

    @property
    def broker(self) -> Broker:
        """The broker this app publishes to and consumes from (made on first use)."""
        if self._broker is None:
            url = self._broker_source or self.settings.broker_url
            if url is None:
                # No URL: the embedded bus, a local Valkey started on first connect.
                self._broker = EmbeddedBroker(maxlen=self.settings.stream_maxlen)
            elif isinstance(url, str):
                self._broker = open_broker(url, maxlen=self.settings.stream_maxlen)
        assert self._broker is not None
        return self._broker

    async def connect(self) -> None:
        """Connect to the broker. Publishing and serving connect on their own."""
        if not self._connected:
            await self.broker.connect()
            self._connected = True

    async def close(self) -> None:
        """Close the broker connection (and `publish_sync`'s, if it was used)."""
        if self._sync is not None:
            self._sync.close()
        if self._connected:
            self._connected = False
            await self.broker.close()

    @asynccontextmanager
    async def _worker_connection(self) -> AsyncIterator[Broker]:
        """The connection a worker runs on: opened by the first worker if needed, and closed
        when the last worker stops, unless someone else opened it."""
        if not self._connected:
            await self.connect()
            self._opened_by_worker = True
        self._workers += 1
        try:
            yield self.broker
        finally:
            self._workers -= 1
            if self._workers == 0 and self._opened_by_worker:
                self._opened_by_worker = False
                with anyio.CancelScope(shield=True):
                    await self.close()

    async def __aenter__(self) -> App:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # Inspecting ---------------------------------------------------------------------------

    def get_agent(self, name: str) -> AgentSpec:
        """The agent called `name`; `ConfigurationError` listing the known names if none is."""
        try:
            return self._agents[name]
        except KeyError:
            known = ", ".join(sorted(self._agents)) or "none"
            raise ConfigurationError(
                f"app {self.name!r} has no agent {name!r} (agents: {known})"
            ) from None

    # Running ------------------------------------------------------------------------------

    async def serve(
        self,
        *,
        agents: Sequence[str] | None = None,
        concurrency: int | None = None,
        shutdown_grace: float | None = None,
    ) -> None:
        """Run the agents in the current event loop until cancelled.

        Args:
            agents: Names of the agents to run; default: all.
            concurrency: Override every agent's `concurrency`.
            shutdown_grace: Seconds in-flight handlers get to finish on a graceful stop.
        """
        from omnidaemon.worker.runner import Worker

        await Worker(
            self, agents=agents, concurrency=concurrency, shutdown_grace=shutdown_grace
        ).run()

    @asynccontextmanager
    async def running(
        self,
        *,
        agents: Sequence[str] | None = None,
        concurrency: int | None = None,
        shutdown_grace: float | None = None,
    ) -> AsyncIterator[None]:
        """Run the agents for the duration of the block, then stop them gracefully.

        Example:
            ```python
            async with app.running():
                await app.publish("document.uploaded", {"file_path": "a.pdf", "user_id": "u1"})
                ...
            ```
        """
        from omnidaemon.worker.runner import Worker

        worker = Worker(self, agents=agents, concurrency=concurrency, shutdown_grace=shutdown_grace)
        async with worker.started():
            yield
