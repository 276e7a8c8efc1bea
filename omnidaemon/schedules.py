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
from omnidaemon.errors import ConfigurationError

__all__ = [
    "NO_PAYLOAD",
    "Every",
    "ScheduleSpec",
    "build_schedule",
    "check_declared",
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

_MAX_TIMEOUT = 60.0  # the default timeout of a schedule's function: its period, at most this
_MIN_TIMEOUT = 1.0  # ... and at least this


class _NoPayload:
    """The type of `NO_PAYLOAD`."""

    def __repr__(self) -> str:
        return "NO_PAYLOAD"


NO_PAYLOAD: Any = _NoPayload()
"""`payload=`'s default: no payload given, so the schedule publishes a decorated function's
return value (distinct from `None`, which is refused: it would publish nothing)."""


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
        millis = self.seconds * 1000
        if abs(millis - round(millis)) > 1e-6 * max(1.0, millis):
            # Ticks are multiples of whole milliseconds, so that every worker computes the
            # same ones; rounding an interval silently would change when it ticks.
            raise ValueError(
                f"an interval must be a whole number of milliseconds, not {self.seconds!r} s"
            )

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
        catch_up: On start after a time without any worker, fire the latest tick that fell
            due meanwhile once (True), or skip the missed ones (False). Owed ticks (claimed
            by a worker that died, or within the misfire grace) fire either way.
        payload: The payload of every tick, for a schedule without a function.
        function: Called each tick; its return value is published (`None`: nothing is).
        takes_tick: Whether `function` receives the tick's scheduled time.
        description: Shown by the CLI; default: the function's docstring.
        timeout: Seconds the function may run for a tick before the tick fails; None: the
            schedule's period at that tick, at least 1 s and at most 60 s (`timeout_at`).
    """

    name: str
    topic: str
    timing: Cron | Every
    catch_up: bool = False
    payload: Any = None
    function: Callable[..., Any] | None = None
    takes_tick: bool = False
    description: str | None = None
    timeout: float | None = None

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

    def period_at(self, tick: float) -> float:
        """The schedule's period around `tick`: its interval, or for cron the time to the
        next tick."""
        if isinstance(self.timing, Every):
            return self.timing.seconds
        return self.next_after(tick) - tick

    def timeout_at(self, tick: float) -> float:
        """Seconds the function may run for `tick`: `timeout`, else the period around the
        tick clamped to [1 s, 60 s]."""
        if self.timeout is not None:
            return self.timeout
        return min(_MAX_TIMEOUT, max(_MIN_TIMEOUT, self.period_at(tick)))

    def previous(self, tick: float, since: float) -> float | None:
        """The last tick in `(since, tick)`, or None (`tick` is a tick)."""
        # Halfway back to the tick before: ticks are whole milliseconds (every), or whole
        # seconds (cron), so this finds that tick exactly, as `next_after` computes it.
        half = 0.0005 if isinstance(self.timing, Every) else 0.5
        return self.latest_at_or_before(tick - half, since)

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
        as a plain handler does), or the declared payload. Cancelling it (a timeout, the
        worker stopping) abandons a plain `def`'s thread instead of waiting for it."""
        function = self.function
        if function is None:
            return self.payload
        args = (tick_time(tick),) if self.takes_tick else ()
        if inspect.iscoroutinefunction(function):
            return await function(*args)
        result = await anyio.to_thread.run_sync(lambda: function(*args), abandon_on_cancel=True)
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


def _timeout(timeout: float | timedelta | None) -> float | None:
    if timeout is None:
        return None
    if isinstance(timeout, timedelta):
        seconds = timeout.total_seconds()
    elif isinstance(timeout, bool) or not isinstance(timeout, int | float):
        raise TypeError(f"timeout= takes a timedelta or seconds, not {type(timeout).__name__}")
    else:
        seconds = float(timeout)
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"a schedule's timeout must be more than 0 s, not {seconds!r} s")
    return seconds


def build_schedule(
    timing: Cron | Every,
    *,
    topic: str,
    name: str | None,
    catch_up: bool,
    payload: Any,
    function: Callable[..., Any] | None,
    timeout: float | timedelta | None = None,
) -> ScheduleSpec:
    """Check the options and make the `ScheduleSpec` (`payload` is `NO_PAYLOAD` for a
    schedule with a function).

    Raises:
        ValueError: a bad topic, name or timeout, or both a payload and a function.
        TypeError: the function takes more than one argument, or is not callable.
    """
    validate_topic(topic)
    if function is not None and not callable(function):
        raise TypeError(f"@schedule decorates a function, not {type(function).__name__}")
    if function is not None and payload is not NO_PAYLOAD:
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
        payload=None if payload is NO_PAYLOAD else payload,
        function=function,
        takes_tick=function is not None and _takes_tick(function),
        description=doc.split("\n\n")[0] if doc else None,
        timeout=_timeout(timeout),
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
        "timeout": spec.timeout,
        "function": (
            None if function is None else f"{function.__module__}.{function.__qualname__}"
        ),
        "description": spec.description,
    }


def declare(
    registry: dict[str, ScheduleSpec],
    undecorated: dict[object, str],
    app_name: str,
    check_payload: Callable[[str, Any], None],
    timing: Cron | Every,
    *,
    topic: str,
    name: str | None,
    catch_up: bool,
    payload: Any,
    timeout: float | timedelta | None,
) -> Callable[[F], F]:
    """What `App.schedule` and `App.every` do: with `payload=`, register the schedule now
    and return a decorator that refuses a function; else return the decorator that
    registers the function it decorates, and note the declaration in `undecorated` until it
    does (`check_declared` refuses to run an app with one left: a statement that forgot its
    `payload=`)."""
    if payload is None:
        raise ValueError(
            f"the schedule on {topic!r} was given payload=None, which publishes nothing: give "
            "a payload ({} for an empty one), or decorate a function"
        )
    _timeout(timeout)  # a bad timeout is refused here, not only once decorated

    def register(function: Callable[..., Any] | None) -> ScheduleSpec:
        spec = build_schedule(
            timing, topic=topic, name=name, catch_up=catch_up, payload=payload,
            function=function, timeout=timeout,
        )  # fmt: skip
        if spec.name in registry:
            raise ValueError(
                f"a schedule named {spec.name!r} is already registered on app {app_name!r}; "
                "pass name=... to tell them apart"
            )
        if function is None:
            check_payload(topic, payload)  # against the agents declared so far (and at start)
        registry[spec.name] = spec
        return spec

    token = object()
    if payload is not NO_PAYLOAD:
        register(None)
    else:
        what = timing.spec if isinstance(timing, Cron) else f"every {timing.seconds:g}s"
        undecorated[token] = f"{what} on topic {topic!r}" + (f" (name {name!r})" if name else "")

    def decorate(function: F) -> F:
        if payload is not NO_PAYLOAD:
            raise ValueError(
                f"the schedule on {topic!r} was given payload=, so it publishes that: a "
                "schedule publishes its payload= or its function's return value, not both"
            )
        register(function)
        undecorated.pop(token, None)
        return function

    return decorate


def check_declared(app_name: str, undecorated: dict[object, str]) -> None:
    """Refuse to run an app one of whose schedules was declared without `payload=` and never
    decorated: `app.every(60, topic="ping")` as a statement would otherwise publish nothing,
    silently.

    Raises:
        ConfigurationError: naming the schedule.
    """
    if undecorated:
        first = next(iter(undecorated.values()))
        raise ConfigurationError(
            f"app {app_name!r}: the schedule {first} was declared without payload= and never "
            "decorated, so it would publish nothing: give it payload= (a statement), or use "
            "it as a decorator on the function whose return value it publishes"
        )
