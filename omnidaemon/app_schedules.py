"""Declaring schedules on an app: `schedule` (cron) and `every` (an interval). `App`
inherits it; the worker side is `omnidaemon.worker.scheduler`."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import timedelta
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, TypeVar

from omnidaemon.schedules import ScheduleSpec, declare, timing_of

__all__ = ["Scheduling"]

HandlerT = TypeVar("HandlerT", bound=Callable[..., Any])


class Scheduling:
    """The schedules side of `App`."""

    # Set by App.__init__, or defined by App.
    name: str
    _schedules: dict[str, ScheduleSpec]

    if TYPE_CHECKING:  # defined by App

        def check_payload(self, topic: str, payload: Any, *, validated_as: Any = None) -> None: ...

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
