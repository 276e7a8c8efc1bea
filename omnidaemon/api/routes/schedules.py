"""`/v1/schedules`: the app's schedules with their next and last fire times (`omnidaemon
schedules APP --json`)."""

from typing import Literal

from fastapi import APIRouter
from pydantic import BaseModel, Field

from omnidaemon.api.auth import Scope
from omnidaemon.api.dependencies import CurrentApp, require
from omnidaemon.api.errors import documented
from omnidaemon.schedules_view import schedule_views

__all__ = ["ScheduleInfo", "ScheduleList", "router"]

router = APIRouter(tags=["fleet"])


class ScheduleInfo(BaseModel):
    """A schedule of the app: its declaration, and its fire times from the bus."""

    name: str
    topic: str
    spec: str = Field(description="The cron spec, or the interval as `every 300s`.")
    cron: str | None
    interval: float | None = Field(description="Seconds between ticks, for `every`.")
    timezone: str
    catch_up: bool
    function: str | None
    description: str | None
    next_fire: str = Field(description="The next tick not fired yet (ISO 8601).")
    last_fire: str | None = Field(description="The last tick whose event was published.")
    last_outcome: Literal["fired", "failed", "empty", "missed"] | None
    last_outcome_tick: str | None
    last_error: str | None
    firing: str | None = Field(description="The worker firing a tick now, if one is.")
    started: bool = Field(description="Whether any worker has run the schedule yet.")


class ScheduleList(BaseModel):
    """The schedules an app declares."""

    app: str
    schedules: list[ScheduleInfo]


@router.get("/schedules", dependencies=[require(Scope.read)], responses=documented(401, 403, 503))
async def list_schedules(app: CurrentApp) -> ScheduleList:
    """The schedules the app declares, with each one's next fire time, last fire time and
    what its last tick came to (`omnidaemon schedules APP --json`). Needs the `read` scope."""
    views = await schedule_views(app, app.broker)
    return ScheduleList(app=app.name, schedules=[ScheduleInfo.model_validate(v) for v in views])
