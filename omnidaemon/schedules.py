"""Schedules: events an app publishes by the clock, once per tick across the whole fleet.

`@app.schedule("*/5 * * * *", topic=...)` and `@app.every(timedelta(minutes=5), topic=...)`
declare them; every worker of the app runs them, and the bus decides which worker fires each
tick (`omnidaemon.worker.scheduler`). This module holds the declarations: when a schedule
ticks, and what it publishes. See docs/schedules.md for the guarantee.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Any, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import anyio

from omnidaemon.agents import validate_agent_name
from omnidaemon.cron import Cron
from omnidaemon.envelope import validate_topic

__all__ = [
    "Every",
    "ScheduleSpec",
    "build_schedule",
    "declare",
    "describe_schedule",
    "tick_time",
    "timing_of",
]

F = TypeVar("F", bound=Callable[..., Any])

SCHEDULE_HEADER = "omnidaemon-schedule"
"""The header naming the schedule that published an event."""
TICK_HEADER = "omnidaemon-tick"
"""The header holding the tick an event was published for (ISO 8601, UTC)."""


def tick_time(tick: float) -> datetime:
    """A tick (seconds since the epoch) as an aware UTC datetime."""
    return datetime.fromtimestamp(tick, UTC)


@dataclass(frozen=True, slots=True)
class Every:
    """A fixed interval: ticks at the multiples of `seconds` since the epoch (UTC), so every
    worker computes the same ticks without sharing any state (`every(timedelta(hours=1))`
    ticks on the hour, UTC)."""

    seconds: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.seconds) and self.seconds >= 0.001):
            raise ValueError(f"an interval must be at least 1 ms, not {self.seconds!r} s")

    def next_after(self, after: float) -> float:
        """The first tick strictly after `after` (seconds since the epoch)."""
        step = round(self.seconds * 1000)  # whole milliseconds: the same ticks everywhere
        n = math.floor(after * 1000 / step) + 1
        while n * step / 1000 <= after:  # float rounding at an exact multiple
            n += 1
        return n * step / 1000

    def at_or_before(self, moment: float) -> float:
        """The last tick at or before `moment`."""
        step = round(self.seconds * 1000)
        n = math.floor(moment * 1000 / step)
        while (n + 1) * step / 1000 <= moment:
            n += 1
        while n * step / 1000 > moment:
            n -= 1
        return n * step / 1000


@dataclass(frozen=True, slots=True, eq=False)
class ScheduleSpec:
    """One schedule of an app. Made by `App.schedule` and `App.every`; read-only.

    Attributes:
        name: Unique among the app's schedules; names its state on the bus.
        topic: Where each tick's event is published.
        timing: A `Cron` (with its time zone) or an `Every`.
        catch_up: On start after a time without any worker, fire the latest tick missed
            meanwhile once (True), or skip the missed ticks (False).
        payload: The payload of every tick, for a schedule without a function.
        function: Called each tick; its return value is published (`None`: nothing is).
        takes_tick: Whether `function` receives the tick's scheduled time.
        description: Shown by the CLI; default: the function's docstring.
    """

    name: str
    topic: str
    timing: Cron | Every
    catch_up: bool = False
    payload: Any = None
    function: Callable[..., Any] | None = None
    takes_tick: bool = False
    description: str | None = None

    @property
    def timezone(self) -> str:
        """The time zone cron times are read in (`UTC` for an interval)."""
        return str(self.timing.tz) if isinstance(self.timing, Cron) else "UTC"

    @property
    def spec(self) -> str:
        """The cron spec, or the interval as `every 300s`."""
        timing = self.timing
        return timing.spec if isinstance(timing, Cron) else f"every {timing.seconds:g}s"

    def next_after(self, after: float) -> float:
        """The first tick strictly after `after`, in seconds since the epoch."""
        if isinstance(self.timing, Every):
            return self.timing.next_after(after)
        return self.timing.next_after(tick_time(after)).timestamp()

    def latest_at_or_before(self, moment: float, since: float) -> float | None:
        """The last tick in `(since, moment]`, or None."""
        timing = self.timing
        if isinstance(timing, Every):
            last = timing.at_or_before(moment)
            return last if last > since else None
        # Cron has no "previous": look back over windows that double until one holds a tick.
        window = 60.0
        while True:
            start = max(since, moment - window)
            found, tick = None, self.next_after(start)
            while tick <= moment:
                found, tick = tick, self.next_after(tick)
            if found is not None or start <= since:
                return found
            window *= 2

    async def make_payload(self, tick: float) -> Any:
        """The tick's payload: the function's return value (a plain `def` runs in a thread,
        as a plain handler does), or the declared payload."""
        function = self.function
        if function is None:
            return self.payload
        args = (tick_time(tick),) if self.takes_tick else ()
        if inspect.iscoroutinefunction(function):
            return await function(*args)
        result = await anyio.to_thread.run_sync(lambda: function(*args))
        if inspect.isawaitable(result):  # a callable object whose __call__ is async
            return await result
        return result


def _zone(timezone: str | tzinfo) -> tzinfo:
    if isinstance(timezone, tzinfo):
        return timezone
    try:
        return ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(
            f"unknown time zone {timezone!r} (an IANA name: 'Europe/London')"
        ) from None


def _takes_tick(function: Callable[..., Any]) -> bool:
    """Whether `function` takes the tick's time: it may take no argument, or one."""
    try:
        params = list(inspect.signature(function).parameters.values())
    except (TypeError, ValueError):
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p for p in params if p.default is p.empty and p.kind is not p.VAR_POSITIONAL]
    required = [p for p in required if p.kind is not p.VAR_KEYWORD]
    if len(required) > 1 or any(p.kind is p.KEYWORD_ONLY for p in required):
        raise TypeError(
            "a schedule's function takes no argument, or one (the tick's time): "
            f"{getattr(function, '__name__', function)!r} needs {len(required)}"
        )
    return bool(positional)


def timing_of(
    cron: str | None, every: float | timedelta | None, timezone: str | tzinfo
) -> Cron | Every:
    """The timing of a schedule from `App.schedule`'s cron spec or `App.every`'s interval."""
    if cron is not None:
        return Cron.parse(cron, _zone(timezone))
    assert every is not None
    if isinstance(every, timedelta):
        return Every(every.total_seconds())
    if isinstance(every, bool) or not isinstance(every, int | float):
        raise TypeError(f"every() takes a timedelta or seconds, not {type(every).__name__}")
    return Every(float(every))


def build_schedule(
    timing: Cron | Every,
    *,
    topic: str,
    name: str | None,
    catch_up: bool,
    payload: Any,
    function: Callable[..., Any] | None,
) -> ScheduleSpec:
    """Check the options and make the `ScheduleSpec`.

    Raises:
        ValueError: a bad topic or name, or both a payload and a function.
        TypeError: the function takes more than one argument, or is not callable.
    """
    validate_topic(topic)
    if function is not None and not callable(function):
        raise TypeError(f"@schedule decorates a function, not {type(function).__name__}")
    if function is not None and payload is not None:
        raise ValueError(
            f"a schedule publishes its payload= or its function's return value, not both "
            f"(schedule on {topic!r})"
        )
    default = getattr(function, "__name__", None) if function is not None else topic
    chosen = validate_agent_name(name or default or topic)
    doc = inspect.getdoc(function) if function is not None else None
    return ScheduleSpec(
        name=chosen,
        topic=topic,
        timing=timing,
        catch_up=bool(catch_up),
        payload=payload,
        function=function,
        takes_tick=function is not None and _takes_tick(function),
        description=doc.split("\n\n")[0] if doc else None,
    )


def describe_schedule(spec: ScheduleSpec) -> dict[str, Any]:
    """A schedule as JSON data: what the CLI (`schedules --json`, `agents --json`) and the API
    show of its declaration."""
    function = spec.function
    return {
        "name": spec.name,
        "topic": spec.topic,
        "spec": spec.spec,
        "cron": spec.timing.spec if isinstance(spec.timing, Cron) else None,
        "interval": spec.timing.seconds if isinstance(spec.timing, Every) else None,
        "timezone": spec.timezone,
        "catch_up": spec.catch_up,
        "function": (
            None if function is None else f"{function.__module__}.{function.__qualname__}"
        ),
        "description": spec.description,
    }


def declare(
    registry: dict[str, ScheduleSpec],
    app_name: str,
    check_payload: Callable[[str, Any], None],
    timing: Cron | Every,
    *,
    topic: str,
    name: str | None,
    catch_up: bool,
    payload: Any,
) -> Callable[[F], F]:
    """What `App.schedule` and `App.every` do: with `payload=`, register the schedule now
    and return a decorator that refuses a function; else return the decorator that
    registers the function it decorates."""

    def register(function: Callable[..., Any] | None) -> ScheduleSpec:
        spec = build_schedule(
            timing, topic=topic, name=name, catch_up=catch_up, payload=payload, function=function
        )
        if spec.name in registry:
            raise ValueError(
                f"a schedule named {spec.name!r} is already registered on app {app_name!r}; "
                "pass name=... to tell them apart"
            )
        if function is None:
            check_payload(topic, payload)  # against the agents declared so far (and at start)
        registry[spec.name] = spec
        return spec

    if payload is not None:
        register(None)

    def decorate(function: F) -> F:
        if payload is not None:
            raise ValueError(
                f"the schedule on {topic!r} was given payload=, so it publishes that: a "
                "schedule publishes its payload= or its function's return value, not both"
            )
        register(function)
        return function

    return decorate
