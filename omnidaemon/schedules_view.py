"""What `omnidaemon schedules APP` and `GET /v1/schedules` show: each schedule of an app as
declared, with its next and last fire times read from the bus."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from omnidaemon.cron import Cron
from omnidaemon.schedules import ScheduleSpec, describe_schedule, tick_time
from omnidaemon.worker.schedule_state import ScheduleState, state_key

if TYPE_CHECKING:
    from omnidaemon.app import App
    from omnidaemon.brokers.base import Broker

__all__ = ["schedule_views"]


def _when(spec: ScheduleSpec, tick: float | None) -> str | None:
    """A tick as ISO 8601 in the schedule's time zone (UTC for an interval)."""
    if tick is None:
        return None
    moment = tick_time(tick)
    timing = spec.timing
    return (
        moment.astimezone(timing.tz).isoformat() if isinstance(timing, Cron) else moment.isoformat()
    )


def _view(spec: ScheduleSpec, state: ScheduleState | None, now: float) -> dict[str, Any]:
    # The next tick not settled yet: overdue (in the past) while a worker is firing it, or
    # when no worker runs; without a state (no worker ever ran it), the next one from now.
    pending = spec.next_after(now if state is None else state.last)
    claim = state.claim if state is not None else None
    return {
        **describe_schedule(spec),
        "next_fire": _when(spec, pending),
        "last_fire": _when(spec, state.fired if state is not None else None),
        "last_outcome": state.outcome if state is not None else None,
        "last_outcome_tick": _when(spec, state.outcome_tick if state is not None else None),
        "last_error": state.error if state is not None else None,
        "firing": claim.holder if claim is not None and claim.until > now else None,
        "started": state is not None,
    }


async def schedule_views(app: App, broker: Broker) -> list[dict[str, Any]]:
    """Every schedule of `app`, as JSON data: its declaration (`describe_schedule`), then
    `next_fire`, `last_fire` (the last tick published), `last_outcome` (`fired`, `failed`,
    `empty`, `missed`) of `last_outcome_tick`, `last_error`, `firing` (the worker firing a
    tick now) and `started` (whether any worker has run it). Reads one value per schedule."""
    now = broker.clock()
    views = []
    for spec in app.schedules.values():
        data = await broker.get_value(state_key(app.name, spec.name))
        state = None if data is None else ScheduleState.decode(data)
        views.append(_view(spec, state, now))
    return views
