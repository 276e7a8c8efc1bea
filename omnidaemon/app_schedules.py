"""Declaring schedules on an app: `schedule` (cron) and `every` (an interval). `App`
inherits it; the worker side is `omnidaemon.worker.scheduler`."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import timedelta
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, TypeVar

from omnidaemon.schedules import NO_PAYLOAD, ScheduleSpec, check_declared, declare, timing_of

__all__ = ["Scheduling"]

HandlerT = TypeVar("HandlerT", bound=Callable[..., Any])


class Scheduling:
    """The schedules side of `App`."""

    # Set by App.__init__, or defined by App.
    name: str
    _schedules: dict[str, ScheduleSpec]
    _undecorated_schedules: dict[object, str]  # declared without payload=, not decorated yet

    if TYPE_CHECKING:  # defined by App

        def check_payload(self, topic: str, payload: Any, *, validated_as: Any = None) -> None: ...

    @property
    def schedules(self) -> Mapping[str, ScheduleSpec]:
        """The registered schedules by name (read-only)."""
        return MappingProxyType(self._schedules)

    def check_schedules(self) -> None:
        """Refuse to run the app if a schedule was declared without `payload=` and never
        decorated (a statement that forgot its payload). `Worker` calls it.

        Raises:
            ConfigurationError: naming the schedule.
        """
        check_declared(self.name, self._undecorated_schedules)

    def schedule(
        self,
        cron: str,
        *,
        topic: str,
        name: str | None = None,
        timezone: str = "UTC",
        catch_up: bool = False,
        payload: Any = NO_PAYLOAD,
        timeout: float | timedelta | None = None,
    ) -> Callable[[HandlerT], HandlerT]:
        """Publish to `topic` at the times a cron spec names, once per tick across the fleet.

        Decorate a function (`async def` or `def`, taking nothing or the tick's scheduled time
        as an aware `datetime`): its return value is the tick's payload (`None`: nothing is
        published). Or give `payload=` and call it as a statement: a statement without
        `payload=` registers nothing, and the app's workers refuse to start. Every worker of
        the app runs its schedules; the bus decides which one fires each tick. See
        docs/schedules.md for the guarantee.

        Args:
            cron: 5 fields (`minute hour day-of-month month day-of-week`), 6 with seconds
                first, or `@hourly`, `@daily`, `@weekly`, `@monthly`, `@yearly`.
            topic: Where each tick's event goes.
            name: Unique among the app's schedules; default: the function's name, else the
                topic.
            timezone: The IANA time zone the cron times are read in (`"Europe/London"`).
            catch_up: On start after a time when no worker ran, fire the latest tick missed
                meanwhile once (True), or skip the missed ticks (False). A tick the first
                worker back comes to within a minute (or within the period, if shorter) is
                not missed but owed, and fires late either way.
            payload: The payload of every tick, instead of a function (not `None`, which
                would publish nothing: `{}` for an empty one).
            timeout: Seconds (or a `timedelta`) the function may run for one tick; past it
                the tick fails (logged, outcome `failed`). Default: the schedule's period at
                that tick, at least 1 s and at most 60 s.

        Raises:
            ValueError: a bad cron spec, time zone, topic, name or timeout, a name already
                taken, `payload=None`, or both `payload=` and a function.
            TypeError: the function needs more than one argument.
            PayloadValidationError: `payload` contradicts an agent's type for `topic`.

        Example:
            ```python
            @app.schedule("0 9 * * MON-FRI", topic="report.due", timezone="Europe/London")
            def morning_report(tick: datetime) -> dict[str, str]:
                # The tick is in UTC: the day in London is that of its London time.
                return {"day": tick.astimezone(ZoneInfo("Europe/London")).date().isoformat()}
            ```
        """
        timing = timing_of(cron, None, timezone)
        return declare(
            self._schedules, self._undecorated_schedules, self.name, self.check_payload,
            timing, topic=topic, name=name, catch_up=catch_up, payload=payload, timeout=timeout,
        )  # fmt: skip

    def every(
        self,
        interval: float | timedelta,
        *,
        topic: str,
        name: str | None = None,
        catch_up: bool = False,
        payload: Any = NO_PAYLOAD,
        timeout: float | timedelta | None = None,
    ) -> Callable[[HandlerT], HandlerT]:
        """Publish to `topic` every `interval` (a `timedelta`, or seconds), once per tick
        across the fleet: ticks fall on the multiples of the interval since the epoch, UTC
        (`timedelta(hours=1)`: on the hour). The interval must be a whole number of
        milliseconds, at least 1 ms. Otherwise as `schedule`.

        Example:
            ```python
            app.every(timedelta(minutes=5), topic="health.ping", payload={"from": "beat"})
            ```
        """
        timing = timing_of(None, interval, "UTC")
        return declare(
            self._schedules, self._undecorated_schedules, self.name, self.check_payload,
            timing, topic=topic, name=name, catch_up=catch_up, payload=payload, timeout=timeout,
        )  # fmt: skip
