"""The API's routes, one module per area; `/v1` holds every operation, `/healthz` the probe."""

from fastapi import APIRouter

from omnidaemon.api.routes import dead_letters, events, fleet, schedules, streams, topics, traces

__all__ = ["probe_router", "v1_router"]

probe_router = fleet.probe_router


def v1_router() -> APIRouter:
    """Every `/v1` route: events (and their streams), runs and their traces, fleet, schedules,
    topics, dead letters."""
    router = APIRouter(prefix="/v1")
    for area in (events, streams, traces, fleet, schedules, topics, dead_letters):
        router.include_router(area.router)
    return router
