"""App: the agent registry, publishing, and the lifespan hooks a worker runs."""

from __future__ import annotations

import math
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
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal, TypeVar, overload

import anyio
from pydantic import TypeAdapter

from omnidaemon._json_limits import MAX_NESTING, nesting_exceeds, too_deep, unfit_for_json
from omnidaemon.agents import AgentSpec, build_agent_spec, validate_agent_name
from omnidaemon.brokers import Broker, Subscription, open_broker
from omnidaemon.brokers.embedded import EmbeddedBroker
from omnidaemon.dead_letters import DeadLetter, warn_undecodable
from omnidaemon.debounce import debounced_spec
from omnidaemon.envelope import encode_new
from omnidaemon.errors import (
    ConfigurationError,
    DelayTooLong,
    PayloadTooLarge,
    PayloadValidationError,
)
from omnidaemon.flow.limits import Budget, RateLimit, check_budgets
from omnidaemon.lanes import Lane, LaneMarks, Priority, lane_of
from omnidaemon.observability import tracing
from omnidaemon.requests import new_reply_topic, wait_reply
from omnidaemon.results import Result, wait_result
from omnidaemon.retry import Backoff
from omnidaemon.schedules import ScheduleSpec, declare, timing_of
from omnidaemon.settings import Settings
from omnidaemon.sync import PublishesSync, SyncPublisher
from omnidaemon.topology import TopicTypes, Topology

if TYPE_CHECKING:
    from omnidaemon.cancellation import Cancellation
    from omnidaemon.worker.cancels import CancelWatch

__all__ = ["App", "Hook", "Lifespan"]

HandlerT = TypeVar("HandlerT", bound=Callable[..., Any])
ReplyT = TypeVar("ReplyT")
Hook = Callable[[], Awaitable[None]]
"""An `on_startup` / `on_shutdown` hook: an async function without arguments."""
Lifespan = Callable[["App"], AbstractAsyncContextManager[None]]
"""A lifespan: called with the app, returns an async context manager the worker runs inside."""

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


class App:
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

    # Schedules ----------------------------------------------------------------------------

    @property
    def schedules(self) -> Mapping[str, ScheduleSpec]:
        """The registered schedules by name (read-only)."""
        return MappingProxyType(self._schedules)

    def schedule(
        self,
        cron: str,
        *,
        topic: str,
        name: str | None = None,
        timezone: str = "UTC",
        catch_up: bool = False,
        payload: Any = None,
    ) -> Callable[[HandlerT], HandlerT]:
        """Publish to `topic` at the times a cron spec names, once per tick across the fleet.

        Decorate a function (`async def` or `def`, taking nothing or the tick's scheduled time
        as an aware `datetime`): its return value is the tick's payload (`None`: nothing is
        published). Or give `payload=` and call it as a statement. Every worker of the app
        runs its schedules; the bus decides which one fires each tick. See
        docs/schedules.md for the guarantee.

        Args:
            cron: 5 fields (`minute hour day-of-month month day-of-week`), 6 with seconds
                first, or `@hourly`, `@daily`, `@weekly`, `@monthly`, `@yearly`.
            topic: Where each tick's event goes.
            name: Unique among the app's schedules; default: the function's name, else the
                topic.
            timezone: The IANA time zone the cron times are read in (`"Europe/London"`).
            catch_up: On start after a time when no worker ran, fire the latest tick missed
                meanwhile once (True), or skip the missed ticks (False).
            payload: The payload of every tick, instead of a function.

        Raises:
            ValueError: a bad cron spec, time zone, topic or name, a name already taken, or
                both `payload=` and a function.
            TypeError: the function needs more than one argument.
            PayloadValidationError: `payload` contradicts an agent's type for `topic`.

        Example:
            ```python
            @app.schedule("0 9 * * MON-FRI", topic="report.due", timezone="Europe/London")
            def morning_report(tick: datetime) -> dict[str, str]:
                return {"day": tick.date().isoformat()}
            ```
        """
        timing = timing_of(cron, None, timezone)
        return declare(
            self._schedules, self.name, self.check_payload, timing,
            topic=topic, name=name, catch_up=catch_up, payload=payload,
        )  # fmt: skip

    def every(
        self,
        interval: float | timedelta,
        *,
        topic: str,
        name: str | None = None,
        catch_up: bool = False,
        payload: Any = None,
    ) -> Callable[[HandlerT], HandlerT]:
        """Publish to `topic` every `interval` (a `timedelta`, or seconds), once per tick
        across the fleet: ticks fall on the multiples of the interval since the epoch, UTC
        (`timedelta(hours=1)`: on the hour). Otherwise as `schedule`.

        Example:
            ```python
            app.every(timedelta(minutes=5), topic="health.ping", payload={"from": "beat"})
            ```
        """
        timing = timing_of(None, interval, "UTC")
        return declare(
            self._schedules, self.name, self.check_payload, timing,
            topic=topic, name=name, catch_up=catch_up, payload=payload,
        )  # fmt: skip

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

    # Publishing ---------------------------------------------------------------------------

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

    async def cancel(
        self,
        event_id: str | None = None,
        *,
        correlation_id: str | None = None,
        reason: str = "cancelled",
        agent: str | Iterable[str] | None = None,
    ) -> Cancellation:
        """Cancel one event, or every event of a run, across the whole fleet.

        An event not started yet (waiting, delayed, retrying, held back by flow control) is
        never started; a running `async def` handler is stopped within about a second on
        whichever worker runs it (`CancelledError` at its next `await`), a plain `def` one is
        told through `ctx.cancelled`. Either way the delivery is settled as `cancelled`, not
        retried: recorded (`store_results`), counted, sent to its webhook, and a waiting
        `request()` raises `Cancelled`. A handler that finishes before its worker learns of
        the cancellation keeps its outcome: each event gets exactly one.

        Args:
            event_id: The event to cancel (what `publish` returned).
            correlation_id: Instead, cancel the whole run: every event with this correlation
                id not finished yet, including those its handlers publish later.
            reason: Why; recorded with the outcome.
            agent: Only this agent's (or these agents') handling of the event; default: all.

        Returns:
            The cancellation as stored (merged with an earlier one of the same event). It is
            kept for `cancel_ttl` (OMNIDAEMON_CANCEL_TTL, 7 days).

        Raises:
            ValueError: neither or both of `event_id` and `correlation_id`, or `agent` with
                `correlation_id`.
        """
        from omnidaemon.cancellation import cancellation_for, record_cancellation

        await self.connect()
        cancellation = cancellation_for(
            event_id,
            correlation_id=correlation_id,
            reason=reason,
            agents=agent,
            now=self.broker.clock(),
            ttl=self.settings.cancel_ttl,
        )
        stored = await record_cancellation(self.broker, cancellation)
        for watch in list(self._cancel_watches):
            watch.learn([stored])  # workers of this process: at once, not at their next look
        return stored

    async def result(
        self, event_id: str, *, agent: str | None = None, timeout: float | None = None
    ) -> Result:
        """The stored status and result of an event, from agents with `store_results=True`.

        Args:
            event_id: The id `publish` returned.
            agent: Which agent's result, when several agents store results for the event.
            timeout: Wait up to this many seconds for the event to finish (`succeeded` or
                `dead_lettered`); `None` returns the current status at once.

        Returns:
            The result; status `pending` while nothing is stored yet (or the id is unknown,
            or its result expired).

        Raises:
            TimeoutError: `timeout` passed before the event finished.
            ValueError: several agents stored results and `agent` was not given.
        """
        await self.connect()
        return await wait_result(self.broker, event_id, agent, timeout)

    async def dead_letters(self, agent: str, *, limit: int = 100) -> list[DeadLetter]:
        """The `limit` most recent events in `agent`'s dead-letter queue, oldest first: its
        queues on the topic's priority lanes included, merged by the time the agent gave up.

        A record among them that cannot be read (not written by a worker) is skipped and
        logged as a warning with its id and why (`omnidaemon bus dlq` lists them too)."""
        from omnidaemon.lanes_view import dead_letters_with_lanes, read_lane_dead_letters

        spec = self.get_agent(agent)
        await self.connect()
        sub = Subscription(spec.topic, spec.name)
        records = await dead_letters_with_lanes(self.broker, sub, limit)
        letters, undecodable = read_lane_dead_letters(records, spec.topic, spec.name)
        if spec.debounce is not None:
            from omnidaemon.debounce.view import merge_dead_letters

            letters, undecodable = await merge_dead_letters(
                self.broker, spec, letters, undecodable, limit
            )
        warn_undecodable(undecodable, "skipped")
        return letters

    async def replay_dead_letters(
        self, agent: str, *, event_ids: Iterable[str] | None = None
    ) -> int:
        """Deliver dead-lettered events to `agent` again, each as a new first attempt.

        Only `agent` sees them again; other agents on the topic are not disturbed. The records
        leave the dead-letter queue as they are re-queued; an event of a priority lane goes
        back into that lane, keeping its priority.

        Args:
            agent: Whose dead-letter queue.
            event_ids: Replay only these events; default: every record in the queue.

        Returns:
            How many events were re-queued. A record that cannot be read is not: it stays in
            the queue and is logged as a warning.
        """
        from omnidaemon.lanes_view import LaneSelections, replay_with_lanes

        spec = self.get_agent(agent)
        ids = None if event_ids is None else set(event_ids)
        select = LaneSelections(spec.topic, spec.name, ids)
        await self.connect()
        moved = await replay_with_lanes(self.broker, Subscription(spec.topic, spec.name), select)
        warn_undecodable(select.undecodable, "not replayable, left in the queue")
        if spec.debounce is not None:
            from omnidaemon.debounce.view import replay_internal

            batches, undecodable = await replay_internal(self.broker, spec, ids)
            warn_undecodable(undecodable, "not replayable, left in the queue")
            moved += batches
        return moved

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
